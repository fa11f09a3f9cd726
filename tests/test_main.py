"""main.py end to end on CPU: the released flags, exact resume, evaluation, fine-tuning, the command
line and every kind of bad input."""
import argparse
import importlib.util
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import types
import warnings
from pathlib import Path

import pytest
import torch

import checkpoint
import main
import utils
from tinyrun import (REPO, TINY, make_image_folder, one_thread, parse, read_log, resume_and_compare, run_cli,
                     run_keeping_checkpoints, run_main)

# every flag the released recipe names (copied from the spec, which users do not have)
SPEC_FLAGS = [
    '--ThreeAugment', '--aa', '--accum_iter', '--attn-only', '--batch-size', '--bce-loss', '--clip-grad',
    '--color-jitter', '--cooldown-epochs', '--cosub', '--cutmix', '--cutmix-minmax', '--data-path',
    '--data-set', '--decay-epochs', '--decay-rate', '--device', '--disable_wandb', '--dist-eval',
    '--dist_url', '--distillation-alpha', '--distillation-tau', '--distillation-type', '--distributed',
    '--drop', '--drop-path', '--epochs', '--eval', '--eval-crop-ratio', '--finetune', '--flash',
    '--if_wandb', '--inat-category', '--input-size', '--load_ema', '--lr', '--lr-noise', '--lr-noise-pct',
    '--lr-noise-std', '--min-lr', '--mixup', '--mixup-mode', '--mixup-prob', '--mixup-switch-prob',
    '--model', '--model-ema', '--model-ema-decay', '--model-ema-force-cpu', '--momentum', '--no-flash',
    '--no-model-ema', '--no-pin-mem', '--no-repeated-aug', '--no-train-mode', '--num_workers', '--opt',
    '--opt-betas', '--opt-eps', '--output_dir', '--patience-epochs', '--pin-mem', '--recount', '--remode',
    '--repeated-aug', '--reprob', '--resplit', '--resume', '--sched', '--seed', '--smoothing', '--src',
    '--start_epoch', '--teacher-model', '--teacher-path', '--train-interpolation', '--train-mode',
    '--unscale-lr', '--wandb_entity', '--wandb_key', '--wandb_project', '--wandb_resume', '--warmup-epochs',
    '--warmup-lr', '--weight-decay', '--world_size',
]

PRETRAIN = ('torchrun --nproc_per_node 8 main.py --model vit5_small --input-size 224 --data-path IMNET '
            '--output_dir OUT --batch 256 --accum_iter 1 --lr 4e-3 --weight-decay 0.05 --epochs 800 '
            '--opt fusedlamb --unscale-lr --mixup .8 --cutmix 1.0 --color-jitter 0.3 --drop-path 0.05 '
            '--reprob 0.0 --smoothing 0.0 --ThreeAugment --repeated-aug --bce-loss --warmup-epochs 5 '
            '--eval-crop-ratio 1.0 --dist-eval --disable_wandb')
FINETUNE = ('torchrun --nproc_per_node 8 main.py --model vit5_small --finetune CKPT --data-path DATA '
            '--output_dir OUT --batch 64 --lr 1e-5 --weight-decay 0.1 --epochs 20 --unscale-lr '
            '--aa rand-m9-mstd0.5-inc1 --drop-path 0.05 --reprob 0.0 --smoothing 0.1 --no-repeated-aug '
            '--dist-eval --load_ema --eval-crop-ratio 1.0 --disable_wandb')
RELEASED = {
    'pretrain_small': PRETRAIN,
    'pretrain_base': PRETRAIN.replace('vit5_small --input-size 224', 'vit5_base --input-size 192')
                             .replace('--lr 4e-3', '--lr 3e-3').replace('--drop-path 0.05', '--drop-path 0.2'),
    'pretrain_large': PRETRAIN.replace('vit5_small --input-size 224', 'vit5_large --input-size 192')
                              .replace('--lr 4e-3', '--lr 3e-3').replace('--epochs 800', '--epochs 400')
                              .replace('--drop-path 0.05', '--drop-path 0.35'),
    'finetune_small': FINETUNE,
    'finetune_base': FINETUNE.replace('vit5_small', 'vit5_base').replace('--drop-path 0.05', '--drop-path 0.25'),
    'finetune_large': FINETUNE.replace('vit5_small', 'vit5_large').replace('--drop-path 0.05', '--drop-path 0.5'),
}

# the released pretraining recipe, shrunk (batch, epochs, warmup); EMA decay lowered so it visibly differs
PRETRAIN_TINY = ['--batch', 8, '--accum_iter', 1, '--lr', 4e-3, '--weight-decay', 0.05, '--epochs', 3,
                 '--opt', 'fusedlamb', '--unscale-lr', '--mixup', .8, '--cutmix', 1.0, '--color-jitter', 0.3,
                 '--drop-path', 0.05, '--reprob', 0.0, '--smoothing', 0.0, '--ThreeAugment', '--repeated-aug',
                 '--bce-loss', '--eval-crop-ratio', 1.0, '--dist-eval', '--disable_wandb',
                 '--model-ema-decay', 0.9]


# ---- the command line ---------------------------------------------------------------------------
@pytest.mark.parametrize('name', sorted(RELEASED))
def test_released_commands_parse_unchanged(name):
    argv = shlex.split(RELEASED[name])[4:]  # drop `torchrun --nproc_per_node 8 main.py`
    args = parse(argv)
    assert args.batch_size == int(argv[argv.index('--batch') + 1])  # --batch abbreviates --batch-size
    assert args.eval_crop_ratio == 1.0 and args.dist_eval and not args.if_wandb and args.unscale_lr
    if name.startswith('pretrain'):
        assert args.ThreeAugment and args.repeated_aug and args.bce_loss and args.opt == 'fusedlamb'
        assert (args.mixup, args.cutmix, args.smoothing, args.reprob) == (0.8, 1.0, 0.0, 0.0)
    else:
        assert args.finetune == 'CKPT' and args.load_ema and not args.repeated_aug and args.smoothing == 0.1
        assert args.aa == 'rand-m9-mstd0.5-inc1' and args.epochs == 20


def test_no_abbreviations_and_batch_is_an_explicit_alias(capsys):
    assert parse(['--batch', 8]).batch_size == parse(['--batch-size', 8]).batch_size == 8
    for abbreviation in (['--epoch', '1'], ['--warmup', '1'], ['--batch-s', '8'], ['--mod', 'vit5_tiny']):
        # the command line's own entry point, in this process (a `python main.py` costs seconds of imports)
        with pytest.raises(SystemExit) as stop:
            main.cli(abbreviation)  # argparse would take these as --epochs, ... if abbreviations were on
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count('\n') == 1, err
        assert f'unrecognized arguments: {abbreviation[0]}' in err


def test_every_flag_destination_appears_in_the_code():
    """A guard against dead flags, by a regex over the source: each option's destination appears as
    args.<dest> in main.py, utils.py or datasets.py. (What the flags do is checked by the recipe tests.)"""
    source = ''.join((REPO / f).read_text() for f in ('main.py', 'utils.py', 'datasets.py'))
    dests = {a.dest for a in main.get_args_parser()._actions if a.dest != 'help'}
    unread = sorted(d for d in dests if not re.search(rf'args\.{d}\b', source))
    assert not unread, unread


def test_spec_flags_all_exist():
    known = {s for a in main.get_args_parser()._actions for s in a.option_strings}
    assert set(SPEC_FLAGS) <= known


def test_new_flags_parse():
    args = parse(['--model-kwargs', 'qk_norm=False', 'num_registers=0', 'mlp_type=swiglu', '--nb-classes', 7,
                  '--amp-dtype', 'float16', '--compile', '--auto-resume', '--layer-decay', 0.75,
                  '--device', 'cpu', '--data-set', 'CIFAR10', '--flash', '--no-model-ema'])
    assert args.model_kwargs == dict(qk_norm=False, num_registers=0, mlp_type='swiglu')
    assert (args.nb_classes, args.amp_dtype, args.layer_decay, args.data_set) == (7, 'float16', 0.75, 'CIFAR10')
    assert args.compile and args.auto_resume and args.flash and not args.model_ema
    defaults = parse([])
    assert defaults.amp_dtype is None and not defaults.flash and defaults.model_ema and defaults.repeated_aug
    assert defaults.device == ('cuda' if torch.cuda.is_available() else 'cpu')
    device, dtype = main.resolve_device(parse(['--device', 'cpu']))
    assert device.type == 'cpu' and dtype == torch.float32  # bf16 is the default on CUDA only


def test_lr_schedule_epoch_e_trains_at_value_e_and_resumes():
    args = parse(['--epochs', 10, '--warmup-epochs', 2, '--cooldown-epochs', 2, '--lr', 1e-3, '--min-lr', 1e-5])
    model = torch.nn.Linear(4, 2)
    opt = main.build_optimizer(args, model, torch.device('cpu'))
    sched = main.build_scheduler(args, opt)
    lrs = []
    for epoch in range(10):
        main.schedule(sched, args, epoch)
        lrs.append(opt.param_groups[0]['lr'])
    assert lrs[0] == pytest.approx(1e-6) and lrs[0] < lrs[1] < lrs[2]  # warmup: no two epochs share an lr
    assert lrs[2] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 2 / 8)))  # cosine over 8
    assert lrs[7] > lrs[8] == lrs[9] == pytest.approx(1e-5)  # two cooldown epochs at --min-lr
    opt2 = main.build_optimizer(args, model, torch.device('cpu'))
    sched2 = main.build_scheduler(args, opt2)
    sched2.load_state_dict(sched.state_dict())
    main.schedule(sched2, args, 5)
    assert opt2.param_groups[0]['lr'] == lrs[5]


# ---- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def pretrain(data, tmp_path_factory):
    """3 epochs of the released pretraining flags (4 steps each), a checkpoint every 3 optimizer steps."""
    out = tmp_path_factory.mktemp('pretrain')
    argv = TINY + ['--data-path', data, '--output_dir', out] + PRETRAIN_TINY + ['--save-interval', 3]
    return types.SimpleNamespace(out=out, argv=argv, stdout=run_keeping_checkpoints(argv))


def test_pretraining_flags_end_to_end(pretrain):
    log = read_log(pretrain.out)
    assert [e['epoch'] for e in log] == [0, 1, 2]
    for key in ('train_lr', 'train_loss', 'test_loss', 'test_acc1', 'test_acc5', 'test_acc1_ema',
                'test_acc5_ema', 'epoch', 'n_parameters'):
        assert all(key in e for e in log), key
    assert (pretrain.out / 'args.json').exists() and (pretrain.out / 'best_checkpoint.pth').exists()
    out = pretrain.stdout
    assert "timm's LAMB" in out  # fusedlamb without apex: one-line notice
    assert re.search(r'\* Acc@1 [\d.]+ Acc@5 [\d.]+ loss [\d.]+', out)
    assert 'Accuracy of the network on the 9 test images' in out
    progress = [line for line in out.splitlines() if line.startswith('Epoch: [0] [')]
    assert progress and all(k in progress[0] for k in ('eta:', 'lr:', 'loss:', 'img/s:', 'data:', 'max mem:'))
    ckpt = checkpoint.load_checkpoint(str(pretrain.out / 'checkpoint.pth'))
    assert {'model', 'model_ema', 'optimizer', 'lr_scheduler', 'scaler', 'epoch', 'batches_done', 'world_size',
            'args', 'max_accuracy'} == set(ckpt) and ckpt['batches_done'] is None
    assert isinstance(ckpt['args'], argparse.Namespace) and ckpt['epoch'] == 2
    assert ckpt['max_accuracy'] == max(e['test_acc1'] for e in log)
    # epoch e trained at the scheduler's value for e: the warmup lr in epoch 0 only
    assert log[0]['train_lr'] == pytest.approx(1e-6)
    assert log[1]['train_lr'] == pytest.approx(1e-5 + 0.5 * (4e-3 - 1e-5) * (1 + math.cos(math.pi / 3)))


@pytest.mark.parametrize('epoch, batch', [(0, None), (1, None), (1, 2)])
def test_resume_is_exact(pretrain, tmp_path, epoch, batch):
    """Stopped after an epoch, or after batch 2 of epoch 1 (--save-interval 3: the 6th optimizer step),
    resumed with the same command: bit-identical model and EMA at the end, the same log lines."""
    assert sorted(p.name for p in pretrain.out.glob('checkpoint.pth.*')) == [
        'checkpoint.pth.epoch0', 'checkpoint.pth.epoch0.batch3', 'checkpoint.pth.epoch1',
        'checkpoint.pth.epoch1.batch2', 'checkpoint.pth.epoch2', 'checkpoint.pth.epoch2.batch1']
    resume_and_compare(pretrain.argv, pretrain.out, epoch, tmp_path, batch)


@pytest.fixture(scope='module')
def photo_data(tmp_path_factory):
    """An image folder of real photo crops (JPEG, 40 to 160 px a side): 3 classes of 4 train and 2 val images."""
    from photos import photo_folder
    return photo_folder(tmp_path_factory.mktemp('photos'), train=4, val=2, seed=3)


@pytest.mark.parametrize('pipeline', ['cpu', 'gpu'])
def test_mid_epoch_resume_is_exact_whatever_the_workers(photo_data, tmp_path, pipeline, monkeypatch):
    """--save-interval, both data pipelines, on photos: resumed after batch 3 of epoch 0 with a DataLoader
    worker where the first run had none, the run ends bit-identical to the uninterrupted one. Each image's
    draws (crop, flip, one-of, jitter; the gpu pipeline's parameters) come from its seed and position in the
    epoch, whichever process decodes it; the batch's mixup and drop path from (seed, epoch, batch)."""
    # one compute thread in both runs: main.py otherwise gives compute the cores the workers leave, and
    # another thread count sums in another order
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    out = tmp_path / 'run'
    argv = TINY + ['--data-path', photo_data, '--output_dir', out] + PRETRAIN_TINY + [
        '--epochs', 1, '--save-interval', 3, '--data-pipeline', pipeline, '--input-size', 48]  # resized, not CIFAR-padded
    run_keeping_checkpoints(argv)
    resume_and_compare(argv + ['--num_workers', 1], out, 0, tmp_path, batch=3)


def test_auto_resume_falls_back_from_a_truncated_checkpoint(pretrain, tmp_path, capsys):
    """The newest checkpoint cut short (a full disk, a node lost before the file system caught up): the
    command says so in one line, resumes from the one before it and ends bit-identical to the full run."""
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(pretrain.out / 'checkpoint.pth.epoch1', run / 'previous_checkpoint.pth')
    raw = (pretrain.out / 'checkpoint.pth.epoch1.batch2').read_bytes()
    (run / 'checkpoint.pth').write_bytes(raw[:len(raw) * 2 // 3])
    argv = [a if a != pretrain.out else run for a in pretrain.argv] + ['--auto-resume']
    capsys.readouterr()
    with one_thread():
        assert main.cli([str(a) for a in argv]) == 0
    out, err = capsys.readouterr()
    assert 'Traceback' not in out + err and err == ''
    newest, previous = run / 'checkpoint.pth', run / 'previous_checkpoint.pth'
    assert [line for line in out.splitlines() if 'esuming' in line] == [
        f'{newest} is truncated or not a PyTorch checkpoint (PytorchStreamReader failed reading zip archive: '
        f'failed finding central directory): resuming from the one before, {previous}',
        f'Auto-resuming from {previous} with the settings it was trained with, writing to {run}; no setting '
        f'changed'], out
    full, resumed = (checkpoint.load_checkpoint(str(d / 'checkpoint.pth')) for d in (pretrain.out, run))
    for key in ('model', 'model_ema'):
        assert all(torch.equal(t, resumed[key][name]) for name, t in full[key].items()), key
    assert read_log(run) == read_log(pretrain.out)[2:]


def test_mid_epoch_checkpoint_with_another_batch_size_continues_after_as_many_images(pretrain, tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(pretrain.out / 'checkpoint.pth.epoch1.batch2', run / 'checkpoint.pth')
    argv = [a if a != pretrain.out else run for a in pretrain.argv]
    _, out = run_main(argv + ['--resume', run / 'checkpoint.pth', '--batch', 4, '--epochs', 2])
    assert (f'{run / "checkpoint.pth"} stopped at batch 2 of epoch 1 with 1 process(es) x batch 8; with 1 x 4 the '
            f'epoch continues at batch 4, after as many images') in out
    assert 'Training for 2 epochs from epoch 1, batch 4' in out and [e['epoch'] for e in read_log(run)] == [1]


def test_auto_resume_picks_up_output_checkpoint(pretrain, tmp_path):
    shutil.copy(pretrain.out / 'checkpoint.pth', tmp_path / 'checkpoint.pth')
    argv = [a if a != pretrain.out else tmp_path for a in pretrain.argv]
    # a requeued job whose run already finished: says so and ends without error
    stats, out = run_main(argv + ['--auto-resume'])
    assert stats == {} and 'Nothing left to train' in out and 'epoch 2, the last of --epochs 3' in out
    stats, out = run_main(argv + ['--auto-resume', '--epochs', 4])
    assert 'Auto-resuming' in out and 'from epoch 3' in out and stats['epoch'] == 3


def test_eval_of_model_and_ema_weights(pretrain, data):
    last = read_log(pretrain.out)[-1]
    ckpt = pretrain.out / 'checkpoint.pth'
    base = TINY + ['--data-path', data, '--eval', '--resume', ckpt, '--batch', 8]
    stats, out = run_main(base)
    assert stats['acc1'] == pytest.approx(last['test_acc1']) and stats['loss'] == pytest.approx(last['test_loss'])
    assert 'Accuracy of the network on the 9 test images' in out
    assert 'EMA' not in out
    ema_stats, out = run_main(base + ['--load_ema'])
    assert ema_stats['loss'] == pytest.approx(last['test_loss_ema'])
    assert ema_stats['loss'] != pytest.approx(stats['loss'])
    assert f'Evaluating the EMA weights (model_ema) of {ckpt}\n' in out  # says which weights it scores


def test_finetune_at_another_size_from_ema(pretrain, data, tmp_path):
    """Released fine-tuning flags from the 32 px checkpoint at 48 px, with a 5-class head."""
    ckpt = str(pretrain.out / 'checkpoint.pth')
    data48 = make_image_folder(tmp_path / 'data48', size=48)
    argv = TINY + ['--input-size', 48, '--finetune', ckpt, '--data-path', data48, '--output_dir', tmp_path / 'ft',
                   '--batch', 8, '--lr', 1e-5, '--weight-decay', 0.1, '--epochs', 1, '--unscale-lr',
                   '--aa', 'rand-m9-mstd0.5-inc1', '--drop-path', 0.05, '--reprob', 0.0, '--smoothing', 0.1,
                   '--no-repeated-aug', '--dist-eval', '--load_ema', '--eval-crop-ratio', 1.0, '--disable_wandb',
                   '--nb-classes', 5]
    _, out = run_main(argv)
    summary = [line for line in out.splitlines() if line.startswith('Fine-tuning from')]
    assert summary == [f'Fine-tuning from {ckpt} (EMA weights): loaded 36 of 38 tensors; pos_embed resampled '
                       f'2x2 -> 3x3; dropped head.weight, head.bias (3 classes in the file, 5 in the model)']
    src = checkpoint.load_checkpoint(ckpt)['model_ema']
    tuned = checkpoint.load_checkpoint(str(tmp_path / 'ft' / 'checkpoint.pth'))
    assert tuned['model']['pos_embed'].shape == (1, 9, 48) and src['pos_embed'].shape == (1, 4, 48)
    assert tuned['model']['head.weight'].shape == (5, 48)
    assert len(read_log(tmp_path / 'ft')) == 1


def test_wandb_only_when_asked(data, tmp_path, monkeypatch, capsys):
    calls = []
    fake = types.SimpleNamespace(
        login=lambda **kw: calls.append(('login', kw)),
        init=lambda **kw: calls.append(('init', kw)) or types.SimpleNamespace(
            log=lambda stats, step: calls.append(('log', step)), finish=lambda: calls.append(('finish',))))
    monkeypatch.setitem(sys.modules, 'wandb', fake)
    argv = TINY + ['--data-path', data, '--batch', 8, '--epochs', 1, '--no-repeated-aug', '--mixup', 0,
                   '--cutmix', 0, '--no-model-ema']
    run_main(argv + ['--output_dir', tmp_path / 'a', '--if_wandb', '--wandb_key', 'k', '--wandb_resume', 'run7'])
    assert [c[0] for c in calls] == ['login', 'init', 'log', 'finish']
    assert calls[1][1]['id'] == 'run7' and calls[1][1]['config']['epochs'] == 1
    # without the package: runs unless asked for (so it is imported only then), else a one-line error
    monkeypatch.setitem(sys.modules, 'wandb', None)
    run_main(argv + ['--output_dir', tmp_path / 'b', '--if_wandb', '--disable_wandb'])
    assert 'pip install wandb' in cli_error(argv + ['--output_dir', tmp_path / 'c', '--if_wandb'], capsys)


def test_plain_command_trains(data, tmp_path):
    argv = TINY + ['--data-path', data, '--output_dir', tmp_path, '--batch', 8, '--epochs', 1,
                   '--no-repeated-aug', '--mixup', 0, '--cutmix', 0]
    proc = run_cli(argv)
    assert proc.returncode == 0, proc.stderr
    assert 'Accuracy of the network on the 9 test images' in proc.stdout
    assert len(read_log(tmp_path)) == 1 and (tmp_path / 'checkpoint.pth').exists()


# ---- bad input: one line on stderr, exit code 2, no traceback --------------------------------
def cli_error(argv, capsys, code=2):
    capsys.readouterr()
    sigterm = signal.getsignal(signal.SIGTERM)
    with one_thread():
        rc = main.cli([str(a) for a in argv])
    assert signal.getsignal(signal.SIGTERM) is sigterm  # the command's stop-signal handling ends with it
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert err.startswith('error: ') and '\n' not in err and 'Traceback' not in err
    return err


@pytest.fixture
def tiny_ckpt(pretrain):
    return str(pretrain.out / 'checkpoint.pth')


def test_missing_and_empty_data_path(tmp_path, capsys):
    err = cli_error(TINY + ['--data-path', tmp_path / 'nowhere'], capsys)
    assert str(tmp_path / 'nowhere') in err
    (tmp_path / 'empty' / 'train' / 'cat').mkdir(parents=True)
    (tmp_path / 'empty' / 'val' / 'cat').mkdir(parents=True)
    err = cli_error(TINY + ['--data-path', tmp_path / 'empty'], capsys)
    assert 'no images' in err and str(tmp_path / 'empty') in err


def test_input_size_not_divisible_by_patch(data, capsys):
    err = cli_error(TINY + ['--data-path', data, '--input-size', 40, '--batch', 8], capsys)
    assert '40' in err and 'patch size 16' in err


def test_bad_model_kwargs(data, capsys):
    assert 'foo' in cli_error(TINY + ['--data-path', data, '--batch', 8, '--model-kwargs', 'foo=1'], capsys)


def test_truncated_and_foreign_checkpoints(data, tiny_ckpt, tmp_path, capsys):
    raw = Path(tiny_ckpt).read_bytes()
    (tmp_path / 'cut.pth').write_bytes(raw[:len(raw) // 2])
    (tmp_path / 'notes.pth').write_text('not a checkpoint\n')
    for flag, name in (('--resume', 'cut.pth'), ('--finetune', 'notes.pth'), ('--resume', 'nothing.pth')):
        err = cli_error(TINY + ['--data-path', data, flag, tmp_path / name, '--eval'], capsys)
        assert str(tmp_path / name) in err


def test_checkpoint_of_another_architecture(data, tiny_ckpt, capsys):
    wider = [a if a != 'embed_dim=48' else 'embed_dim=64' for a in TINY]
    for flag in ('--resume', '--finetune'):
        err = cli_error(wider + ['--data-path', data, flag, tiny_ckpt, '--eval'], capsys)
        assert 'shapes differ' in err and 'pos_embed (file (1, 4, 48), model (1, 4, 64))' in err
    deeper = [a if a != 'depth=2' else 'depth=3' for a in TINY]
    err = cli_error(deeper + ['--data-path', data, '--resume', tiny_ckpt, '--eval'], capsys)
    assert 'missing keys [blocks.2.' in err


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_carrying_code_is_refused_unexecuted(data, tiny_ckpt, tmp_path, capsys):
    ckpt = checkpoint.load_checkpoint(tiny_ckpt)
    ckpt['extra'] = Payload(tmp_path / 'ran')
    torch.save(ckpt, tmp_path / 'evil.pth')
    for flag in ('--resume', '--finetune'):
        err = cli_error(TINY + ['--data-path', data, flag, tmp_path / 'evil.pth', '--eval'], capsys)
        assert 'refusing' in err and 'evil.pth' in err
    assert not (tmp_path / 'ran').exists()


def test_missing_teacher_path(data, tmp_path, capsys):
    err = cli_error(TINY + ['--data-path', data, '--distillation-type', 'hard', '--teacher-path',
                            tmp_path / 'teacher.pth'], capsys)
    assert 'teacher.pth' in err


def test_settings_that_cannot_work_together(data, capsys):
    assert '--smoothing 0' in cli_error(TINY + ['--data-path', data, '--bce-loss'], capsys)
    assert 'even' in cli_error(TINY + ['--data-path', data, '--batch', 7], capsys)
    assert 'launcher' in cli_error(TINY + ['--data-path', data, '--distributed'], capsys)
    assert '--save-interval 5 needs --output_dir' in cli_error(TINY + ['--data-path', data, '--save-interval', 5], capsys)
    if importlib.util.find_spec('flash_attn') is None:
        assert 'flash-attn' in cli_error(TINY + ['--data-path', data, '--flash'], capsys)


def test_unreadable_image_as_a_command(data, tmp_path):
    """Through `python main.py`, with a DataLoader worker reading the broken file."""
    broken = Path(shutil.copytree(data, tmp_path / 'data'))
    bad = broken / 'train' / 'class_1' / '2.png'
    bad.write_bytes(b'\x89PNG\r\n\x1a\n' + b'\0' * 20)
    proc = run_cli(TINY + ['--data-path', broken, '--num_workers', 1, '--batch', 12, '--epochs', 1,
                           '--no-repeated-aug', '--mixup', 0, '--cutmix', 0])
    err = proc.stderr.strip()
    assert proc.returncode == 2 and 'Traceback' not in err and '\n' not in err, err
    assert err.startswith('error: cannot read image') and str(bad) in err


def test_nonfinite_loss_stops_before_saving(data, tmp_path, capsys):
    err = cli_error(TINY + ['--data-path', data, '--output_dir', tmp_path, '--batch', 8, '--epochs', 1,
                            '--opt', 'sgd', '--lr', 1e30, '--unscale-lr', '--warmup-epochs', 0], capsys, code=1)
    assert 'non-finite' in err
    assert not (tmp_path / 'checkpoint.pth').exists() and not (tmp_path / 'log.txt').exists()


# ---- a new user's mistakes: one clear line, exit code 2, nothing lost ---------------------------------
def parse_error(argv, capsys) -> str:
    """main.cli on a command line argparse refuses: exit code 2 and one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main.cli([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and '\n' not in err and 'Traceback' not in err, err
    return err


@pytest.mark.parametrize('flag, value, expected', [
    ('--batch-size', 0, 'must be >= 1, got 0'),
    ('--batch', -8, 'must be >= 1, got -8'),
    ('--epochs', 0, 'must be >= 1'),
    ('--num_workers', -1, 'must be >= 0'),
    ('--drop-path', 1.5, 'must be in [0, 1)'),
    ('--reprob', 2, 'must be in [0, 1]'),
    ('--eval-crop-ratio', 0, 'must be in (0, 1]'),
    ('--lr', 'fast', "expected a number, got 'fast'"),
])
def test_numbers_out_of_range_are_one_line_errors(flag, value, expected, capsys):
    err = parse_error(TINY + [flag, value], capsys)
    assert err.startswith('main.py: error: argument') and flag in err and expected in err


def test_cutmix_minmax_that_leaves_no_box_size(data, capsys):
    err = cli_error(TINY + ['--data-path', data, '--cutmix-minmax', 0.5, 0.5], capsys)
    assert '--cutmix-minmax 0.5 0.5' in err
    assert 'expected 2 arguments' in parse_error(TINY + ['--cutmix-minmax', 0.5], capsys)


def test_output_dir_naming_a_file(data, tmp_path, capsys):
    (tmp_path / 'notes.txt').write_text('keep me')
    err = cli_error(TINY + ['--data-path', data, '--output_dir', tmp_path / 'notes.txt', '--epochs', 1], capsys)
    assert 'notes.txt is a file' in err and (tmp_path / 'notes.txt').read_text() == 'keep me'


def test_resume_naming_a_folder(pretrain, data, capsys):
    err = cli_error(TINY + ['--data-path', data, '--eval', '--resume', pretrain.out], capsys)
    assert f'{pretrain.out} is a folder' in err and f'did you mean {pretrain.out / "checkpoint.pth"}' in err


def test_eval_without_weights_is_refused(data, capsys):
    err = cli_error(TINY + ['--data-path', data, '--eval'], capsys)
    assert '--eval needs weights' in err and '--resume' in err and '--finetune' in err


def test_resuming_a_finished_run_says_there_is_nothing_to_train(pretrain, data, tmp_path, capsys):
    run = Path(shutil.copytree(pretrain.out, tmp_path / 'run'))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    argv = [a if a != pretrain.out else run for a in pretrain.argv]
    err = cli_error(argv + ['--resume', run / 'checkpoint.pth'], capsys)
    assert 'nothing left to train' in err and 'finished epoch 2, the last of --epochs 3' in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched


def test_warmup_and_cooldown_without_room_warn_once(capsys):
    main.warn_schedule(parse(['--warmup-epochs', 5, '--cooldown-epochs', 10, '--epochs', 2, '--lr', 1e-3]))
    out = capsys.readouterr().out
    assert out.count('\n') == 1 and out.startswith('Warning: --warmup-epochs 5 and --cooldown-epochs 10 leave no '
                                                  'room in --epochs 2: the lr peaks at 0.000201')
    for roomy in (['--epochs', 20], ['--epochs', 300], ['--warmup-epochs', 1, '--cooldown-epochs', 0, '--epochs', 2]):
        main.warn_schedule(parse(roomy))  # incl. the released fine-tuning schedule (20 epochs, 5 warmup, 10 cool)
    assert capsys.readouterr().out == ''


def test_checkpoint_of_another_size_reports_the_files_own_shapes(data, tiny_ckpt, capsys):
    wider_at_64 = [a if a != 'embed_dim=48' else 'embed_dim=64' for a in TINY] + ['--input-size', 64]
    err = cli_error(wider_at_64 + ['--data-path', data, '--resume', tiny_ckpt, '--eval'], capsys)
    assert 'pos_embed (file (1, 4, 48), model (1, 16, 64))' in err  # not the resampled (1, 16, 48)


def test_finetune_loading_every_tensor_says_so_in_one_line(pretrain, data, tmp_path):
    ckpt = pretrain.out / 'checkpoint.pth'
    _, out = run_main(TINY + ['--data-path', data, '--finetune', ckpt, '--eval'])
    assert [line for line in out.splitlines() if ckpt.name in line] == [
        f'Fine-tuning from {ckpt} (model weights): loaded 38 of 38 tensors']


def test_failed_run_leaves_no_output_folder(data, tmp_path, capsys):
    new = tmp_path / 'runs' / 'a'
    cli_error(TINY + ['--data-path', tmp_path / 'nowhere', '--output_dir', new], capsys)  # fails in setup
    assert not (tmp_path / 'runs').exists()
    diverge = ['--data-path', data, '--batch', 8, '--epochs', 1, '--opt', 'sgd', '--lr', 1e30, '--unscale-lr',
               '--warmup-epochs', 0]
    cli_error(TINY + diverge + ['--output_dir', new], capsys, code=1)  # fails in the first epoch
    assert not (tmp_path / 'runs').exists()
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
    cli_error(TINY + diverge + ['--output_dir', tmp_path / 'mine'], capsys, code=1)
    assert sorted(p.name for p in (tmp_path / 'mine').iterdir()) == ['args.json', 'notes.txt']  # not ours to remove


def test_ctrl_c_is_one_line_exit_130_and_keeps_the_last_checkpoint(data, tmp_path):
    out = tmp_path / 'run'
    argv = TINY + ['--data-path', data, '--output_dir', out, '--epochs', 10000, '--batch', 4, '--num_workers', 1]
    with open(tmp_path / 'stderr', 'w') as stderr:
        proc = subprocess.Popen([sys.executable, str(REPO / 'main.py'), *map(str, argv)], cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
                                env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'})
    watchdog = threading.Timer(300, proc.kill)  # a hung run ends the wait below (and fails) instead of the suite
    watchdog.start()
    try:
        # wait on the run itself: epoch 1's first progress line comes after epoch 0's checkpoint was written
        for line in proc.stdout:
            if line.startswith('Epoch: [1] ['):
                break
        else:
            pytest.fail(f'the run ended (code {proc.wait()}) before epoch 1: {(tmp_path / "stderr").read_text()}')
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group, the loader worker too
        proc.communicate(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
    ckpt = out / 'checkpoint.pth'
    assert proc.returncode == 130
    assert (tmp_path / 'stderr').read_text() == (f'interrupted; {ckpt} holds the last finished epoch (continue with '
                                                 f'--resume {ckpt})\n')
    assert checkpoint.load_checkpoint(str(ckpt))['epoch'] >= 0
    assert not [p.name for p in out.iterdir() if p.name.endswith('.tmp')]


def test_help_shows_every_default():
    text = ' '.join(main.get_args_parser().format_help().split())
    options = [a for a in main.get_args_parser()._actions if a.option_strings != ['-h', '--help']]
    assert text.count('(default: ') == len(options)
    assert 'images per process and step (default: 64)' in text and '--batch-size BATCH_SIZE, --batch' in text


def test_eval_takes_the_model_settings_from_the_checkpoint(pretrain, data):
    ckpt = pretrain.out / 'checkpoint.pth'
    last = read_log(pretrain.out)[-1]
    plain = ['--eval', '--resume', ckpt, '--data-path', data, '--data-set', 'FOLDER', '--device', 'cpu',
             '--num_workers', 0, '--batch', 8]  # no --model, --model-kwargs or --input-size
    stats, out = run_main(plain)
    assert (f'Model settings from {ckpt}: --model vit5_tiny --model-kwargs depth=2 embed_dim=48 num_heads=2 '
            f'--input-size 32 (give a flag to override)') in out
    assert stats['loss'] == pytest.approx(last['test_loss'])
    stats, out = run_main(plain + ['--input-size', 48])  # a flag the user gives wins
    assert '--input-size' not in out.split('Model settings')[1].splitlines()[0]
    assert stats['loss'] != pytest.approx(last['test_loss'])


def test_num_workers_default_follows_the_cpus_and_never_draws_the_loader_warning(monkeypatch):
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    # (cores of the process, torchrun's processes on the machine) -> (workers, intra-op threads on a CPU run)
    for cores, local_world, workers, threads in ((2, None, 2, 1), (64, None, 10, 54), (16, '4', 4, 1), (3, '8', 1, 1)):
        monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(cores)))
        if local_world:
            monkeypatch.setenv('LOCAL_WORLD_SIZE', local_world)
        args = main.parse_args([])
        assert args.num_workers == workers
        assert f'at most 10) (default: {workers})' in ' '.join(main.get_args_parser().format_help().split())
        # PyTorch warns when a loader has more workers than the process has cores ("suggested max")
        loader = torch.utils.data.DataLoader(range(4), num_workers=args.num_workers)
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            loader.check_worker_number_rationality()
        assert utils.cpu_threads(args.num_workers) == threads  # the same share of the cores
    assert main.parse_args(['--num_workers', '10']).num_workers == 10  # the released commands' value stays


def test_cpu_threads_leave_room_for_loader_workers(monkeypatch):
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(8)))
    assert [utils.cpu_threads(w) for w in (0, 2, 10)] == [8, 6, 1]
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '2')  # torchrun: 4 cores per process
    assert utils.cpu_threads(1) == 3
    monkeypatch.setenv('OMP_NUM_THREADS', '3')  # the user's choice stays
    assert utils.cpu_threads(1) is None
    monkeypatch.delenv('OMP_NUM_THREADS')
    before = torch.get_num_threads()
    try:
        main.set_cpu_threads(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---- recipe options -----------------------------------------------------------------------------
def test_distillation_and_cosub_train_end_to_end(data, tmp_path):
    import timm
    teacher = timm.create_model('test_resnet', num_classes=3)
    torch.save({'model': teacher.state_dict()}, tmp_path / 'teacher.pth')
    base = TINY + ['--data-path', data, '--epochs', 1, '--no-repeated-aug', '--no-model-ema']
    for extra in (['--distillation-type', 'soft', '--teacher-model', 'test_resnet', '--teacher-path',
                   tmp_path / 'teacher.pth', '--distillation-tau', 2.0],
                  ['--cosub', '--bce-loss', '--smoothing', 0]):
        stats, _ = run_main(base + extra)
        assert math.isfinite(stats['train_loss'])


def test_teacher_of_another_architecture_is_refused(data, tmp_path, capsys):
    torch.save({'model': {'fc.weight': torch.zeros(3, 3)}}, tmp_path / 'teacher.pth')
    err = cli_error(TINY + ['--data-path', data, '--distillation-type', 'hard', '--teacher-model', 'test_resnet',
                            '--teacher-path', tmp_path / 'teacher.pth'], capsys)
    assert 'does not fit --teacher-model test_resnet' in err


def test_attn_only_trains_attention_embeddings_and_head():
    args = parse(TINY + ['--attn-only'])
    model = main.build_model(args, 3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert 'blocks.0.attn.qkv.weight' in trainable and 'head.weight' in trainable and 'pos_embed' in trainable
    assert 'blocks.0.mlp.fc1.weight' not in trainable and 'blocks.1.norm1.weight' not in trainable


def test_layer_decay_scales_lr_by_depth():
    args = parse(TINY + ['--layer-decay', 0.5])
    opt = main.build_optimizer(args, main.build_model(args, 3), torch.device('cpu'))
    scales = sorted({g['lr_scale'] for g in opt.param_groups})
    assert scales == [0.125, 0.25, 0.5, 1.0]  # stem, block 0, block 1, norm + head


def test_plateau_schedule_decays_after_patience_and_resumes():
    args = parse(['--sched', 'plateau', '--warmup-epochs', 0, '--patience-epochs', 1, '--lr', 1e-3,
                  '--decay-rate', 0.5])

    def fresh():
        opt = main.build_optimizer(args, torch.nn.Linear(2, 2), torch.device('cpu'))
        with pytest.warns(FutureWarning):  # timm deprecates it
            return opt, main.build_scheduler(args, opt)

    def epochs(opt, sched, accs, start=0):
        lrs = []
        for epoch, acc in enumerate(accs, start):
            main.schedule(sched, args, epoch)
            lrs.append(opt.param_groups[0]['lr'])
            main.schedule(sched, args, epoch, metric=acc)
        return lrs

    opt, sched = fresh()
    assert epochs(opt, sched, [50.0, 50.0]) == [1e-3, 1e-3]
    state = (opt.state_dict(), checkpoint.scheduler_state(sched).state_dict())
    assert epochs(opt, sched, [50.0, 50.0]) == [1e-3, 5e-4]  # two epochs without gain, patience 1
    opt2, sched2 = fresh()  # resumed after epoch 1: the patience counter comes back too
    opt2.load_state_dict(state[0])
    checkpoint.scheduler_state(sched2).load_state_dict(state[1])
    assert epochs(opt2, sched2, [50.0, 50.0], start=2) == [1e-3, 5e-4]
