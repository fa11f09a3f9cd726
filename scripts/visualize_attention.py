"""Draw where the class token and the registers attend, as a PNG grid.

    python scripts/visualize_attention.py IMAGE --checkpoint CKPT [--layers -1 -4] [--heads mean|all]
    python scripts/visualize_attention.py IMAGE --model vit5_small   # random weights: a smoke test

One row per chosen layer (per layer and head with --heads all). The first column is
the input image; then one column per query token - the class token, then each
register - showing that token's attention over the patches (softmax row restricted
to the h x w patch grid, upsampled over the image). Each map is scaled to its own
maximum; the title gives the share of the token's attention that lands on patches
(the rest goes to the class token and the registers).

The model is rebuilt from the checkpoint's saved args (model, input size,
--model-kwargs; classes from the head), or from --model/--input-size.
"""
import argparse
import sys
from pathlib import Path

from common import Parser, create_model, fail, load_weights, model_spec, parse_model_kwargs, read_checkpoint

CELL_W, CELL_H, DPI = 2.0, 2.3, 100  # every panel (a map and its title) is 200 x 230 px


def parse_args(argv=None):
    p = Parser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 1)[1],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('image', help='input image (any format PIL reads)')
    p.add_argument('--checkpoint', help='.pth checkpoint or .safetensors from convert_checkpoint.py')
    p.add_argument('--ema', action='store_true', help="use the checkpoint's model_ema weights")
    p.add_argument('--model', help='model name (overrides the checkpoint; required without one)')
    p.add_argument('--input-size', type=int, help='input size (default: the checkpoint\'s, else 224)')
    p.add_argument('--model-kwargs', nargs='*', metavar='K=V', help='extra create_model kwargs')
    p.add_argument('--layers', type=int, nargs='+', default=[-1],
                   help='block indices, negative from the end (default: -1, the last)')
    p.add_argument('--heads', choices=('mean', 'all'), default='mean',
                   help='average the heads (default) or draw one row per head')
    p.add_argument('--out', default='attention.png', help='output PNG (default attention.png)')
    args = p.parse_args(argv)
    if not args.checkpoint and not args.model:
        p.error('give --checkpoint, or --model for a randomly initialised model')
    if not Path(args.image).is_file():
        p.error(f'image not found: {args.image}')
    return args


def build_model(args):
    if args.checkpoint:
        ckpt = read_checkpoint(args.checkpoint)
        name, kwargs = model_spec(ckpt, args.model, args.input_size, args.model_kwargs)
        model = create_model(name, **kwargs)
        load_weights(model, ckpt, args.ema)
    else:
        model = create_model(args.model, img_size=args.input_size or 224, **parse_model_kwargs(args.model_kwargs))
        name = f'{args.model} (random init)'
    if not hasattr(model, 'get_attention_maps'):
        fail(f'{name} has no get_attention_maps (only the models in models_vit5.py do)')
    return model.eval(), name


def load_image(path: str, size: int, mean, std):
    """Resize the short side to `size`, centre-crop, normalise: (display tensor, model input)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision import transforms as T
    try:
        img = Image.open(path).convert('RGB')
    except (UnidentifiedImageError, OSError) as e:
        fail(f'cannot read image {path}: {e}')
    shown = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                       T.ToTensor()])(img)
    return shown, T.Normalize(mean, std)(shown)[None]


def query_maps(probs, grid, num_registers: int):
    """(B, heads, N, N) attention -> (heads, 1 + R, h, w) maps of cls + registers over patches,
    and (heads, 1 + R) share of each query's attention that falls on patches."""
    h, w = grid
    prefix = 1 + num_registers  # token order: cls, registers, patches (the model's num_prefix_tokens)
    rows = probs[0][:, :prefix]  # (heads, 1 + R, N): the queries of cls and of each register
    on_patches = rows[..., prefix:]
    return on_patches.reshape(*on_patches.shape[:2], h, w), on_patches.sum(-1)


def draw(shown, panels, columns, out: str, title: str):
    """panels: list of (row label, (Q, h, w) maps, (Q,) patch shares)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    size = shown.shape[-2:]
    image = shown.permute(1, 2, 0).numpy()
    n_rows, n_cols = len(panels), 1 + len(columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * CELL_W, n_rows * CELL_H), dpi=DPI,
                             squeeze=False, layout='constrained')
    for row, (label, maps, shares) in zip(axes, panels):
        up = F.interpolate(maps[:, None], size=size, mode='bilinear', align_corners=False)[:, 0]
        row[0].imshow(image)
        row[0].set_ylabel(label, fontsize=9)
        for ax, name, m, share in zip(row[1:], columns, up, shares):
            ax.imshow(image)
            ax.imshow((m / m.max().clamp_min(1e-12)).numpy(), cmap='inferno', alpha=0.6, vmin=0, vmax=1)
            ax.set_title(f'{name}: {100 * share:.0f}% on patches', fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title('input', fontsize=8)
    fig.suptitle(title, fontsize=9)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    import torch
    model, name = build_model(args)
    depth = len(model.blocks)
    bad = [i for i in args.layers if not -depth <= i < depth]
    if bad:
        fail(f'--layers {bad[0]} is out of range for {depth} blocks (use 0..{depth - 1} or -{depth}..-1)')
    layers = sorted({i % depth for i in args.layers})

    size = model.patch_embed.img_size[0]
    cfg = model.pretrained_cfg
    shown, x = load_image(args.image, size, cfg['mean'], cfg['std'])
    with torch.no_grad():
        maps, grid = model.get_attention_maps(x, layers)
        logits = model(x)
    columns = ['cls'] + [f'reg {r}' for r in range(model.num_registers)]
    panels = []
    for layer in layers:
        per_head, shares = query_maps(maps[layer], grid, model.num_registers)
        if args.heads == 'mean':
            panels.append((f'layer {layer}, mean', per_head.mean(0), shares.mean(0)))
        else:
            panels += [(f'layer {layer}, head {h}', per_head[h], shares[h]) for h in range(per_head.shape[0])]
    top = logits.softmax(-1)[0].max(0) if logits.shape[-1] else None
    pred = f', predicted class {top.indices.item()} ({100 * top.values.item():.0f}%)' if top is not None else ''
    draw(shown, panels, columns, args.out, f'{name}, {Path(args.image).name} at {size}px, '
                                           f'{grid[0]}x{grid[1]} patches{pred}')
    print(f'wrote {args.out}: {len(panels)} rows x {1 + len(columns)} columns')


if __name__ == '__main__':
    sys.exit(main())
