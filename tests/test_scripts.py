"""The tools in scripts/: each runs as a command on tiny inputs and its output file is checked."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tinyrun import REPO, run_cli

SCRIPTS = REPO / 'scripts'
sys.path.insert(0, str(SCRIPTS))
from prepare_digits import split_indices, to_image  # noqa: E402
PY_SCRIPTS = ['plot_log.py', 'visualize_attention.py', 'convert_checkpoint.py', 'prepare_digits.py',
              'benchmark_checkpoint.py']
LAUNCHERS = ['pretrain_vit5.sh', 'finetune_vit5.sh', 'eval_vit5.sh']
TINY_KWARGS = dict(patch_size=8, depth=2, embed_dim=64, num_heads=2)  # 4x4 patches + cls + 4 registers


def run_script(name, *args, env=None):
    return run_cli(args, timeout=120, env=env, script=f'scripts/{name}')


def run_sh(name, *args, env=None):
    return subprocess.run(['bash', str(SCRIPTS / name), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=30)


def assert_one_line_error(proc):
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'error' in lines[0], proc.stderr


# ---- every command documents itself and refuses bad input in one line ------------------------
@pytest.mark.parametrize('name', PY_SCRIPTS)
def test_python_script_help(name):
    proc = run_script(name, '--help')
    assert proc.returncode == 0 and 'usage:' in proc.stdout


@pytest.mark.parametrize('name', LAUNCHERS)
def test_launcher_help(name):
    proc = run_sh(name, '--help')
    assert proc.returncode == 0 and 'usage:' in proc.stdout and '--gpus' in proc.stdout


@pytest.mark.parametrize('name, args', [
    ('plot_log.py', ['missing/log.txt']),
    ('plot_log.py', ['a/log.txt', '--labels', 'x', 'y']),
    ('visualize_attention.py', ['missing.png', '--model', 'vit5_tiny']),
    ('visualize_attention.py', [str(REPO / 'pytest.ini')]),  # neither --checkpoint nor --model
    ('visualize_attention.py', [str(REPO / 'pytest.ini'), '--model', 'vit5_tiny', '--heads', 'some']),
    ('convert_checkpoint.py', ['missing.pth']),
    ('convert_checkpoint.py', ['missing.pth', '--out', 'x.bin']),
    ('prepare_digits.py', ['--out', 'x', '--val-fraction', '1.5']),
    ('prepare_digits.py', []),
    ('benchmark_checkpoint.py', ['--models', 'vit5_tiny', '--step-ms', '1', '2']),
    ('benchmark_checkpoint.py', ['--dir', 'no/such/folder']),
])
def test_python_script_bad_arguments(name, args):
    assert_one_line_error(run_script(name, *args))


@pytest.mark.parametrize('args', [
    [], ['huge', '--data-path', 'd'], ['small'], ['small', '--data-path', 'd', '--gpus', 'x'],
    ['small', '--data-path', 'd', '--nnodes', '2'], ['small', '--data-path', 'd', '--bogus'],
    ['small', '--data-path', 'd', '--max-restarts', '-1'],
])
def test_launcher_bad_arguments(args):
    assert_one_line_error(run_sh('pretrain_vit5.sh', *args))


# ---- launchers print exactly the released commands (the released README) ------------------------
PRETRAIN = ('--input-size 224 --data-path IMNET --output_dir OUT --batch 256 --accum_iter 1 --lr 4e-3 '
            '--weight-decay 0.05 --epochs 800 --opt fusedlamb --unscale-lr --mixup .8 --cutmix 1.0 '
            '--color-jitter 0.3 --drop-path 0.05 --reprob 0.0 --smoothing 0.0 --ThreeAugment --repeated-aug '
            '--bce-loss --warmup-epochs 5 --eval-crop-ratio 1.0 --dist-eval --disable_wandb')
FINETUNE = ('--finetune CKPT --data-path DATA --output_dir OUT --batch 64 --lr 1e-5 --weight-decay 0.1 '
            '--epochs 20 --unscale-lr --aa rand-m9-mstd0.5-inc1 --drop-path 0.05 --reprob 0.0 --smoothing 0.1 '
            '--no-repeated-aug --dist-eval --load_ema --eval-crop-ratio 1.0 --disable_wandb')


def flags(command: str) -> dict:
    """'--a 1 --b --c x' -> {'--a': '1', '--b': None, '--c': 'x'} (order-free comparison)."""
    out, key = {}, None
    for tok in shlex.split(command):
        if tok.startswith('--'):
            key, out[tok] = tok, None
        else:
            out[key] = tok
    return out


def dry_run(script, size, *args, env=None):
    proc = run_sh(script, size, '--dry-run', *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize('size, changes', [
    ('small', {}),
    ('base', {'--input-size': '192', '--lr': '3e-3', '--drop-path': '0.2'}),
    ('large', {'--input-size': '192', '--lr': '3e-3', '--epochs': '400', '--drop-path': '0.35'}),
])
def test_pretrain_dry_run_prints_released_flags(size, changes):
    cmd = dry_run('pretrain_vit5.sh', size, '--data-path', 'IMNET', '--output-dir', 'OUT')
    assert cmd.startswith('torchrun --nproc_per_node 8 main.py --model vit5_' + size)
    assert flags(cmd.split(' main.py ')[1]) == {**flags(PRETRAIN), '--model': f'vit5_{size}', **changes}
    if size == 'small':
        assert cmd.endswith('main.py --model vit5_small ' + PRETRAIN)  # the SPEC line, verbatim
        assert '--ThreeAugment --repeated-aug --bce-loss' in cmd and '--lr 4e-3' in cmd


@pytest.mark.parametrize('size, drop_path', [('small', '0.05'), ('base', '0.25'), ('large', '0.5')])
def test_finetune_dry_run_prints_released_flags(size, drop_path):
    cmd = dry_run('finetune_vit5.sh', size, env=dict(DATA_PATH='DATA', OUTPUT_DIR='OUT', CKPT='CKPT'))
    assert flags(cmd.split(' main.py ')[1]) == {**flags(FINETUNE), '--model': f'vit5_{size}',
                                                 '--drop-path': drop_path}


def test_eval_and_multi_node_dry_run():
    cmd = dry_run('eval_vit5.sh', 'base', '--ckpt', 'w.pth', '--data-path', 'IMNET', '--gpus', '4',
                  '--nnodes', '2', '--node-rank', '1', '--master-addr', 'host0', '--', '--input-size', '384')
    # c10d rendezvous, hosted by node 0 (a static one could not restart the group)
    assert cmd.startswith('torchrun --nproc_per_node 4 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint host0:29500 '
                          '--rdzv-id vit5 --rdzv-conf is_host=0 main.py --eval --resume w.pth --model vit5_base')
    assert cmd.endswith('--input-size 384')  # extra flags come last, so they win
    tag = dry_run('eval_vit5.sh', 'large', '--ckpt', 'vit5_large.in1k_384', '--data-path', 'IMNET')
    assert 'main.py --eval --finetune vit5_large.in1k_384 --model vit5_large --data-path IMNET' in tag
    assert '--input-size' not in tag  # the tag sets it
    restarts = dry_run('pretrain_vit5.sh', 'small', '--data-path', 'IMNET', '--max-restarts', '3', '--', '--auto-resume')
    assert restarts.startswith('torchrun --nproc_per_node 8 --standalone --max-restarts 3 main.py --model vit5_small')
    env_cmd = dry_run('pretrain_vit5.sh', 'small', env=dict(DATA_PATH='/data/in 1k', GPUS='2', DRY_RUN='1'))
    assert "--nproc_per_node 2" in env_cmd and shlex.split(env_cmd)[shlex.split(env_cmd).index('--data-path') + 1] \
        == '/data/in 1k'


# ---- benchmark_checkpoint ----------------------------------------------------------------------------
def test_benchmark_checkpoint_times_main_py_s_save(tmp_path):
    import benchmark_checkpoint
    out = tmp_path / 'r.json'
    proc = run_inprocess(benchmark_checkpoint.main, '--models', 'vit5_tiny', '--model-kwargs', 'depth=1',
                         '--rounds', '1', '--dir', tmp_path, '--step-ms', '50', '--json', out)
    assert proc.returncode == 0, proc.stderr
    [r] = json.loads(out.read_text())
    assert r['model'] == 'vit5_tiny' and r['save_s'] > r['read_back_s'] > 0
    # model + EMA + LAMB's two moments: four float32 copies of the weights, and little else
    assert 4 * r['params'] * 4 / 2 ** 20 < r['mb'] < 4.2 * r['params'] * 4 / 2 ** 20
    assert r['min_interval'] == int(100 * r['save_s'] * 1000 / 50) + 1
    assert f'>= {r["min_interval"]} steps of 50 ms' in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ['r.json']  # its checkpoints are gone


# ---- the SLURM script's signal handling (tests/slurm stand in for srun and scontrol) -------------------
FAKE_MAIN = """#!/usr/bin/env bash
# main.py stand-in: notes its start; on SIGUSR1 or SIGTERM exits 75, as main.py does after its checkpoint
trap 'echo "task $SLURM_PROCID: USR1" >> "$TASK_LOG"; exit 75' USR1
trap 'echo "task $SLURM_PROCID: TERM" >> "$TASK_LOG"; exit 75' TERM
echo "task $SLURM_PROCID of $SLURM_NTASKS: $*" >> "$TASK_LOG"
[ -z "$TASK_EXIT" ] || exit "$TASK_EXIT"
while true; do sleep 0.05; done
"""


@pytest.mark.parametrize('signal_name, task_exit, code', [('USR1', '', 75), ('TERM', '', 75), (None, '1', 1)])
def test_slurm_script_passes_its_signal_to_the_tasks_and_requeues_when_they_stopped(tmp_path, signal_name,
                                                                                    task_exit, code):
    import signal
    import time
    (tmp_path / 'bin').mkdir()
    (tmp_path / 'bin' / 'python').write_text(FAKE_MAIN)
    (tmp_path / 'bin' / 'python').chmod(0o755)
    log, requeues = tmp_path / 'tasks', tmp_path / 'scontrol'
    env = {**os.environ, 'PATH': f'{REPO / "tests" / "slurm"}:{tmp_path / "bin"}:{os.environ["PATH"]}',
           'SLURM_JOB_ID': '1234', 'SLURM_JOB_NODELIST': 'node[0-1]', 'SLURM_NTASKS': '2', 'SLURM_CPUS_PER_TASK': '10',
           'DATA_PATH': '/data', 'TASK_LOG': str(log), 'TASK_EXIT': task_exit, 'SCONTROL_LOG': str(requeues)}
    job = subprocess.Popen(['bash', str(SCRIPTS / 'slurm_pretrain.sbatch'), '--epochs', '3'], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and log.read_text().count('\n') == 2) and job.poll() is None:
            assert time.monotonic() < deadline, 'the tasks did not start'
            time.sleep(0.05)  # until both tasks have started
        if signal_name:
            job.send_signal(getattr(signal, f'SIG{signal_name}'))  # SLURM's --signal=B:USR1@120, or a SIGTERM
        out, err = job.communicate(timeout=30)
    finally:
        job.kill()
    lines = log.read_text().splitlines()
    started, signalled = sorted(x for x in lines if ' of 2: ' in x), sorted(x for x in lines if ' of 2: ' not in x)
    assert job.returncode == code, out + err
    assert started[0].startswith('task 0 of 2: main.py --model vit5_base') and started[1].startswith('task 1 of 2: main.py')
    args = started[0].split()
    assert args[-2:] == ['--epochs', '3']  # the script's arguments come last, so they win
    assert '--auto-resume' in args
    if signal_name:
        assert signalled == [f'task 0: {signal_name}', f'task 1: {signal_name}']
        assert requeues.read_text() == 'requeue 1234\n' and 'requeueing job 1234' in out
    else:
        assert not requeues.exists()


# ---- prepare_digits: the quick start's data ------------------------------------------------------
@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp('digits')
    proc = run_script('prepare_digits.py', '--out', out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_prepare_digits_counts_and_split(digits):
    files = {split: sorted(p.relative_to(digits / split).as_posix() for p in (digits / split).rglob('*.png'))
             for split in ('train', 'val')}
    assert len(files['train']) + len(files['val']) == 1797
    assert len(files['val']) == 360  # 20%, stratified
    for split in files:
        assert sorted(p.name for p in (digits / split).iterdir()) == [str(d) for d in range(10)]
    img = Image.open(digits / 'val' / files['val'][0])
    assert img.size == (32, 32) and img.mode == 'RGB'
    # the split is a fixed function of the seed: recomputing it here gives the same files
    from sklearn.datasets import load_digits
    target = load_digits().target
    _, val = split_indices(target, 0.2, seed=0)
    assert files['val'] == sorted(f'{target[i]}/{i:04d}.png' for i in val)
    assert_one_line_error(run_script('prepare_digits.py', '--out', digits))  # refuses to overwrite


# ---- plot_log ------------------------------------------------------------------------------------
def test_plot_log_png(tmp_path):
    logs = []
    for run, gain in (('full', 1.0), ('no_rope', 0.8)):
        (tmp_path / run).mkdir()
        rows = [dict(epoch=e, train_lr=1e-3 / (e + 1), train_loss=2.3 / (e + 1), test_loss=1.0,
                     test_acc1=gain * 10 * e, test_acc5=100.0, test_acc1_ema=gain * 9 * e, test_acc5_ema=100.0,
                     n_parameters=1) for e in range(5)]
        (tmp_path / run / 'log.txt').write_text(''.join(json.dumps(r) + '\n' for r in rows))
        logs.append(tmp_path / run / 'log.txt')
    out = tmp_path / 'curves.png'
    proc = run_script('plot_log.py', *logs, '--out', out, '--title', 'ablation')
    assert proc.returncode == 0, proc.stderr
    assert 'full' in proc.stdout and 'best top-1 40.00' in proc.stdout
    with Image.open(out) as img:
        assert img.format == 'PNG' and img.size == (1000, 700)


# ---- a real (tiny) training run, then convert and visualise its checkpoint ----------------------
@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """main.py for one epoch on 4 digit classes x 10 images; its real checkpoint and log."""
    from sklearn.datasets import load_digits
    data = load_digits()
    root, out = tmp_path_factory.mktemp('subset'), tmp_path_factory.mktemp('run')
    for split, start in (('train', 0), ('val', 500)):
        for k in range(4):
            folder = root / split / str(k)
            folder.mkdir(parents=True)
            for i in [i for i in range(start, len(data.target)) if data.target[i] == k][:10]:
                to_image(data.images[i], 32).save(folder / f'{i}.png')
    argv = ['--model', 'vit5_tiny', '--model-kwargs', *[f'{k}={v}' for k, v in TINY_KWARGS.items()],
            '--input-size', '32', '--device', 'cpu', '--num_workers', '0', '--data-set', 'FOLDER',
            '--data-path', root, '--output_dir', out, '--epochs', '1', '--batch', '8',
            '--model-ema-decay', '0.5']
    proc = run_cli(argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_plot_log_reads_main_py_log(trained, tmp_path):
    proc = run_script('plot_log.py', trained, '--out', tmp_path / 'c.png')
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / 'c.png').size == (1000, 700)


def run_inprocess(script_main, *args):
    """A script's main(argv) in this process (no interpreter start-up, torch already imported):
    (exit code, stdout, stderr) as the command would give them."""
    import contextlib
    import io
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            script_main([str(a) for a in args])
        except SystemExit as e:  # sys.exit('message') prints the message and exits with 1
            code = e.code if isinstance(e.code, int) else 1
            if isinstance(e.code, str):
                err.write(e.code + '\n')
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def reference_model(state_dict):
    import timm
    import models_vit5  # noqa: F401
    model = timm.create_model('vit5_tiny', num_classes=4, img_size=32, **TINY_KWARGS)
    model.load_state_dict(models_vit5.checkpoint_filter_fn(state_dict, model))
    return model.eval()


def load_exported(path):
    """The file through timm's pretrained path (strict when the class count matches), and directly."""
    import timm
    from safetensors.torch import load_file
    import models_vit5  # noqa: F401  registers vit5_tiny
    model = timm.create_model('vit5_tiny', pretrained=True, num_classes=4, img_size=32, **TINY_KWARGS,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=4)).eval()
    model.load_state_dict(load_file(str(path)), strict=True)  # no key missing or extra
    return model


@torch.no_grad()
def test_convert_checkpoint_loads_strictly_with_same_logits(trained, tmp_path):
    import convert_checkpoint
    import checkpoint
    ckpt = checkpoint.load_checkpoint(str(trained / 'checkpoint.pth'))
    x = torch.randn(2, 3, 32, 32)

    out = tmp_path / 'w.safetensors'
    proc = run_script('convert_checkpoint.py', trained / 'checkpoint.pth', '--out', out)
    assert proc.returncode == 0, proc.stderr
    assert 'timm.create_model(' in proc.stdout
    assert torch.equal(load_exported(out)(x), reference_model(ckpt['model'])(x))

    ema_out = tmp_path / 'ema.safetensors'
    proc = run_inprocess(convert_checkpoint.main, trained / 'checkpoint.pth', '--ema', '--out', ema_out)
    assert proc.returncode == 0, proc.stderr
    ema = load_exported(ema_out)(x)
    assert torch.equal(ema, reference_model(ckpt['model_ema'])(x))
    assert not torch.equal(ema, reference_model(ckpt['model'])(x))  # EMA decay 0.5: other weights


def test_convert_checkpoint_summary_and_prefixes(trained, tmp_path):
    import convert_checkpoint
    import checkpoint
    from safetensors.torch import load_file
    ckpt = checkpoint.load_checkpoint(str(trained / 'checkpoint.pth'))
    ckpt['model'] = {f'module._orig_mod.{k}': v for k, v in ckpt['model'].items()}  # DDP + compile
    del ckpt['model_ema']
    ckpt['batches_done'] = 3  # as a --save-interval checkpoint
    src = tmp_path / 'prefixed.pth'
    torch.save(ckpt, src)
    proc = run_inprocess(convert_checkpoint.main, src, '--summary')
    assert proc.returncode == 0, proc.stderr
    for text in ('model:         vit5_tiny', 'epoch:         0', 'mid-epoch:     3 batches of epoch 0 trained',
                 'EMA weights:   no', 'tensors',
                 "  model_kwargs = {'patch_size': 8, 'depth': 2, 'embed_dim': 64, 'num_heads': 2}",
                 "  epochs = 1", "  eval_crop_ratio = 0.875"):
        assert text in proc.stdout
    # short: the model's and the recipe's arguments, not all ~90; the accuracy rounded
    assert len(proc.stdout.splitlines()) < 40 and 'wandb' not in proc.stdout and 'dist_url' not in proc.stdout
    assert f"max accuracy:  {ckpt['max_accuracy']:.2f}%\n" in proc.stdout
    assert not list(tmp_path.glob('*.safetensors'))  # --summary alone writes nothing
    assert run_inprocess(convert_checkpoint.main, src).returncode == 0  # default output name
    keys = load_file(str(tmp_path / 'prefixed.safetensors'))
    assert 'cls_token' in keys and not any(k.startswith(('module.', '_orig_mod.')) for k in keys)
    assert_one_line_error(run_inprocess(convert_checkpoint.main, src, '--ema'))  # no EMA in this file
    assert_one_line_error(run_inprocess(convert_checkpoint.main, REPO / 'pytest.ini'))  # not a checkpoint


def run_printed_loading_lines(stdout: str) -> dict:
    """The Python convert_checkpoint.py prints after 'load it with timm', run as a user pastes it:
    its names (model, transform)."""
    import textwrap
    code = textwrap.dedent(stdout.split('load it with timm', 1)[1].split('\n', 1)[1])
    scope = {}
    exec(code, scope)
    return scope


@torch.no_grad()
def timm_correct(model, transform, val_root) -> tuple:
    """(correct, images) of `model` on an image folder read through `transform` (timm's pipeline)."""
    from torchvision.datasets import ImageFolder
    images, labels = zip(*ImageFolder(str(val_root), transform=transform))
    preds = model(torch.stack(images)).argmax(1)
    return int((preds == torch.tensor(labels)).sum()), len(labels)


@pytest.fixture(scope='module')
def trained_48(tmp_path_factory):
    """main.py (in-process) for four epochs at 48 px with --eval-crop-ratio 0.9 on crops of the two sample
    photos (the class: which photo), of many sizes and shapes, so the evaluation resizes and crops."""
    import numpy as np
    from photos import photo_arrays, photo_crop
    from tinyrun import TINY, run_main
    root, out = tmp_path_factory.mktemp('photos'), tmp_path_factory.mktemp('run48')
    rng = np.random.default_rng(0)
    for k, photo in enumerate(photo_arrays()):
        for split, n in (('train', 8), ('val', 6)):
            (root / split / f'photo{k}').mkdir(parents=True)
            for i in range(n):
                photo_crop([photo, photo], rng, 40, 160).save(root / split / f'photo{k}' / f'{i}.png')
    run_main(TINY + ['--data-path', root, '--output_dir', out, '--epochs', 4, '--input-size', 48,
                     '--eval-crop-ratio', 0.9, '--no-model-ema', '--lr', 3e-3, '--unscale-lr', '--warmup-epochs', 0,
                     '--mixup', 0, '--cutmix', 0, '--reprob', 0, '--aa', 'none'])
    return out


@pytest.mark.parametrize('run', ['trained', 'trained_48'])
def test_converted_weights_in_timms_pipeline_score_as_main_py_eval(run, request, tmp_path):
    """The loading lines convert_checkpoint.py prints give a model and timm's standard transform
    (resolve_data_config + create_transform) that see the held-out images exactly as main.py --eval does,
    and score its top-1: at 32 px (no resize) and at 48 px (resize to 53, centre crop)."""
    import convert_checkpoint
    import checkpoint
    from datasets import build_transform
    from tinyrun import run_main
    ckpt_path = request.getfixturevalue(run) / 'checkpoint.pth'
    args = checkpoint.load_checkpoint(str(ckpt_path))['args']
    val = os.path.join(args.data_path, 'val')
    stats, _ = run_main(['--eval', '--resume', ckpt_path, '--data-set', 'FOLDER', '--data-path', args.data_path,
                         '--device', 'cpu', '--num_workers', 0])

    proc = run_inprocess(convert_checkpoint.main, ckpt_path, '--out', tmp_path / 'w.safetensors')
    assert proc.returncode == 0, proc.stderr
    scope = run_printed_loading_lines(proc.stdout)
    model, transform = scope['model'], scope['transform']
    from safetensors import safe_open
    with safe_open(str(tmp_path / 'w.safetensors'), 'pt') as f:
        written = json.loads(f.metadata()['pretrained_cfg'])  # the file carries the same config
    assert {k: model.pretrained_cfg[k] for k in written} == {k: tuple(v) if isinstance(v, list) else v
                                                             for k, v in written.items()}
    ours = build_transform(False, args)
    for path in sorted(p for p in Path(val).rglob('*.png'))[:12]:
        with Image.open(path) as img:
            assert torch.equal(transform(img.convert('RGB')), ours(img.convert('RGB'))), path
    correct, n = timm_correct(model, transform, val)
    assert n == stats['n'] and 100 * correct / n == pytest.approx(stats['acc1'], abs=1e-9)


# ---- visualize_attention -------------------------------------------------------------------------
@pytest.fixture
def image(tmp_path):
    path = tmp_path / 'img.png'
    Image.new('RGB', (50, 40), (200, 30, 30)).save(path)
    return path


def test_visualize_attention_from_checkpoint(trained, image, tmp_path):
    out = tmp_path / 'att.png'
    proc = run_script('visualize_attention.py', image, '--checkpoint', trained / 'checkpoint.pth',
                      '--layers', '0', '-1', '--ema', '--out', out)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as img:  # 2 layers x (image, cls, 4 registers), 200 x 230 px a panel
        assert img.format == 'PNG' and img.size == (6 * 200, 2 * 230)


def test_visualize_attention_random_init_per_head(image, tmp_path):
    import visualize_attention
    out = tmp_path / 'heads.png'
    model = ['--model', 'vit5_tiny', '--input-size', '32', '--model-kwargs',
             *[f'{k}={v}' for k, v in TINY_KWARGS.items()], 'num_registers=0']
    proc = run_inprocess(visualize_attention.main, image, *model, '--heads', 'all', '--out', out)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as img:  # 2 heads x (image, cls)
        assert img.size == (2 * 200, 2 * 230)
    assert_one_line_error(run_inprocess(visualize_attention.main, image, *model, '--layers', '5'))


def test_visualize_attention_reads_the_token_layout():
    # the model's order: cls, registers, then the row-major patches (prefix = 1 + R tokens)
    import visualize_attention
    import models_vit5
    model = models_vit5.VisionTransformer5(img_size=(16, 24), patch_size=8, embed_dim=32, depth=1, num_heads=2)
    maps, grid = model.get_attention_maps(torch.randn(1, 3, 16, 24))
    assert grid == (2, 3) and maps[0].shape[-1] == model.num_prefix_tokens + 6
    probs = torch.zeros(1, 2, 11, 11)
    probs[0, :, 0, 5 + 1 * 3 + 2] = 1  # cls looks at the patch in row 1, column 2
    probs[0, :, 3, 2] = 1  # register 2 looks at register 1 only
    probs[0, :, 1, [0, 5]] = 0.5  # register 0: half on cls, half on the first patch
    per_head, shares = visualize_attention.query_maps(probs, (2, 3), num_registers=4)
    assert per_head.shape == (2, 5, 2, 3)
    assert per_head[0, 0, 1, 2] == 1 and per_head[0, 0].sum() == 1
    assert shares[0].tolist() == [1.0, 0.5, 0.0, 0.0, 0.0]
