"""The released weights through the Hugging Face Hub, offline: every released tag points at its file
in FengWang3211/ViT-5, and `timm.create_model(..., pretrained=True)` and `main.py --finetune TAG` read
it from a Hugging Face cache that the tests fill themselves (HF_HUB_OFFLINE=1, nothing downloaded).

The cached file is a 2-block vit5_small with 1000 classes (the mechanism is the same at full depth).
huggingface_hub reads its settings from the environment when imported, so the runs that need them
are separate processes."""
import argparse
import pickle
import subprocess
import sys

import pytest
import timm
import torch

import models_vit5
from tinyrun import REPO, make_image_folder, run_cli

FILE = 'vit5_small_patch16_224.pth'
COMMIT = '0123456789abcdef0123456789abcdef01234567'
RELEASED = {  # tag: (file, input size, published ImageNet-1k top-1)
    'vit5_small.in1k': ('vit5_small_patch16_224.pth', 224, '82.2'),
    'vit5_base.in1k': ('vit5_base_patch16_224.pth', 224, '84.2'),
    'vit5_base.in1k_384': ('vit5_base_patch16_384.pth', 384, '85.4'),
    'vit5_large.in1k': ('vit5_large_patch16_224.pth', 224, '84.9'),
    'vit5_large.in1k_384': ('vit5_large_patch16_384.pth', 384, '86.0'),
}


def small_weights(seed: int, favourite: int) -> dict:
    """A 2-block vit5_small state dict whose head always predicts class `favourite`."""
    torch.manual_seed(seed)
    model = timm.create_model('vit5_small', depth=2)
    with torch.no_grad():
        model.head.bias[favourite] = 1e3
    return model.state_dict()


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    """HF_HOME holding the hub cache layout of one released file: refs/main -> snapshots/<commit>/FILE."""
    home = tmp_path_factory.mktemp('hf_home')
    repo = home / 'hub' / 'models--FengWang3211--ViT-5'
    (repo / 'snapshots' / COMMIT).mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(COMMIT)
    weights, ema = small_weights(0, favourite=1), small_weights(1, favourite=2)
    torch.save({'model': weights, 'model_ema': ema, 'args': argparse.Namespace(model='vit5_small'), 'epoch': 799},
               repo / 'snapshots' / COMMIT / FILE)  # the layout of the released files, Namespace included
    return home, weights, ema


def offline(home) -> dict:
    return {'HF_HUB_OFFLINE': '1', 'HF_HOME': str(home), 'HF_HUB_CACHE': str(home / 'hub')}


def run_python(code: str, env: dict):
    full_env = {**{k: v for k, v in __import__('os').environ.items() if not k.startswith('HF_')},
                'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO), **env}
    return subprocess.run([sys.executable, '-c', code], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=300)


def assert_state_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_every_released_tag_points_at_its_hub_file():
    for tag, (file, size, top1) in RELEASED.items():
        cfg = models_vit5.released_cfg(tag)
        assert (cfg['hf_hub_id'], cfg['hf_hub_filename']) == ('FengWang3211/ViT-5', file), tag
        assert cfg['input_size'] == (3, size, size) and any(top1 in note for note in cfg['notes']), tag
        assert not cfg.get('file')  # no bare local name that would be looked up in the working directory
    assert models_vit5.released_cfg('vit5_small')['hf_hub_filename'] == FILE  # the default tag
    assert models_vit5.released_cfg('vit5_tiny') is None and models_vit5.released_cfg('resnet50') is None


def test_pretrained_file_leaves_paths_alone(tmp_path):
    path = tmp_path / 'vit5_small.in1k'  # a file that happens to be named like a tag wins
    path.write_bytes(b'')
    assert models_vit5.pretrained_file(str(path)) == str(path)
    assert models_vit5.pretrained_file('missing/checkpoint.pth') == 'missing/checkpoint.pth'


def test_pretrained_true_reads_the_offline_hub_cache(hub, tmp_path):
    home, weights, ema = hub
    out = tmp_path / 'loaded.pth'
    proc = run_python(
        'import sys, timm, torch, models_vit5\n'
        "model = timm.create_model('vit5_small', pretrained=True, depth=2)\n"
        f"torch.save(model.state_dict(), {str(out)!r})\n", offline(home))
    assert proc.returncode == 0, proc.stderr
    assert_state_equal(torch.load(out), ema)  # the file's EMA weights: timm's rule for checkpoint files
    # the same file given as a local file loads the same weights
    local = timm.create_model('vit5_small', pretrained=True, depth=2, pretrained_cfg_overlay=dict(
        file=str(home / 'hub' / 'models--FengWang3211--ViT-5' / 'snapshots' / COMMIT / FILE)))
    assert_state_equal(local.state_dict(), ema)


class NotAllowed:
    pass


def test_pretrained_loading_stays_weights_only(tmp_path):
    path = tmp_path / 'carries_code.pth'
    torch.save({'model': small_weights(0, 0), 'extra': NotAllowed()}, path)
    with pytest.raises((pickle.UnpicklingError, RuntimeError), match='NotAllowed'):  # timm may re-raise
        timm.create_model('vit5_small', pretrained=True, depth=2, pretrained_cfg_overlay=dict(file=str(path)))


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    # 1, 4 and 1 validation images of classes 0, 1, 2: a head that always says 1 scores 66.7%
    return make_image_folder(tmp_path_factory.mktemp('data'), train_per_class=(1, 1, 1), val_per_class=(1, 4, 1))


EVAL_TAG = ['--eval', '--finetune', 'vit5_small.in1k', '--model', 'vit5_small', '--model-kwargs', 'depth=2',
            '--input-size', '32', '--nb-classes', '1000', '--data-set', 'FOLDER', '--device', 'cpu',
            '--num_workers', '0', '--batch-size', '8']


def test_main_finetune_takes_a_tag_from_the_offline_cache(hub, images):
    home, _, _ = hub
    proc = run_cli(EVAL_TAG + ['--data-path', images], env=offline(home))
    assert proc.returncode == 0, proc.stderr
    # the file's `model` weights (its `model_ema` head would say class 2: 16.7%); --load_ema picks those
    assert 'Accuracy of the network on the 6 test images: 66.7%' in proc.stdout


def test_main_finetune_tag_not_cached_offline_is_one_line(tmp_path, images):
    proc = run_cli(EVAL_TAG + ['--data-path', images], env=offline(tmp_path / 'empty_hf_home'))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for text in ('vit5_small.in1k', 'FengWang3211/ViT-5', FILE, 'hf download'):
        assert text in lines[0]


def test_a_released_tag_supplies_model_and_input_size_unless_given(capsys):
    import checkpoint
    from tinyrun import parse
    from utils import ConfigError
    args = parse(['--finetune', 'vit5_large.in1k_384'])
    checkpoint.take_finetune_settings(args)
    assert (args.model, args.input_size) == ('vit5_large', 384)
    assert capsys.readouterr().out == ('Model settings from vit5_large.in1k_384: --model vit5_large --input-size '
                                       '384 (give a flag to override)\n')
    args = parse(['--finetune', 'vit5_large.in1k_384', '--input-size', 224])  # fine-tuning at another size
    checkpoint.take_finetune_settings(args)
    assert (args.model, args.input_size) == ('vit5_large', 224)
    with pytest.raises(ConfigError, match='holds vit5_small weights, which --model vit5_base cannot take'):
        checkpoint.take_finetune_settings(parse(['--finetune', 'vit5_small.in1k', '--model', 'vit5_base']))
