"""Helpers shared by the scripts in this folder: one-line CLI errors, reading
checkpoints, and rebuilding the model a checkpoint was trained with."""
import argparse
import ast
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # models_vit5, utils


class Parser(argparse.ArgumentParser):
    """argparse with a single-line error message (no usage dump)."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def fail(message: str):
    sys.exit(f'error: {message}')


def fresh_image_folder(out: str, overwrite: bool) -> Path:
    """OUT for a new ImageFolder: existing OUT/train and OUT/val are an error, or removed with `overwrite`."""
    out = Path(out)
    existing = [out / split for split in ('train', 'val') if (out / split).exists()]
    if existing and not overwrite:
        fail(f'{existing[0]} already exists; pass --overwrite to replace it')
    for folder in existing:
        shutil.rmtree(folder)
    return out


def read_checkpoint(path: str) -> dict:
    """A training/released .pth checkpoint (or a raw state dict), or a .safetensors file
    written by convert_checkpoint.py, as a dict. Exits with one line on failure."""
    p = Path(path)
    if not p.is_file():
        fail(f'checkpoint not found: {path}')
    if p.suffix == '.safetensors':
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open
        try:
            with safe_open(str(p), 'pt') as f:
                meta = f.metadata() or {}
            return {'model': load_file(str(p)), 'meta': meta}
        except (SafetensorError, OSError) as e:
            fail(f'cannot read {path}: {e}')
    import checkpoint
    try:
        ckpt = checkpoint.load_checkpoint(str(p))
    except checkpoint.CheckpointError as e:
        fail(str(e))
    if not isinstance(ckpt, dict):
        fail(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict or state dict')
    return ckpt


def parse_model_kwargs(items) -> dict:
    """['depth=6', 'qk_norm=False'] (or a dict) -> {'depth': 6, 'qk_norm': False}."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in items:
        key, sep, value = str(item).partition('=')
        if not sep or not key:
            fail(f'model kwarg {item!r} is not key=value')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = {'true': True, 'false': False, 'none': None}.get(value.lower(), value)
    return out


def state_dict_of(ckpt: dict, use_ema: bool = False) -> dict:
    """The weights inside a checkpoint: 'model' (or 'model_ema' with use_ema), else the dict itself."""
    if use_ema:
        if not isinstance(ckpt.get('model_ema'), dict):
            fail(f'--ema: the checkpoint has no model_ema weights (keys: {", ".join(sorted(ckpt))})')
        return ckpt['model_ema']
    for key in ('model', 'state_dict'):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def model_spec(ckpt: dict, model=None, input_size=None, model_kwargs=None):
    """(name, create_model kwargs) for the weights in `ckpt`.

    Taken from the checkpoint's args (training checkpoints) or metadata (our safetensors
    files); command-line values override. num_classes comes from the head's shape.
    """
    args = ckpt.get('args')
    meta = ckpt.get('meta') or {}
    name = model or getattr(args, 'model', None) or meta.get('model')
    if not name:
        fail('the checkpoint does not say which model it holds; pass --model')
    size = input_size or getattr(args, 'input_size', None) or int(meta.get('input_size', 0)) or None
    kwargs = parse_model_kwargs(getattr(args, 'model_kwargs', None))
    kwargs.update(json.loads(meta.get('model_kwargs', '{}')))
    kwargs.update(parse_model_kwargs(model_kwargs))
    head = head_weight(state_dict_of(ckpt))
    kwargs['num_classes'] = int(head.shape[0]) if head is not None else 0
    if size:
        kwargs['img_size'] = int(size)
    return name, kwargs


def head_weight(state_dict: dict):
    """The classifier weight, whatever DDP/compile prefixes the keys carry (None if absent)."""
    from models_vit5 import STRIP_PREFIXES
    for k, v in state_dict.items():
        while k.startswith(STRIP_PREFIXES):
            k = k.split('.', 1)[1]
        if k == 'head.weight':
            return v
    return None


def create_model(name: str, **kwargs):
    import timm
    import models_vit5  # noqa: F401  registers the vit5_* names
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            fail(f'unknown model {name!r} (try vit5_small, vit5_base, vit5_large, deit_small_patch16_LS)')
        raise
    except TypeError as e:
        fail(f'cannot build {name} with {kwargs}: {e}')


def load_weights(model, ckpt: dict, use_ema: bool = False):
    """Strictly load the checkpoint's (EMA) weights into `model`, with clear errors."""
    import models_vit5
    sd = models_vit5.checkpoint_filter_fn(state_dict_of(ckpt, use_ema), model)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        detail = ' '.join(line.strip() for line in str(e).splitlines()[1:])
        fail(f'the weights do not fit {type(model).__name__}: {detail[:400]}')
    return sd
