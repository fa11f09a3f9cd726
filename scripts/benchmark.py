"""Training-step and inference throughput, peak memory and MFU of timm models (ours included).

    python scripts/benchmark.py --models deit3_small_patch16_224 vit5_small --batch-size 8 --mode train --rounds 5
    python scripts/benchmark.py --models vit_base_patch16_224 vit5_base --amp-dtype bfloat16 --compile \\
        --peak-tflops 989

A training step is forward + cross-entropy backward + AdamW step. Models are measured in
alternating rounds (A, B, A, B, ...) in one process; img/s is the median over rounds, and the
ratio to the first model is the median of the per-round ratios, so load from other processes
on a shared machine hits both sides of each comparison alike.
Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the growth of the PROCESS peak RSS
(VmHWM in /proc/self/status, reset per measurement through /proc/self/clear_refs where allowed),
which includes allocator caching and is only a rough guide.
"""
import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import timm
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import models_vit5  # noqa: F401,E402  (registers the vit5_* / deit_*_LS models with timm)

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', required=True, help='timm model names (ours: vit5_small, ...)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--amp-dtype', choices=list(DTYPES), default=None,
                   help='autocast dtype (default: float32 on CPU = no autocast, bfloat16 on CUDA)')
    p.add_argument('--batch-size', type=int, default=None, help='default: 64 on CUDA, 8 on CPU')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--compile', action='store_true', help='torch.compile each model')
    p.add_argument('--mode', choices=('train', 'infer', 'both'), default='both')
    p.add_argument('--steps', type=int, default=5, help='timed steps per round')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps before the first round')
    p.add_argument('--rounds', type=int, default=3, help='alternating rounds; medians are reported')
    p.add_argument('--peak-tflops', type=float, default=None, help='device peak, to report MFU')
    p.add_argument('--json', default=None, help='also write the results to this file')
    return p


# ---- memory -----------------------------------------------------------------------------------
def _proc_status_kb(field: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    return 0


def reset_peak_memory(device: torch.device) -> int:
    """Start a peak-memory measurement; returns the baseline in bytes."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return 0
    try:  # hand freed heap memory back to the OS first, or the previous run's cache hides this one's peak
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc
    try:
        Path('/proc/self/clear_refs').write_text('5')  # resets VmHWM to the current RSS
    except OSError:
        pass  # then VmHWM stays the process-lifetime peak
    return _proc_status_kb('VmRSS') * 1024


def peak_memory_mb(device: torch.device, baseline: int) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return max(_proc_status_kb('VmHWM') * 1024 - baseline, 0) / 2 ** 20


# ---- one model ----------------------------------------------------------------------------------
class Runner:
    """A model with its optimizer and a fixed batch; `run(mode, n)` returns seconds for n steps."""

    def __init__(self, name: str, args, device: torch.device, amp_dtype: torch.dtype):
        try:
            model = timm.create_model(name, img_size=args.img_size)
        except TypeError:  # models without an img_size argument (CNNs) take any size anyway
            model = timm.create_model(name)
        self.name, self.device = name, device
        self.eager = model.to(device)
        self.model = torch.compile(self.eager) if args.compile else self.eager
        self.params = sum(p.numel() for p in model.parameters())
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
        self.y = torch.randint(0, getattr(model, 'num_classes', 1000) or 1, (args.batch_size,), device=device)

    def forward_flops(self) -> int:
        """FLOPs of one forward pass per image (matmuls, convs, attention; 2 per multiply-add)."""
        self.eager.eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), self.autocast, counter:
            self.eager(self.x[:1])
        return counter.get_total_flops()

    def train_step(self):
        with self.autocast:
            loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    @torch.inference_mode()
    def infer_step(self):
        with self.autocast:
            self.model(self.x)

    def run(self, mode: str, n: int) -> float:
        self.model.train(mode == 'train')
        step = self.train_step if mode == 'train' else self.infer_step
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        return time.perf_counter() - t0


# ---- main ---------------------------------------------------------------------------------------
def benchmark(args) -> dict:
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        sys.exit('benchmark.py: error: --device cuda but CUDA is not available')
    amp_dtype = DTYPES[args.amp_dtype or ('bfloat16' if device.type == 'cuda' else 'float32')]
    args.batch_size = args.batch_size or (64 if device.type == 'cuda' else 8)
    unknown = [n for n in args.models if not timm.is_model(n)]
    if unknown:
        sys.exit(f'benchmark.py: error: unknown model name(s): {", ".join(unknown)} '
                 f'(see timm.list_models() and models_vit5.py)')
    if len(set(args.models)) != len(args.models):
        sys.exit('benchmark.py: error: each model may be named once in --models')
    modes = ('train', 'infer') if args.mode == 'both' else (args.mode,)
    runners = [Runner(n, args, device, amp_dtype) for n in args.models]
    results = {r.name: dict(params_m=r.params / 1e6, gflops_per_img=r.forward_flops() / 1e9) for r in runners}

    for mode in modes:
        for r in runners:  # warm-up (and compilation), then one step alone for the peak memory
            r.run(mode, args.warmup)
            base = reset_peak_memory(device)
            r.run(mode, 1)
            results[r.name][f'{mode}_peak_mem_mb'] = peak_memory_mb(device, base)
        for i in range(args.rounds):
            line = []
            for r in runners:
                rate = args.steps * args.batch_size / r.run(mode, args.steps)
                results[r.name].setdefault(f'{mode}_img_s_rounds', []).append(rate)
                line.append(f'{r.name} {rate:.4g}')
            print(f'[{mode} round {i + 1}/{args.rounds}] img/s: ' + ', '.join(line), file=sys.stderr, flush=True)

    first = results[args.models[0]]
    for res in results.values():
        for mode in modes:
            rounds = res[f'{mode}_img_s_rounds']
            res[f'{mode}_img_s'] = statistics.median(rounds)
            # paired: each round's ratio to the first model (measured just before), then the median
            res[f'{mode}_ratio'] = statistics.median(a / b for a, b in zip(rounds, first[f'{mode}_img_s_rounds']))
            if args.peak_tflops:  # a training step costs ~3 forward passes (backward = 2x forward)
                flops = res['gflops_per_img'] * 1e9 * (3 if mode == 'train' else 1)
                res[f'{mode}_mfu'] = res[f'{mode}_img_s'] * flops / (args.peak_tflops * 1e12)
    config = dict(device=str(device), amp_dtype=str(amp_dtype).replace('torch.', ''), batch_size=args.batch_size,
                  img_size=args.img_size, compile=args.compile, steps=args.steps, warmup=args.warmup,
                  rounds=args.rounds, peak_tflops=args.peak_tflops, torch=torch.__version__,
                  timm=timm.__version__, threads=torch.get_num_threads())
    return dict(config=config, models=results)


def print_table(out: dict):
    cfg, models = out['config'], out['models']
    print(f"device {cfg['device']}, {cfg['amp_dtype']}, batch {cfg['batch_size']}, {cfg['img_size']} px, "
          f"compile {cfg['compile']}, median of {cfg['rounds']} rounds x {cfg['steps']} steps")
    cols = [('params (M)', 'params_m', '.2f'), ('GFLOPs/img', 'gflops_per_img', '.2f')]
    for mode in ('train', 'infer'):
        cols += [(f'{mode} img/s', f'{mode}_img_s', '.4g'), ('ratio', f'{mode}_ratio', '.3f'),
                 (f'{mode} MFU', f'{mode}_mfu', '.1%'), (f'{mode} peak MB', f'{mode}_peak_mem_mb', '.0f')]
    cols = [c for c in cols if any(c[1] in m for m in models.values())]
    width = max(len('model'), *map(len, models))
    print(f"{'model':<{width}}  " + '  '.join(f'{h:>13}' for h, _, _ in cols))
    for name, res in models.items():
        print(f'{name:<{width}}  ' + '  '.join(f'{format(res[k], f):>13}' for _, k, f in cols))


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    out = benchmark(args)
    print_table(out)
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == '__main__':
    main()
