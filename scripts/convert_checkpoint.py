"""Convert a released or training checkpoint to safetensors, or summarise it.

    python scripts/convert_checkpoint.py CKPT.pth [--ema] [--out OUT.safetensors]
    python scripts/convert_checkpoint.py CKPT.pth --summary

The output holds only the model (or, with --ema, the EMA) weights, with DDP and
torch.compile prefixes removed, and is checked to load strictly into the model the
checkpoint was trained as. Load it with timm; the script prints the exact lines, e.g.

    model = timm.create_model('vit5_small', pretrained=True, num_classes=1000, img_size=224,
        pretrained_cfg_overlay=dict(file='OUT.safetensors', num_classes=1000, input_size=(3, 224, 224),
                                    interpolation='bicubic', crop_mode='center', crop_pct=1.0, mean=..., std=...))
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))

The overlay is the pretrained config of the weights: the evaluation transform the
checkpoint was scored with (input size, --eval-crop-ratio, interpolation, mean and
std), so timm's own data pipeline reproduces main.py --eval. It travels in the
file's metadata too (pretrained_cfg), beside the model name, class count and
--model-kwargs, so --summary and visualize_attention.py can rebuild the model.
"""
import argparse
import json
import sys
from pathlib import Path

from common import Parser, create_model, fail, load_weights, model_spec, read_checkpoint, state_dict_of

# create_model kwargs that are not architecture (they have their own metadata fields)
NOT_ARCH = ('num_classes', 'img_size')
# the training arguments --summary shows: what rebuilds the model, then what made the weights
MODEL_ARGS = ('model', 'model_kwargs', 'input_size', 'nb_classes', 'drop_path')
RECIPE_ARGS = ('data_set', 'epochs', 'batch_size', 'accum_iter', 'opt', 'lr', 'unscale_lr', 'weight_decay',
               'sched', 'warmup_epochs', 'smoothing', 'mixup', 'cutmix', 'model_ema', 'model_ema_decay',
               'eval_crop_ratio', 'finetune', 'seed')


def parse_args(argv=None):
    p = Parser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 1)[1],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoint', help='.pth checkpoint (training or released) or a raw state dict')
    p.add_argument('--out', help='output .safetensors (default: next to CHECKPOINT, _ema added with --ema)')
    p.add_argument('--ema', action='store_true', help='export the model_ema weights instead of model')
    p.add_argument('--summary', action='store_true',
                   help='print what the checkpoint holds; converts only if --out is given too')
    p.add_argument('--model', help="model name when the checkpoint has no args (e.g. 'vit5_base')")
    p.add_argument('--input-size', type=int, help='input size when the checkpoint has no args')
    p.add_argument('--model-kwargs', nargs='*', metavar='K=V', help='extra create_model kwargs (as in main.py)')
    args = p.parse_args(argv)
    if args.out and not args.out.endswith('.safetensors'):
        p.error(f'--out must end in .safetensors, got {args.out}')
    return args


def count(state_dict: dict):
    """(tensors, parameters); RoPE frequency buffers are not parameters."""
    tensors = [v for v in state_dict.values() if hasattr(v, 'numel')]
    params = sum(v.numel() for k, v in state_dict.items() if hasattr(v, 'numel') and not k.endswith('.freqs'))
    return len(tensors), params


def summarise(path: str, ckpt: dict):
    args, meta = ckpt.get('args'), ckpt.get('meta') or {}
    weights = state_dict_of(ckpt)
    if weights is ckpt:
        kind = 'raw state dict'
    elif meta:
        kind = 'safetensors weights'
    else:
        kind = 'checkpoint dict'
    lines = [f'file:          {path} ({Path(path).stat().st_size / 2**20:.1f} MiB, {kind})']
    if weights is not ckpt and not meta:
        lines.append(f'keys:          {", ".join(ckpt)}')
    model = getattr(args, 'model', None) or meta.get('model') or 'unknown (pass --model to convert)'
    lines.append(f'model:         {model}')
    for label, key in (('input size', 'input_size'), ('epoch', 'epoch'), ('max accuracy', 'max_accuracy')):
        value = ckpt.get(key, meta.get(key, getattr(args, key, None)))
        if value is not None:
            value = f'{float(value):.2f}%' if key == 'max_accuracy' else value
            lines.append(f'{label + ":":15s}{value}')
    if ckpt.get('batches_done') is not None:  # written mid-epoch (--save-interval, a stop signal)
        lines.append(f'mid-epoch:     {ckpt["batches_done"]} batches of epoch {ckpt.get("epoch")} trained')
    n, params = count(weights)
    lines.append(f'weights:       {n} tensors, {params:,} parameters')
    if isinstance(ckpt.get('model_ema'), dict):
        n, params = count(ckpt['model_ema'])
        lines.append(f'EMA weights:   yes, {n} tensors, {params:,} parameters')
    elif meta.get('weights') == 'ema':
        lines.append('EMA weights:   yes, this file holds them')
    else:
        lines.append('EMA weights:   no')
    if args is not None:
        given = vars(args)
        for label, keys in (('model args:', MODEL_ARGS), ('recipe args:', RECIPE_ARGS)):
            lines.append(label)
            lines += [f'  {k} = {given[k]!r}' for k in keys if k in given]
        rest = len(set(given) - set(MODEL_ARGS) - set(RECIPE_ARGS))
        lines.append(f'  ({rest} more in the checkpoint\'s args: runtime, logging and the other training flags)')
    extra = {k: v for k, v in meta.items() if k not in ('model', 'input_size', 'epoch', 'max_accuracy')}
    if extra:
        lines.append('metadata:')
        lines += [f'  {k} = {v}' for k, v in sorted(extra.items())]
    print('\n'.join(lines))


def data_config(ckpt: dict, name: str, kwargs: dict) -> dict:
    """The pretrained config of the weights: class count and the evaluation transform they were scored
    with, main.py's (datasets.eval_data_config) at the checkpoint's input size and --eval-crop-ratio. A
    file without training args gets the crop of the model's registered config (the released files')."""
    import timm
    from datasets import eval_data_config
    default = timm.models.get_pretrained_cfg(name)
    size = kwargs.get('img_size') or default.input_size[-1]
    crop = getattr(ckpt.get('args'), 'eval_crop_ratio', None) or default.crop_pct
    return dict(num_classes=kwargs['num_classes'], **eval_data_config(int(size), float(crop)))


def loading_lines(name: str, kwargs: dict, path: str, cfg: dict) -> str:
    """Python that loads the file through timm, with the data pipeline it was evaluated with."""
    call = ''.join(f', {k}={v!r}' for k, v in kwargs.items())
    items = [f'{k}={v!r}' for k, v in cfg.items()]
    return (f'  import timm, timm.data, models_vit5\n'
            f'  model = timm.create_model({name!r}, pretrained=True{call},\n'
            f'      pretrained_cfg_overlay=dict(file={path!r},\n'
            f'          {", ".join(items[:-2])},\n'
            f'          {", ".join(items[-2:])})).eval()\n'
            f'  transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))')


def convert(args, ckpt: dict):
    from safetensors.torch import save_file
    name, kwargs = model_spec(ckpt, args.model, args.input_size, args.model_kwargs)
    model = create_model(name, **kwargs)
    state_dict = load_weights(model, ckpt, args.ema)  # strict: fails here, not when the file is used
    out = Path(args.out or Path(args.checkpoint).with_suffix('').as_posix() + ('_ema' if args.ema else '')
               + '.safetensors')
    if out.resolve() == Path(args.checkpoint).resolve():
        fail(f'--out {out} would overwrite the input')
    arch = {k: v for k, v in kwargs.items() if k not in NOT_ARCH}
    meta = dict(model=name, num_classes=str(kwargs['num_classes']), model_kwargs=json.dumps(arch),
                weights='ema' if args.ema else 'model', source=Path(args.checkpoint).name)
    if 'img_size' in kwargs:
        meta['input_size'] = str(kwargs['img_size'])
    for key in ('epoch', 'max_accuracy'):
        if ckpt.get(key) is not None:
            meta[key] = str(ckpt[key])
    cfg = data_config(ckpt, name, kwargs)
    meta['pretrained_cfg'] = json.dumps(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(out), metadata=meta)

    n, params = count(state_dict)
    print(f'wrote {out}: {meta["weights"]} weights of {name}, {n} tensors, {params:,} parameters\n'
          f'load it with timm, and evaluate it as main.py --eval did (models_vit5 imports from any folder after '
          f'`pip install -e .` in the repository):\n' + loading_lines(name, kwargs, str(out), cfg))


def main(argv=None):
    args = parse_args(argv)
    ckpt = read_checkpoint(args.checkpoint)
    if args.summary:
        summarise(args.checkpoint, ckpt)
    if args.out or not args.summary:
        if Path(args.checkpoint).suffix == '.safetensors':
            fail('the input is already a safetensors file')
        convert(args, ckpt)


if __name__ == '__main__':
    sys.exit(main())
