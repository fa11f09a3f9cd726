"""Seconds per mid-epoch checkpoint: main.py's own save of the released pretraining state (model, EMA, timm's
LAMB state after a step, schedule, scaler) for each model, written where --dir is.

    python scripts/benchmark_checkpoint.py --models vit5_small vit5_base --dir /scratch/ckpt --rounds 3

A save is checkpoint.save_checkpoint exactly as main.py calls it every --save-interval optimizer steps: the
state dicts gathered (copied to the host when on a GPU), torch.save to a temporary file, fsync, the file
read back whole, the previous checkpoint kept, the rename. Printed per model, median over rounds: the
file's size, the whole save, the read-back alone, and the --save-interval that keeps saving under 1% of
training time for a step time you give (--step-ms).
"""
import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import Parser, fail, parse_model_kwargs  # common also puts the repository on sys.path


def get_args_parser():
    p = Parser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', nargs='+', default=['vit5_small', 'vit5_base'])
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V', help='e.g. depth=2 (for a quick try)')
    p.add_argument('--dir', default=None, help='where the checkpoints are written (default: a temporary folder)')
    p.add_argument('--rounds', type=int, default=3, help='saves per model; the median is reported')
    p.add_argument('--device', default=None, help='default: cuda when there, else cpu')
    p.add_argument('--step-ms', type=float, nargs='+', default=[],
                   help="a training step's time per model (ms), for the --save-interval that keeps saves under 1%%")
    p.add_argument('--json', default=None, help='also write the results to this file')
    return p


def parse_args(argv=None):
    p = get_args_parser()
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error('--rounds must be >= 1')
    if args.step_ms and len(args.step_ms) != len(args.models):
        p.error(f'--step-ms needs one time per model ({len(args.models)}), got {len(args.step_ms)}')
    if args.dir and not Path(args.dir).is_dir():
        p.error(f'--dir {args.dir} is not a folder')
    return args


def training_state(name: str, model_kwargs: dict, device) -> dict:
    """main.py's checkpoint of the released pretraining recipe for `name`, after one optimizer step."""
    import torch
    import main as main_py  # registers the vit5_* models with timm
    args = main_py.parse_args(['--model', name, '--opt', 'fusedlamb', '--lr', '4e-3', '--weight-decay', '0.05',
                               '--device', device.type, '--epochs', '800'])
    args.model_kwargs = model_kwargs
    model = main_py.build_model(args, 1000).to(device)
    optimizer = main_py.build_optimizer(args, model, device)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the optimizer's state (LAMB: two moments per weight) exists from the first step on
    ema = main_py.build_ema(args, model)
    scheduler = main_py.build_scheduler(args, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    progress = dict(loss=dict(sum=0.0, first_bad=float('inf'), steps=1, read_sum=0.0, read_steps=0), meters={})
    return dict(args=args, model=model, model_ema=ema, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                max_accuracy=None, batches_done=1, progress=progress)


def measure(name: str, model_kwargs: dict, folder: Path, rounds: int, device) -> dict:
    import torch
    import checkpoint
    parts = training_state(name, model_kwargs, device)
    path = folder / f'{name}_checkpoint.pth'
    saves, reads = [], []
    for _ in range(rounds):
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        state = checkpoint.training_state(epoch=0, **parts)
        checkpoint.save_checkpoint(state, str(path), keep_previous=True)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpoint.load_checkpoint(str(path))
        reads.append(time.perf_counter() - start)
    size = path.stat().st_size
    for p in (path, Path(checkpoint.previous_path(str(path)))):
        p.unlink(missing_ok=True)
    return dict(model=name, params=sum(p.numel() for p in parts['model'].parameters()), mb=size / 2 ** 20,
                save_s=statistics.median(saves), read_back_s=statistics.median(reads))


def main(argv=None):
    args = parse_args(argv)  # before the heavy imports: --help and mistakes answer at once
    import torch
    from utils import ConfigError
    try:
        device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError as err:
        fail(f'--device {args.device}: {err}')
    kwargs = parse_model_kwargs(args.model_kwargs)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        results = []
        for name in args.models:
            try:
                results.append(measure(name, kwargs, Path(folder), args.rounds, device))
            except ConfigError as err:
                fail(str(err))
    print(f'{"model":<14}{"params":>12}{"file MB":>10}{"save s":>9}{"of which read-back s":>22}'
          + ('  --save-interval for < 1%' if args.step_ms else ''))
    for i, r in enumerate(results):
        line = f'{r["model"]:<14}{r["params"]:>12,}{r["mb"]:>10.0f}{r["save_s"]:>9.2f}{r["read_back_s"]:>22.2f}'
        if args.step_ms:
            r['step_ms'] = args.step_ms[i]
            r['min_interval'] = int(100 * r['save_s'] * 1000 / args.step_ms[i]) + 1
            line += f'  >= {r["min_interval"]} steps of {args.step_ms[i]:g} ms'
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()
