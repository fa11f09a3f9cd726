"""Shared pieces of the training tests: a tiny ViT-5 and the pretraining recipe shrunk, an image folder
written on the fly, ways to run main.py in-process or as a command, and the exact-resume check."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# 2 blocks of width 48: a few thousand images per second on one CPU core
TINY = ['--model', 'vit5_tiny', '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2',
        '--input-size', '32', '--device', 'cpu', '--num_workers', '0', '--data-set', 'FOLDER',
        '--warmup-epochs', '1', '--cooldown-epochs', '0', '--batch', '8']

# the released pretraining recipe, shrunk (batch, epochs, warmup); EMA decay lowered so it visibly differs
PRETRAIN_TINY = ['--batch', 8, '--accum_iter', 1, '--lr', 4e-3, '--weight-decay', 0.05, '--epochs', 3,
                 '--opt', 'fusedlamb', '--unscale-lr', '--mixup', .8, '--cutmix', 1.0, '--color-jitter', 0.3,
                 '--drop-path', 0.05, '--reprob', 0.0, '--smoothing', 0.0, '--ThreeAugment', '--repeated-aug',
                 '--bce-loss', '--eval-crop-ratio', 1.0, '--dist-eval', '--disable_wandb',
                 '--model-ema-decay', 0.9]


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


def run_keeping_checkpoints(argv):
    """run_main, keeping a copy of checkpoint.pth as written after each epoch (checkpoint.pth.epochN)."""
    import utils
    save = utils.save_checkpoint

    def save_and_keep(state, path):
        save(state, path)
        if Path(path).name == 'checkpoint.pth':
            shutil.copy(path, f'{path}.epoch{state["epoch"]}')

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utils, 'save_checkpoint', save_and_keep)
        return run_main(argv)[1]


def resume_and_compare(argv, out, epoch, tmp_path):
    """Restart `argv` (which wrote to `out`) from the checkpoint of `epoch` in a fresh output dir;
    assert its final model and EMA equal the uninterrupted run's bit for bit."""
    import utils
    out2 = tmp_path / f'resumed{epoch}'
    out2.mkdir()
    shutil.copy(out / f'checkpoint.pth.epoch{epoch}', out2 / 'checkpoint.pth')
    run_main([a if a != out else out2 for a in argv] + ['--resume', out2 / 'checkpoint.pth'])
    full = utils.load_checkpoint(str(out / 'checkpoint.pth'))
    resumed = utils.load_checkpoint(str(out2 / 'checkpoint.pth'))
    for key in ('model', 'model_ema'):
        assert full[key].keys() == resumed[key].keys()
        for name, tensor in full[key].items():
            assert torch.equal(tensor, resumed[key][name]), f'{key}.{name}'
    assert resumed['max_accuracy'] == full['max_accuracy']
    assert read_log(out2) == read_log(out)[epoch + 1:]  # same losses and accuracies, epoch by epoch
