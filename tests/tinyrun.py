"""Shared pieces of the training tests: a tiny ViT-5, an image folder written on the fly, and ways
to run main.py in-process or as a command."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# 2 blocks of width 48: a few thousand images per second on one CPU core
TINY = ['--model', 'vit5_tiny', '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2',
        '--input-size', '32', '--device', 'cpu', '--num_workers', '0', '--data-set', 'FOLDER',
        '--warmup-epochs', '1', '--cooldown-epochs', '0', '--batch', '8']


# two CPU processes under torchrun (gloo on CPU)
TORCHRUN = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2')


def make_image_folder(root, train_per_class=(4, 4, 4), val_per_class=(3, 3, 3), size=32, seed=0):
    """root/{train,val}/class_k/i.png: noisy images whose dominant colour channel is the class."""
    rng = np.random.default_rng(seed)
    for split, counts in (('train', train_per_class), ('val', val_per_class)):
        for k, n in enumerate(counts):
            folder = Path(root) / split / f'class_{k}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = (rng.random((size, size, 3)) * 128).astype(np.uint8)
                img[..., k % 3] += 127
                Image.fromarray(img).save(folder / f'{i}.png')
    return str(root)


def parse(argv):
    """main.py's arguments, with the record of which flags were given."""
    import main
    return main.parse_args([str(a) for a in argv])


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one intra-op thread, above all on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_main(argv):
    """main.main in this process; returns (result, captured stdout)."""
    import main
    buf = io.StringIO()
    with one_thread(), contextlib.redirect_stdout(buf):
        result = main.main(parse(argv))
    return result, buf.getvalue()


def run_cli(argv, timeout=300, env=None, launcher=(sys.executable,), script='main.py'):
    """`python main.py ARGV` (or another script, or under another launcher) from the repository root."""
    full_env = {**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})}
    return subprocess.run([*launcher, str(REPO / script), *[str(a) for a in argv]], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_log(out_dir):
    with open(Path(out_dir) / 'log.txt') as f:
        return [json.loads(line) for line in f]


@contextlib.contextmanager
def keeping_checkpoints():
    """Inside: every write of checkpoint.pth also leaves a copy (rank 0 writes), checkpoint.pth.epochN after
    epoch N, and checkpoint.pth.epochN.batchK after batch K of it (--save-interval, a stop signal)."""
    import checkpoint
    import utils
    save = checkpoint.save_checkpoint

    def save_and_keep(state, path, keep_previous=False):
        save(state, path, keep_previous)
        if Path(path).name == 'checkpoint.pth' and utils.is_main_process():
            mid = '' if state.get('batches_done') is None else f'.batch{state["batches_done"]}'
            shutil.copy(path, f'{path}.epoch{state["epoch"]}{mid}')

    checkpoint.save_checkpoint = save_and_keep
    try:
        yield
    finally:
        checkpoint.save_checkpoint = save


def run_keeping_checkpoints(argv):
    """run_main, keeping a copy of checkpoint.pth as written after each epoch (and mid-epoch); returns the stdout."""
    with keeping_checkpoints():
        return run_main(argv)[1]


def assert_same(a, b, where='checkpoint'):
    """Two checkpoint trees (tensors, containers, numbers) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{where}[{i}]')
    else:
        assert a == b, f'{where}: {a!r} != {b!r}'


def assert_same_run_state(full_path, resumed_path):
    """Everything but the command line (args) of two checkpoints is equal: weights, EMA, optimizer,
    schedule, gradient scaler, where it stopped, best top-1."""
    import checkpoint
    full, resumed = (checkpoint.load_checkpoint(str(p)) for p in (full_path, resumed_path))
    assert full.keys() == resumed.keys()
    for key in sorted(set(full) - {'args'}):
        assert_same(full[key], resumed[key], key)


def resume_and_compare(argv, out, epoch, tmp_path, batch=None):
    """Restart `argv` (which wrote to `out`, keeping checkpoints) from the checkpoint of `epoch` (after `batch`
    of its batches, when given) in a fresh output dir; assert it ends in the uninterrupted run's state, bit for
    bit, with the same log (with `batch`, that epoch's line included: its running loss was saved)."""
    name = f'checkpoint.pth.epoch{epoch}' + ('' if batch is None else f'.batch{batch}')
    out2 = tmp_path / f'resumed_{name}'
    out2.mkdir()
    shutil.copy(Path(out) / name, out2 / 'checkpoint.pth')
    run_main([a if a != out else out2 for a in argv] + ['--resume', out2 / 'checkpoint.pth'])
    assert_same_run_state(Path(out) / 'checkpoint.pth', out2 / 'checkpoint.pth')
    assert read_log(out2) == read_log(out)[epoch + (batch is None):]  # same losses and accuracies, epoch by epoch
