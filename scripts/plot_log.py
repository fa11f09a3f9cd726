"""Plot training curves from main.py's log.txt files, several runs overlaid.

    python scripts/plot_log.py runs/full/log.txt runs/no_rope/log.txt --out compare.png

Four panels against the epoch: train loss, test top-1, EMA test top-1, learning
rate. Each run is labelled with its folder name (or --labels) and its best top-1.
log.txt holds one JSON object per epoch (keys epoch, train_loss, train_lr,
test_acc1, test_acc1_ema, ...); missing keys leave a panel empty for that run.
"""
import argparse
import json
import sys
from pathlib import Path

from common import Parser, fail

PANELS = (  # (log key, panel title)
    ('train_loss', 'train loss'),
    ('test_acc1', 'test top-1 (%)'),
    ('test_acc1_ema', 'EMA test top-1 (%)'),
    ('train_lr', 'learning rate'),
)
FIGSIZE, DPI = (10, 7), 100  # 1000 x 700 px


def parse_args(argv=None):
    p = Parser(description=__doc__.split('\n\n')[0], epilog=__doc__.split('\n\n', 1)[1],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('logs', nargs='+', help='log.txt files (or run folders holding one)')
    p.add_argument('--labels', nargs='+', help='one label per log (default: the parent folder names)')
    p.add_argument('--out', default='curves.png', help='output PNG (default curves.png)')
    p.add_argument('--title', default='', help='figure title')
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.logs):
        p.error(f'--labels got {len(args.labels)} names for {len(args.logs)} logs')
    return args


def read_log(path: Path) -> list:
    """One dict per epoch, sorted by epoch (a resumed run may repeat epochs: the last entry wins)."""
    if path.is_dir():
        path = path / 'log.txt'
    if not path.is_file():
        fail(f'log not found: {path}')
    rows = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            fail(f'{path}:{n} is not a JSON line (expected main.py\'s log.txt)')
        if not isinstance(row, dict) or 'epoch' not in row:
            fail(f'{path}:{n} has no "epoch" (expected main.py\'s log.txt)')
        rows[row['epoch']] = row
    if not rows:
        fail(f'{path} is empty')
    return [rows[e] for e in sorted(rows)]


def default_labels(paths: list) -> list:
    """Parent folder names; the full folder paths if those collide."""
    folders = [p if p.is_dir() else p.parent for p in paths]
    names = [f.resolve().name for f in folders]
    return names if len(set(names)) == len(names) else [str(f) for f in folders]


def main(argv=None):
    args = parse_args(argv)
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = [Path(p) for p in args.logs]
    runs = [read_log(p) for p in paths]
    labels = args.labels or default_labels(paths)

    fig, axes = plt.subplots(2, 2, figsize=FIGSIZE, dpi=DPI, sharex=True)
    for (key, title), ax in zip(PANELS, axes.flat):
        for rows, label in zip(runs, labels):
            points = [(r['epoch'], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker='.' if len(points) < 30 else None, label=label)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1, 1].set_yscale('log')
    for ax in axes[1]:
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    best = [max((r.get('test_acc1') or 0 for r in rows), default=0) for rows in runs]
    handles, _ = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, [f'{lab} (best top-1 {b:.2f})' for lab, b in zip(labels, best)],
               loc='lower center', ncol=min(len(labels), 3), fontsize=9, frameon=False)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout(rect=(0, 0.04 * ((len(labels) + 2) // 3), 1, 1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=DPI)
    plt.close(fig)
    summary = ', '.join(f'{lab}: {len(rows)} epochs, best top-1 {b:.2f}' for lab, rows, b in zip(labels, runs, best))
    print(f'wrote {args.out} ({summary})')


if __name__ == '__main__':
    sys.exit(main())
