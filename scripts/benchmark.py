"""Training-step and inference throughput, peak memory and MFU of timm models (ours included).

    # the step main.py trains with, ViT-5-S against timm's ViT-S, bf16 on a GPU, compiled
    python scripts/benchmark.py --models vit_small_patch16_224 vit5_small --mode step --batch-size 256 \\
        --compile-mode max-autotune --peak-tflops 989
    # the bare model on a CPU, float32
    python scripts/benchmark.py --models deit3_small_patch16_224 vit5_small --batch-size 8 --mode train --rounds 5

Modes (--mode, one or more; default: step train infer):
  step   the training step main.py runs: engine.train_one_epoch (mixup/cutmix, forward under autocast, loss,
         backward, optimizer, EMA, and its host read every 10 steps) with the optimizer, EMA, mixup and loss
         built by main.py's own functions from main.py flags: the released pretraining recipe (timm's LAMB or
         apex FusedLAMB, EMA, mixup + cutmix, BCE, drop path 0.05) plus --main-args. Synthetic data: one
         batch, already on the device.
  train  the bare model: forward + cross-entropy + backward + AdamW
  infer  forward under inference_mode
  opt    main.py's optimizer step alone, gradients preset (ms per step)
  ema    main.py's EMA update alone (ms per step)
Models are measured in alternating rounds (A, B, A, B, ...) in one process; img/s (or ms) is the median over
rounds, and `ratio` (speed relative to the first model, > 1 is faster) is the median of the per-round
ratios, so load from other processes on a shared machine hits both sides of each comparison alike.
MFU: a training step costs ~3 forward passes (backward = 2x forward), FLOPs counted by PyTorch's
FlopCounterMode on one forward (matmuls, convolutions, attention).
Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the growth of the PROCESS peak RSS
(VmHWM in /proc/self/status, reset per measurement through /proc/self/clear_refs where allowed),
which includes allocator caching and is only a rough guide.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import io
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
import timm
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from common import fail, parse_model_kwargs  # common also puts the repository on sys.path
import engine  # noqa: E402
import main as main_py  # noqa: E402  (main.py; also registers the vit5_* / deit_*_LS models with timm)
from losses import build_criterion  # noqa: E402

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
MODES = ('step', 'train', 'infer', 'opt', 'ema')
RATE_MODES = ('step', 'train', 'infer')  # reported in img/s; opt and ema in ms per call
# the released pretraining flags that shape the step (sizes, lr and epochs do not change its speed)
RECIPE = ['--opt', 'fusedlamb', '--lr', '4e-3', '--weight-decay', '0.05', '--mixup', '0.8', '--cutmix', '1.0',
          '--bce-loss', '--smoothing', '0.0', '--drop-path', '0.05']
SDPA_BACKENDS = ('auto', 'cudnn', 'flash', 'efficient', 'math')
# the aten op each fused SDPA backend runs as (the math backend runs as plain ops)
SDPA_OPS = {'_scaled_dot_product_cudnn_attention': 'cudnn', '_scaled_dot_product_flash_attention': 'flash',
            '_scaled_dot_product_efficient_attention': 'efficient',
            '_scaled_dot_product_flash_attention_for_cpu': 'flash (CPU)',
            '_scaled_dot_product_fused_attention_overrideable': 'overrideable'}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', nargs='+', required=True, help='timm model names (ours: vit5_small, ...)')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V',
                   help='constructor keywords for every model, e.g. depth=2 (tiny smoke runs)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='cpu, cuda, cuda:1, ... (default: cuda when present)')
    p.add_argument('--amp-dtype', choices=list(DTYPES), default=None,
                   help='autocast dtype (default: float32 on CPU = no autocast, bfloat16 on CUDA)')
    p.add_argument('--batch-size', type=int, default=None, help='default: 64 on CUDA, 8 on CPU')
    p.add_argument('--img-size', type=int, default=224, help='image side in pixels (default 224)')
    p.add_argument('--compile', action='store_true', help='torch.compile each model (mode default)')
    p.add_argument('--compile-mode', choices=main_py.COMPILE_MODES, default=None,
                   help="torch.compile mode, as main.py's --compile-mode (implies --compile)")
    p.add_argument('--compile-backend', default='inductor',
                   help="torch.compile backend; 'aot_eager' checks capture without code generation (CPU smoke)")
    p.add_argument('--mode', nargs='+', choices=MODES + ('both', 'all'), default=['step', 'train', 'infer'],
                   help="what to time (see above); 'both' = train infer, 'all' = every mode")
    p.add_argument('--main-args', default='', metavar='"FLAGS"',
                   help='main.py flags added to the recipe for step/opt/ema, e.g. --main-args="--opt adamw '
                        '--opt-fused --tf32"')
    p.add_argument('--sdpa-backend', choices=SDPA_BACKENDS, default='auto',
                   help="force one scaled_dot_product_attention backend (default: PyTorch's pick)")
    p.add_argument('--ddp', action='store_true',
                   help="step mode under DDP in a 1-process group (main.py's wrap_ddp and --ddp-* flags)")
    p.add_argument('--steps', type=int, default=5, help='timed steps per round')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps before the first round')
    p.add_argument('--rounds', type=int, default=3, help='alternating rounds; medians are reported')
    p.add_argument('--peak-tflops', type=float, default=None, help='device peak, to report MFU (H100 bf16: 989)')
    p.add_argument('--json', default=None, help='also write the results to this file')
    return p


@dataclasses.dataclass
class Entry:
    """One column of a comparison: a model and the settings it runs with."""
    model: str
    label: str = ''  # the key in the results; default: the model name
    main_args: Sequence[str] = ()  # more main.py flags for this entry alone
    sdpa_backend: str = 'auto'
    ddp: bool = False

    def __post_init__(self):
        self.label = self.label or self.model


# ---- memory and timing ----------------------------------------------------------------------------
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


def time_calls(fn, n: int, device: torch.device) -> float:
    """Seconds for n calls of fn: CUDA events around them on a GPU (after draining the queue), else wall time."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


# ---- attention backend ------------------------------------------------------------------------------
def sdpa_context(backend: str):
    """Restrict scaled_dot_product_attention to one backend ('auto': PyTorch picks)."""
    if backend == 'auto':
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    names = dict(cudnn='CUDNN_ATTENTION', flash='FLASH_ATTENTION', efficient='EFFICIENT_ATTENTION', math='MATH')
    return sdpa_kernel([getattr(SDPBackend, names[backend])])


class _OpNames(TorchDispatchMode):
    """Records the aten ops that run (below autograd: SDPA shows as the backend op it picked)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def sdpa_kernels_used(fn) -> str:
    """The SDPA backend(s) fn's attention runs on: cudnn / flash / efficient / math ('' without SDPA)."""
    ops = _OpNames()
    with ops:
        fn()
    found = sorted({SDPA_OPS[n] for n in ops.names if n in SDPA_OPS})
    if not found and {'_safe_softmax', '_softmax'} & ops.names:
        found = ['math']
    return '+'.join(found)


# ---- one model ----------------------------------------------------------------------------------
class SameBatch:
    """A data loader of n copies of one batch already on the device: the step is measured, not the input."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int):
        self.x, self.y, self.n, self.batch_size = x, y, n, len(x)

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter([(self.x, self.y)] * self.n)


class Runner:
    """A model with a fixed batch and what each mode needs; `run(mode, n)` returns seconds for n steps."""

    def __init__(self, entry: Entry, args, device: torch.device, amp_dtype: torch.dtype):
        self.entry, self.name, self.device, self.amp_dtype = entry, entry.label, device, amp_dtype
        self.recipe = main_py.get_args_parser().parse_args([*RECIPE, *shlex.split(args.main_args), *entry.main_args])
        kwargs = dict(img_size=args.img_size, drop_path_rate=self.recipe.drop_path, **args.model_kwargs)
        try:
            model = timm.create_model(entry.model, **kwargs)
        except TypeError:  # models without an img_size argument (CNNs) take any size anyway
            model = timm.create_model(entry.model)
        self.eager = model.to(device)
        self.compile = args.compile_fn
        self.model = self.compile(self.eager)
        self.params = sum(p.numel() for p in model.parameters())
        self.num_classes = getattr(model, 'num_classes', 1000) or 1
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # the bare 'train' mode's
        self.autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        self.x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
        self.y = torch.randint(0, self.num_classes, (args.batch_size,), device=device)
        # main.py's process-wide settings (TF32) for this entry, re-applied before each of its runs
        before = torch.get_float32_matmul_precision()
        main_py.apply_speed_settings(self.recipe)
        self.matmul_precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(before)
        self._recipe_parts = None

    def recipe_parts(self):
        """What main.train() builds around the model, built by main.py's own functions."""
        if self._recipe_parts is None:
            a = self.recipe
            with contextlib.redirect_stdout(sys.stderr):  # main's notices (which LAMB runs) stay off stdout
                optimizer = main_py.build_optimizer(a, self.eager, self.device)
            model = self.model
            if self.entry.ddp:
                model = self.compile(main_py.wrap_ddp(self.eager, a, self.device))
            mixup = main_py.build_mixup(a, self.num_classes)
            self._recipe_parts = dict(
                model=model, optimizer=optimizer, ema=main_py.build_ema(a, self.eager), mixup_fn=mixup,
                criterion=build_criterion(mixup is not None, a.smoothing, a.bce_loss, a.cosub),
                scaler=torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16))
        return self._recipe_parts

    def train_epoch(self, loader, print_freq: int = engine.PRINT_FREQ) -> dict:
        """engine.train_one_epoch over `loader` with the recipe's parts, its printing muted."""
        p, a = self.recipe_parts(), self.recipe
        with contextlib.redirect_stdout(io.StringIO()):
            return engine.train_one_epoch(p['model'], p['criterion'], loader, p['optimizer'], self.device, 0,
                                          p['scaler'], self.amp_dtype, max_norm=a.clip_grad, model_ema=p['ema'],
                                          mixup_fn=p['mixup_fn'], cosub=a.cosub, print_freq=print_freq)

    def forward_flops(self) -> int:
        """FLOPs of one forward pass per image (matmuls, convs, attention; 2 per multiply-add). Attention is
        counted through SDPA's math backend, whose matmuls the counter knows on every device."""
        self.eager.eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), self.autocast, sdpa_context('math'), counter:
            self.eager(self.x[:1])
        return counter.get_total_flops()

    def sdpa_kernel(self) -> str:
        """The attention backend a training forward of the eager model picks (with this entry's setting)."""
        self.eager.train()
        with sdpa_context(self.entry.sdpa_backend), self.autocast:
            return sdpa_kernels_used(lambda: self.eager(self.x[:2]))

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
        torch.set_float32_matmul_precision(self.matmul_precision)
        calls = n
        if mode == 'step':
            step, calls = (lambda: self.train_epoch(SameBatch(self.x, self.y, n))), 1
        elif mode in ('train', 'infer'):
            self.model.train(mode == 'train')
            step = self.train_step if mode == 'train' else self.infer_step
        elif mode == 'opt':
            optimizer = self.recipe_parts()['optimizer']
            for p in self.eager.parameters():  # small random gradients: the step's arithmetic is what counts
                p.grad = torch.randn_like(p).mul_(1e-3)
            step = optimizer.step
        else:
            ema = self.recipe_parts()['ema']
            if ema is None:
                fail('--mode ema needs the EMA on (--main-args without --no-model-ema)')
            step = lambda: ema.update(self.eager)  # noqa: E731
        with sdpa_context(self.entry.sdpa_backend):
            return time_calls(step, calls, self.device)


def ensure_process_group(device: torch.device) -> None:
    """A 1-process group on a free local port (NCCL on CUDA, gloo otherwise), for --ddp."""
    if dist.is_initialized():
        return
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    # port 0: the group's store binds a free port itself and keeps it (no other process needs to find it)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', init_method='tcp://127.0.0.1:0',
                            rank=0, world_size=1)


# ---- main ---------------------------------------------------------------------------------------
def resolve(args) -> tuple:
    """Check and complete the settings; returns (device, amp dtype, modes). Errors end with one line."""
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        fail('--device cuda but CUDA is not available')
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    amp_dtype = DTYPES[args.amp_dtype or ('bfloat16' if device.type == 'cuda' else 'float32')]
    args.batch_size = args.batch_size or (64 if device.type == 'cuda' else 8)
    if isinstance(args.model_kwargs, list):
        args.model_kwargs = parse_model_kwargs(args.model_kwargs)
    modes = []
    for m in args.mode:
        for mode in dict(both=('train', 'infer'), all=MODES).get(m, (m,)):
            if mode not in modes:
                modes.append(mode)
    unknown = [n for n in args.models if not timm.is_model(n)]
    if unknown:
        fail(f'unknown model name(s): {", ".join(unknown)} (see timm.list_models() and models_vit5.py)')
    if 'step' in modes and args.batch_size % 2:
        fail(f'--mode step mixes pairs of images: use an even --batch-size, not {args.batch_size}')
    args.compile_mode = args.compile_mode or ('default' if args.compile else None)
    if args.compile_mode is None:
        args.compile_fn = lambda m: m  # noqa: E731
    elif args.compile_backend == 'inductor':
        args.compile_fn = lambda m: main_py.compile_model(m, args.compile_mode)  # noqa: E731
    else:
        args.compile_fn = lambda m: torch.compile(m, backend=args.compile_backend)  # noqa: E731
    return device, amp_dtype, modes


def make_runners(args, entries: Optional[Sequence[Entry]] = None) -> list:
    """A Runner per entry (default: one per --models name)."""
    device, amp_dtype, _ = resolve(args)
    entries = list(entries) if entries is not None else [Entry(n, sdpa_backend=args.sdpa_backend, ddp=args.ddp)
                                                           for n in args.models]
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        fail('each model may be named once in --models')
    if any(e.ddp for e in entries):
        ensure_process_group(device)
    return [Runner(e, args, device, amp_dtype) for e in entries]


def benchmark(args, entries: Optional[Sequence[Entry]] = None, runners: Optional[list] = None) -> dict:
    """Measure `entries` (or ready `runners`, e.g. already compiled) in alternating rounds; returns the results."""
    device, amp_dtype, modes = resolve(args)
    runners = runners or make_runners(args, entries)
    labels = [r.name for r in runners]
    results = {r.name: dict(model=r.entry.model, main_args=' '.join(r.entry.main_args), params_m=r.params / 1e6,
                            gflops_per_img=r.forward_flops() / 1e9, sdpa_kernel=r.sdpa_kernel()) for r in runners}

    for mode in modes:
        for r in runners:  # warm-up (and compilation), then one step alone for the peak memory
            r.run(mode, args.warmup)
            base = reset_peak_memory(device)
            r.run(mode, 1)
            results[r.name][f'{mode}_peak_mem_mb'] = peak_memory_mb(device, base)
        for i in range(args.rounds):
            line = []
            for r in runners:
                seconds = r.run(mode, args.steps)
                if mode in RATE_MODES:
                    value, unit = args.steps * args.batch_size / seconds, 'img/s'
                else:
                    value, unit = 1000 * seconds / args.steps, 'ms'
                results[r.name].setdefault(f'{mode}_{unit.replace("/", "_")}_rounds', []).append(value)
                line.append(f'{r.name} {value:.4g}')
            print(f'[{mode} round {i + 1}/{args.rounds}] {unit}: ' + ', '.join(line), file=sys.stderr, flush=True)

    first = results[labels[0]]
    for res in results.values():
        for mode in modes:
            key = f'{mode}_img_s' if mode in RATE_MODES else f'{mode}_ms'
            rounds = res[f'{key}_rounds']
            res[key] = statistics.median(rounds)
            # paired: each round's speed relative to the first model (measured just before), then the median
            pairs = zip(rounds, first[f'{key}_rounds'])
            res[f'{mode}_ratio'] = statistics.median(a / b if mode in RATE_MODES else b / a for a, b in pairs)
            if args.peak_tflops and mode in RATE_MODES:
                flops = res['gflops_per_img'] * 1e9 * (1 if mode == 'infer' else 3)
                res[f'{mode}_mfu'] = res[key] * flops / (args.peak_tflops * 1e12)
    config = dict(device=str(device), amp_dtype=str(amp_dtype).replace('torch.', ''), batch_size=args.batch_size,
                  img_size=args.img_size, compile=args.compile_mode is not None, compile_mode=args.compile_mode,
                  compile_backend=args.compile_backend, modes=modes, recipe=' '.join(RECIPE),
                  main_args=args.main_args, model_kwargs=args.model_kwargs, steps=args.steps, warmup=args.warmup,
                  rounds=args.rounds, peak_tflops=args.peak_tflops, torch=torch.__version__,
                  timm=timm.__version__, threads=torch.get_num_threads(),
                  gpu=torch.cuda.get_device_name(device) if device.type == 'cuda' else None)
    return dict(config=config, models=results)


COLUMNS = [('img/s', '_img_s', '.4g'), ('ms', '_ms', '.3g'), ('ratio', '_ratio', '.3f'), ('MFU', '_mfu', '.1%'),
           ('peak MB', '_peak_mem_mb', '.0f')]


def table(out: dict) -> str:
    """The results as a text table, one row per model, columns per mode."""
    cfg, models = out['config'], out['models']
    lines = [f"device {cfg['device']}, {cfg['amp_dtype']}, batch {cfg['batch_size']}, {cfg['img_size']} px, "
             f"compile {cfg['compile_mode'] or 'off'}, median of {cfg['rounds']} rounds x {cfg['steps']} steps"]
    cols = [('params (M)', 'params_m', '.2f'), ('GFLOPs/img', 'gflops_per_img', '.2f'), ('SDPA', 'sdpa_kernel', 's')]
    for mode in cfg['modes']:
        cols += [(f'{mode} {head}', mode + suffix, f) for head, suffix, f in COLUMNS]
    cols = [c for c in cols if any(c[1] in m for m in models.values())]
    width = max(len('model'), *map(len, models))
    lines.append(f"{'model':<{width}}  " + '  '.join(f'{h:>13}' for h, _, _ in cols))
    for name, res in models.items():
        lines.append(f'{name:<{width}}  ' + '  '.join(f'{format(res[k], f):>13}' for _, k, f in cols))
    return '\n'.join(lines)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    out = benchmark(args)
    print(table(out))
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == '__main__':
    main()
