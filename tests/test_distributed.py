"""Two CPU processes under torchrun (gloo): training, exact distributed evaluation, joint stops, DDP against
one process at the same global batch, and resuming (under torchrun, and with another number of processes)."""
import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import checkpoint
from tinyrun import TINY, TORCHRUN, assert_same_run_state, make_image_folder, read_log, run_cli, run_main

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason='needs torch.distributed with gloo')


def test_torchrun_train_and_dist_eval_equals_single_process(tmp_path):
    # 7 validation images: no split over 2 ranks is even, so padding would show
    data = make_image_folder(tmp_path / 'data', train_per_class=(6, 5, 5), val_per_class=(3, 2, 2))
    out = tmp_path / 'out'
    proc = run_cli(TINY + ['--data-path', data, '--output_dir', out, '--epochs', 1, '--accum_iter', 2,
                           '--repeated-aug', '--dist-eval', '--lr', 5e-3, '--unscale-lr'], launcher=TORCHRUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('Accuracy of the network on the 7 test images') == 1  # rank 0 alone prints
    [entry] = read_log(out)  # one writer: one line per epoch
    single, _ = run_main(TINY + ['--data-path', data, '--eval', '--resume', out / 'checkpoint.pth'])
    assert entry['test_acc1'] == single['acc1'] and single['n'] == 7
    assert entry['test_loss'] == pytest.approx(single['loss'], rel=1e-6)
    assert entry['test_loss_ema'] == pytest.approx(run_main(
        TINY + ['--data-path', data, '--eval', '--resume', out / 'checkpoint.pth', '--load_ema'])[0]['loss'], rel=1e-6)


def test_rank0_only_eval_and_nonfinite_loss_stops_all_ranks(tmp_path):
    proc = run_cli([], launcher=TORCHRUN, script='tests/dist_worker.py', env={'RESULT_DIR': str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1))
    assert r0['eval_forwards'] == 4 and r1['eval_forwards'] == 0 and r0['acc1'] == r1['acc1']
    # NaN on rank 1 only, yet both stop together, at the epoch's last (log) step, naming where it appeared
    assert r0['stopped'] == r1['stopped'] and 'epoch 0, step 2 (rank 1)' in r0['stopped']
    assert 'stopped on every rank at step 3' in r0['stopped']


# ---- DDP against one process, and resuming under torchrun --------------------------------------------------
def solid_colour_folder(root, train=24, val=6, classes=3, size=48, seed=0):
    """root/{train,val}/class_k/i.png, each image a single colour (channel k brightest for class k). Crops,
    flips and resizes leave such an image as it is, so the pixels a model sees do not depend on the
    augmentation's random draws (which differ between processes)."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', train), ('val', val)):
        for i in range(n):
            k = i % classes
            colour = rng.integers(0, 128, size=3)
            colour[k] += 127
            folder = Path(root) / split / f'class_{k}'
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.broadcast_to(colour.astype(np.uint8), (size, size, 3)).copy()).save(folder / f'{i}.png')
    return str(root)


def torchrun_main(argv, result_dir):
    """`torchrun --nproc_per_node 2 main.py ARGV` through tests/main_worker.py; returns (stdout, per-rank results)."""
    result_dir.mkdir()
    proc = run_cli(argv, launcher=TORCHRUN, script='tests/main_worker.py', env={'RESULT_DIR': str(result_dir)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout, [json.loads((result_dir / f'rank{r}.json').read_text()) for r in (0, 1)]


# 2 epochs of SGD with accumulation over 2 batches (3 per epoch: windows of 2 and 1), clipping, the EMA and
# label smoothing, without a random draw that changes a pixel or a prediction (solid colours, no mixup, no drop
# path). The lr is scaled by the global batch (no --unscale-lr). Run with 2 processes of 4 images per batch,
# and with 1 process of 8, both see the same global batches: DistributedSampler deals one shuffled order round
# robin, so the two ranks' k-th batches together are the single process's k-th batch.
SAME_GLOBAL_BATCH = TINY + ['--input-size', 48, '--epochs', 2, '--warmup-epochs', 0, '--no-repeated-aug',
                            '--aa', 'none', '--color-jitter', 0, '--reprob', 0, '--mixup', 0, '--cutmix', 0,
                            '--drop-path', 0, '--opt', 'sgd', '--lr', 0.5, '--accum_iter', 2, '--clip-grad', 1.0,
                            '--model-ema-decay', 0.5, '--smoothing', 0.1]
# float32 sums in another order (the gradient all-reduce, batch means of 4 then 2 instead of 8) over 4 steps:
# measured 4e-9 apart at most, where one epoch moves the weights by 2e-3
DDP_TOL = dict(rtol=1e-5, atol=1e-7)


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('ddp')
    data = solid_colour_folder(root / 'data')
    argv = SAME_GLOBAL_BATCH + ['--data-path', data, '--output_dir', root / 'out', '--batch', 4]
    stdout, ranks = torchrun_main(argv, root / 'result')
    return types.SimpleNamespace(root=root, data=data, out=root / 'out', argv=argv, stdout=stdout, ranks=ranks)


def assert_close_weights(a_path, b_path):
    a, b = (checkpoint.load_checkpoint(str(p)) for p in (a_path, b_path))
    for key in ('model', 'model_ema'):
        assert a[key].keys() == b[key].keys()
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, **DDP_TOL, msg=f'{key}.{name}')


def test_ddp_with_accumulation_equals_one_process_at_the_same_global_batch(ddp_run, tmp_path):
    # each rank all-reduced once per optimizer step (no_sync on the first batch of a window): 2 steps an epoch
    assert [r['all_reduces'] for r in ddp_run.ranks] == [4, 4]
    single = tmp_path / 'single'
    run_main(SAME_GLOBAL_BATCH + ['--data-path', ddp_run.data, '--output_dir', single, '--batch', 8])
    assert_close_weights(ddp_run.out / 'checkpoint.pth', single / 'checkpoint.pth')
    ddp_log, single_log = read_log(ddp_run.out), read_log(single)
    # the lr rule: lr * batch * accum_iter * world size / 512, the same global batch of 16 both ways
    assert ddp_log[0]['train_lr'] == pytest.approx(0.5 * 4 * 2 * 2 / 512, rel=1e-12)
    for d, s in zip(ddp_log, single_log):
        assert d['train_lr'] == s['train_lr']
        assert d['train_loss'] == pytest.approx(s['train_loss'], rel=1e-5)
        assert d['test_loss_ema'] == pytest.approx(s['test_loss_ema'], rel=1e-5)


def test_torchrun_resume_continues_every_ranks_random_draws(ddp_run, tmp_path):
    """Stopped after epoch 0 and resumed under torchrun: every rank draws from (seed, epoch, rank, position),
    so the run ends where the uninterrupted one did, bit for bit (weights, EMA, optimizer, scaler)."""
    assert checkpoint.load_checkpoint(str(ddp_run.out / 'checkpoint.pth.epoch0'))['world_size'] == 2
    resumed = tmp_path / 'resumed'
    resumed.mkdir()
    shutil.copy(ddp_run.out / 'checkpoint.pth.epoch0', resumed / 'checkpoint.pth')
    argv = [a if a != ddp_run.out else resumed for a in ddp_run.argv]
    _, ranks = torchrun_main(argv + ['--resume', resumed / 'checkpoint.pth'], tmp_path / 'result')
    assert [r['all_reduces'] for r in ranks] == [2, 2]
    assert_same_run_state(ddp_run.out / 'checkpoint.pth', resumed / 'checkpoint.pth')
    assert read_log(resumed) == read_log(ddp_run.out)[1:]


def test_resume_with_another_world_size_continues_the_run(ddp_run, tmp_path):
    """A 2-process checkpoint resumed in 1 process: one line says what changes (the random streams start
    afresh, the sampler deals the data over 1 process, the global batch if it does) and what does not (the
    lr schedule); with twice the batch, the same global batch, the run ends where the 2-process one did."""
    def resume_in_one_process(batch):
        out = tmp_path / f'batch{batch}'
        out.mkdir()
        shutil.copy(ddp_run.out / 'checkpoint.pth.epoch0', out / 'checkpoint.pth')
        _, stdout = run_main(SAME_GLOBAL_BATCH + ['--data-path', ddp_run.data, '--output_dir', out, '--batch', batch,
                                                  '--resume', out / 'checkpoint.pth'])
        assert [e['epoch'] for e in read_log(out)] == [1]
        return out / 'checkpoint.pth', stdout

    ckpt, stdout = resume_in_one_process(8)
    assert (f'Resuming {ckpt}, saved by 2 process(es), in 1: each rank draws from (--seed, epoch, rank), the '
            f'sampler deals the data over 1 process(es), and the lr schedule continues as saved\n') in stdout
    assert_close_weights(ddp_run.out / 'checkpoint.pth', ckpt)
    _, stdout = resume_in_one_process(4)
    assert 'the lr schedule continues as saved (global batch 16 -> 8)\n' in stdout
