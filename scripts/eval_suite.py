"""Evaluate one checkpoint on every evaluation set whose folder is given, and write one table.

    python scripts/eval_suite.py --ckpt vit5_base.in1k --output-dir results/vit5_base \\
        --in1k /datasets/imagenet --real /datasets/imagenet --v2 /datasets/imagenetv2-matched-frequency-format-val \\
        --a /datasets/imagenet-a --r /datasets/imagenet-r --sketch /datasets/sketch -- --eval-crop-ratio 1.0
    torchrun --nproc_per_node 8 scripts/eval_suite.py --ckpt CKPT --output-dir OUT --a DIR ... -- --dist-eval

--ckpt is a released tag (read as `main.py --finetune TAG` does) or a checkpoint file (read as
`main.py --eval --resume FILE` does: its stored args give the model). The model is built once, and
each set goes through main.py's own data and evaluation code with that set's rule (see eval_sets.py).
Flags after -- go to main.py (--batch-size, --num_workers, --device, --load_ema, --dist-eval, ...).

OUT/results.csv has the columns of timm's results files (set, model, images, top1, top1_err, top5,
top5_err, param_count in millions, img_size, crop_pct, interpolation), OUT/results.md the same table
in markdown, and OUT/results.jsonl one JSON line per set (with its folder and loss).
"""
import csv
import json
import os
import sys

from common import Parser  # puts the repository on the import path

import eval_sets
import main
import models_vit5
import utils
from utils import ConfigError

# main.py flags the suite sets itself, per set or from --ckpt
OWN_FLAGS = ('--eval-set', '--data-path', '--real-labels', '--resume', '--finetune', '--eval', '--output_dir')
CSV_COLUMNS = ('set', 'model', 'images', 'top1', 'top1_err', 'top5', 'top5_err', 'param_count', 'img_size',
               'crop_pct', 'interpolation')


def parse_args(argv=None):
    """(the suite's arguments, main.py's arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index('--') if '--' in argv else len(argv)
    own, extra = argv[:split], argv[split + 1:]
    p = Parser(prog='eval_suite.py', description=__doc__.split('\n\n')[0], allow_abbrev=False)
    p.add_argument('--ckpt', required=True, help='a released tag (vit5_small.in1k, ...) or a checkpoint file')
    p.add_argument('--output-dir', required=True, help='results.csv, results.md and results.jsonl go here')
    for name in eval_sets.EVAL_SETS:
        p.add_argument(f'--{name}', metavar='DIR', help=f'{eval_sets.TITLES[name]}: the folder as distributed')
    p.add_argument('--real-labels', metavar='FILE', help="ReaL label sets (when not given: timm's copy)")
    args = p.parse_args(own)
    args.roots = {name: getattr(args, name) for name in eval_sets.EVAL_SETS if getattr(args, name)}
    if not args.roots:
        p.error(f'no set to evaluate: give at least one of {", ".join("--" + n for n in eval_sets.EVAL_SETS)}')
    if args.real_labels and 'real' not in args.roots:
        p.error('--real-labels is read for --real, which is not given')
    clash = [a.split('=')[0] for a in extra if a.split('=')[0] in OWN_FLAGS]
    if clash:
        p.error(f'{clash[0]} after -- is set by the suite itself (give the set folders and --ckpt before --)')
    is_tag = not os.path.isfile(args.ckpt) and models_vit5.released_cfg(args.ckpt) is not None
    weights = ['--finetune' if is_tag else '--resume', args.ckpt]
    return args, main.parse_args(['--eval', *weights, *extra])


def evaluate_sets(suite):
    """main.main's body: the model built once, then each set in `suite.roots` evaluated by main.py's code."""
    def body(args, device, amp_dtype):
        main.check_output_dir(suite.output_dir)
        ckpt = main.start(args)
        model, results = None, []
        for name, root in suite.roots.items():
            args.eval_set, args.data_path = name, root
            args.real_labels = suite.real_labels if name == 'real' else None
            _, loader, n_images, nb_classes = main.build_loaders(args, device)
            if model is None:
                model = main.prepare_model(args, nb_classes, device, ckpt)
            elif nb_classes != model.num_classes:
                raise ConfigError(f'--{name} {root} is scored on {nb_classes} classes, but the model built for '
                                  f'the sets before it has {model.num_classes}')
            stats = main.run_eval(args, loader, model, device, amp_dtype, header=f'{eval_sets.TITLES[name]}:')
            print(f'{eval_sets.TITLES[name]}: top-1 {stats["acc1"]:.3f}, top-5 {stats["acc5"]:.3f} '
                  f'on {n_images} images')
            results.append(dict(set=name, title=eval_sets.TITLES[name], root=root, model=suite.ckpt,
                                images=stats['n'], top1=stats['acc1'], top5=stats['acc5'], loss=stats['loss'],
                                param_count=sum(p.numel() for p in model.parameters()) / 1e6,
                                img_size=args.input_size, crop_pct=args.eval_crop_ratio,
                                interpolation='bicubic', load_ema=args.load_ema))
        if utils.is_main_process():
            write_results(suite.output_dir, results)
        return results
    return body


def table_rows(results):
    """Rows of CSV_COLUMNS, numbers rounded as timm's results files round them."""
    return [dict(set=r['set'], model=r['model'], images=r['images'], top1=f'{r["top1"]:.3f}',
                 top1_err=f'{100 - r["top1"]:.3f}', top5=f'{r["top5"]:.3f}', top5_err=f'{100 - r["top5"]:.3f}',
                 param_count=f'{r["param_count"]:.2f}', img_size=r['img_size'], crop_pct=r['crop_pct'],
                 interpolation=r['interpolation']) for r in results]


def write_results(out: str, results) -> None:
    os.makedirs(out, exist_ok=True)
    rows = table_rows(results)
    with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ['| set | images | top-1 | top-5 |', '|---|---|---|---|']
    lines += [f'| {r["title"]} | {r["images"]:,} | {row["top1"]} | {row["top5"]} |' for r, row in zip(results, rows)]
    table = '\n'.join(lines) + '\n'
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write(f'{results[0]["model"]}, {results[0]["img_size"]} px, crop {results[0]["crop_pct"]}\n\n' + table)
    with open(os.path.join(out, 'results.jsonl'), 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in results)
    print('\n' + table + f'\nWritten: {", ".join(os.path.join(out, n) for n in ("results.csv", "results.md", "results.jsonl"))}')


def cli(argv=None) -> int:
    suite, args = parse_args(argv)
    return main.guarded(args, evaluate_sets(suite))


if __name__ == '__main__':
    sys.exit(cli())
