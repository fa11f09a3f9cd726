"""Run-level helpers: distributed setup, progress logging, RNG state, checkpoint files.

Nothing here knows about the model or the data; main.py and engine.py import from it, and so
do the scripts (`load_checkpoint`).
"""
import argparse
import builtins
import contextlib
import datetime
import math
import os
import pickle
import random
import re
import signal
import sys
import threading
import time
import warnings
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist


# ---- errors main.py turns into a one-line message -------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, not a checkpoint, or needs code to load."""


class ConfigError(ValueError):
    """The settings cannot work together (e.g. an input size the patch size does not divide)."""


class NonFiniteLossError(FloatingPointError):
    """The loss (or the weights) stopped being finite on at least one rank."""


# ---- distributed -------------------------------------------------------------------------------------
def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def launcher_env() -> dict:
    """rank / world size / local rank from torchrun (RANK, ...) or SLURM (SLURM_PROCID, ...); {} if neither."""
    env = os.environ
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return dict(rank=int(env['RANK']), world_size=int(env['WORLD_SIZE']),
                    local_rank=int(env.get('LOCAL_RANK', 0)))
    if 'SLURM_PROCID' in env and 'SLURM_NTASKS' in env:
        return dict(rank=int(env['SLURM_PROCID']), world_size=int(env['SLURM_NTASKS']),
                    local_rank=int(env.get('SLURM_LOCALID', 0)))
    return {}


# How long a collective may wait for the other ranks before the run fails (--dist-timeout, minutes).
# PyTorch's default is 10 minutes; ranks legitimately wait longer than that on rank 0's checkpoint writes
# and on uneven compile times (max-autotune), so a plain 10 would kill healthy runs.
DIST_TIMEOUT_MINUTES = 30.0


def dist_timeout(args) -> datetime.timedelta:
    """The collective timeout of the process group: --dist-timeout minutes (DIST_TIMEOUT_MINUTES without one)."""
    minutes = args.dist_timeout if getattr(args, 'dist_timeout', None) else DIST_TIMEOUT_MINUTES
    return datetime.timedelta(minutes=minutes)


def init_distributed(args, device_type: str) -> None:
    """Join the process group the launcher describes; a plain `python main.py` stays single-process.

    Sets args.distributed, args.rank, args.world_size and args.local_rank. NCCL on CUDA, gloo
    otherwise. One process (a SLURM job of one task, torchrun with one) stays single-process unless
    --distributed asks for a group of one, which runs the DDP code path on a single GPU.
    On CUDA the group is bound to GPU `local_rank` (device_id), so NCCL never guesses the GPU from
    the global rank (SLURM's cyclic layouts, one visible GPU per task). Every backend gets the
    collective timeout of `dist_timeout(args)`.
    """
    env = launcher_env()
    if args.world_size not in (1, env.get('world_size', 1)):
        raise ConfigError(f'--world_size {args.world_size} disagrees with the launcher, which started '
                          f'{env.get("world_size", 1)} process(es)')
    args.rank, args.local_rank = env.get('rank', 0), env.get('local_rank', 0)
    args.world_size = env.get('world_size', 1)
    if not env and args.distributed:
        raise ConfigError('--distributed needs a launcher: run under torchrun or SLURM (srun)')
    if args.world_size == 1 and not args.distributed:
        return  # one process and no --distributed: no process group, no DDP
    # a launcher with several processes, or one process with --distributed (DDP and its collectives
    # on one GPU: `torchrun --nproc_per_node 1 main.py --distributed ...`)
    args.distributed = True
    if args.dist_url == 'env://':
        # SLURM without torchrun sets no RANK/WORLD_SIZE; env:// reads them (MASTER_ADDR/PORT come from the job)
        for key in ('MASTER_ADDR', 'MASTER_PORT'):
            if key not in os.environ:
                raise ConfigError(f'--dist_url env:// needs {key} in the environment '
                                  f'(or pass --dist_url tcp://HOST:PORT)')
        os.environ.setdefault('RANK', str(args.rank))
        os.environ.setdefault('WORLD_SIZE', str(args.world_size))
    bind = {}
    if device_type == 'cuda':
        torch.cuda.set_device(args.local_rank)
        bind = dict(device_id=torch.device('cuda', args.local_rank))
    backend = 'nccl' if device_type == 'cuda' else 'gloo'
    dist.init_process_group(backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank,
                            timeout=dist_timeout(args), **bind)
    dist.barrier(device_ids=[args.local_rank] if device_type == 'cuda' else None)
    quiet_non_main_ranks(args.rank == 0)
    print(f'Distributed: {args.world_size} process(es), {backend} backend')


def quiet_non_main_ranks(is_main: bool) -> None:
    """Keep print() on rank 0 only (print(..., force=True) still prints everywhere)."""
    plain_print = builtins.print

    def rank_print(*a, force: bool = False, **kw):
        if is_main or force:
            plain_print(*a, **kw)

    builtins.print = rank_print


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- Ctrl-C -------------------------------------------------------------------------------------------
_interrupted = False


def handle_ctrl_c() -> None:
    """Make Ctrl-C stop the run reliably (the command line calls this; library use keeps Python's default).

    The first SIGINT raises KeyboardInterrupt as usual and is also remembered: one that arrives while
    DataLoader workers are being forked lands in a fork handler, where Python prints and drops the
    exception, and training would go on; `check_interrupted`, at every step, raises it there."""
    main_pid = os.getpid()

    def on_sigint(signum, frame):
        global _interrupted
        if os.getpid() != main_pid:  # a DataLoader worker, forked a moment ago: the main process stops it
            return
        _interrupted = True
        raise KeyboardInterrupt

    def quiet_after_interrupt(unraisable):
        # "Exception ignored in ..." reports after a Ctrl-C: the dropped interrupt itself (raised again at
        # the next step) or teardown it broke halfway (a DataLoader iterator interrupted in its __init__)
        if not _interrupted:
            sys.__unraisablehook__(unraisable)

    signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = quiet_after_interrupt


def interrupted() -> bool:
    return _interrupted


def check_interrupted() -> None:
    if _interrupted:
        raise KeyboardInterrupt


def loader_worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn: a terminal's Ctrl-C reaches the whole process group, but only the
    main process should act on it (it stops the workers); a worker that died of it would print its
    own traceback and leave the main process waiting for its batch. The worker's helper threads talk
    to the main process only (they hand it the batches' shared memory); when it stops, their connection
    drops mid-transfer, which is no news worth a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lost = (ConnectionError, EOFError)
    thread_hook, hook = threading.excepthook, sys.excepthook  # multiprocessing's fd server reports via the latter
    threading.excepthook = lambda a: None if issubclass(a.exc_type, lost) else thread_hook(a)
    sys.excepthook = lambda kind, value, tb: None if issubclass(kind, lost) else hook(kind, value, tb)


# ---- CPU threads -------------------------------------------------------------------------------------
MAX_DEFAULT_WORKERS = 10  # the released recipes' DataLoader workers per GPU


def cpu_share() -> int:
    """The CPU cores this process may use (its affinity), divided among the processes torchrun started on
    this machine (LOCAL_WORLD_SIZE); at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get('LOCAL_WORLD_SIZE', 1)))


def default_num_workers() -> int:
    """--num_workers when not given: one DataLoader worker per core of this process's share, at most 10.
    Never more than PyTorch's suggested maximum (the cores of the process), so no warning."""
    return min(MAX_DEFAULT_WORKERS, cpu_share())


def cpu_threads(num_workers: int):
    """Intra-op threads for a CPU process whose DataLoader workers (one thread each) share its cores:
    the cores of this process (its share under torchrun) minus the workers, at least 1.
    None when OMP_NUM_THREADS is set: then that is the user's choice and stays."""
    if 'OMP_NUM_THREADS' in os.environ:
        return None
    return max(1, cpu_share() - num_workers)


# ---- training loss and the finite-loss guard, read at log points only ------------------------------
def is_log_step(i: int, n: int, print_freq: int) -> bool:
    """The steps (of n) that print a progress line: every print_freq-th, and the last."""
    return i % print_freq == 0 or i == n - 1


@contextlib.contextmanager
def sync_allowed(device: torch.device):
    """A place where this code waits for the device on purpose.

    Lifts torch.cuda's sync debug mode inside, so a caller that sets it to 'error' over a training
    loop (scripts/gpu_report.py) catches every sync except the ones made here.
    """
    if device.type != 'cuda':
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


class RunningLoss:
    """The loss sum and the first non-finite step of an epoch, kept on the device.

    Copying a device value to the host waits for the device's queue to drain (a sync), and asking
    the other ranks costs a collective; doing both every step stalls the launch pipeline. `add` is a
    few tiny device ops. `read`, called where a progress line or the epoch end is due, gathers all
    ranks' numbers in one collective and copies them to the host once. If any rank saw a non-finite
    loss, every rank raises NonFiniteLossError there, naming the first such step: ranks stop
    together, before anything of the epoch is saved. The steps between that loss and the read have
    run (their updates may have made the weights non-finite); main.py never saves them.
    """

    def __init__(self, device: torch.device):
        self.device = device
        dtype = torch.float32 if device.type == 'mps' else torch.float64  # MPS has no float64
        # [loss sum, first non-finite step], built on the device (no host-to-device copy)
        self.state = torch.zeros(2, dtype=dtype, device=device)
        self.state[1].fill_(math.inf)
        self.steps = 0  # on this rank; every rank runs the same number (drop_last, equal shards)
        self.read_sum, self.read_steps = 0.0, 0  # all ranks, as of the previous read

    def add(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().reshape(()).to(self.state.dtype)
        self.state[0].add_(loss)
        self.state[1].clamp_(max=torch.where(torch.isfinite(loss), math.inf, step))
        self.steps += 1

    def read(self, where: str) -> tuple:
        """(mean loss since the previous read, the number of losses it averages), over all ranks."""
        with sync_allowed(self.device):
            parts = [self.state]
            if is_dist():
                parts = [torch.empty_like(self.state) for _ in range(get_world_size())]
                dist.all_gather(parts, self.state)
            per_rank = torch.stack(parts).tolist()  # [[loss sum, first bad step], ...] per rank
        first_bad = min(bad for _, bad in per_rank)
        if math.isfinite(first_bad):
            ranks = ', '.join(str(r) for r, (_, bad) in enumerate(per_rank) if bad == first_bad)
            raise NonFiniteLossError(
                f'loss is non-finite at {where}, step {int(first_bad)} (rank {ranks}); training stopped on '
                f'every rank at step {self.steps - 1}, nothing saved for this epoch')
        total, steps = sum(s for s, _ in per_rank), self.steps * len(per_rank)
        new_sum, new_steps = total - self.read_sum, steps - self.read_steps
        self.read_sum, self.read_steps = total, steps
        return new_sum / max(new_steps, 1), new_steps


def all_finite(tensors) -> bool:
    """True when every floating-point tensor (all on one device) is finite: one host read in all."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


# ---- RNG state (exact resume) ------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """Every global generator a training epoch draws from, as tensors and plain Python values only.

    numpy's key array is stored as a tensor so the checkpoint loads with weights_only=True.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(
        python=random.getstate(),
        numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                   has_gauss=int(has_gauss), gauss=float(gauss)),
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    )


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


# ---- run folder and checkpoint files -------------------------------------------------------------------
RUN_FILES = ('args.json', 'log.txt')  # what a run writes beside its checkpoints


def missing_folders(path: str):
    """(the folders of `path` that do not exist yet, innermost first; the nearest one that does)."""
    missing, folder = [], os.path.abspath(path)
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing, folder


@contextlib.contextmanager
def output_folder(path: str, keep_if: str):
    """Create the run's output folder (rank 0) for the `with` block. If the block fails (an error, Ctrl-C)
    before the file `keep_if` exists in it, the folders this call created go again with the run files in
    them, so a failed run leaves nothing behind. A folder that existed before is never removed."""
    if not path or not is_main_process():
        yield
        return
    created, _ = missing_folders(path)
    os.makedirs(path, exist_ok=True)
    try:
        yield
    except BaseException:
        if created and not os.path.exists(os.path.join(path, keep_if)):
            for name in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(path, name))
            for folder in created:
                with contextlib.suppress(OSError):  # not empty: something else wrote there, keep it
                    os.rmdir(folder)
        raise


def save_checkpoint(state: dict, path: str) -> None:
    """The one way this code writes a checkpoint: rank 0 only, atomically.

    The file is written beside its target and renamed over it, so a crash mid-write leaves the
    previous checkpoint whole and at most a stray `.tmp` file.
    """
    if not is_main_process():
        return
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# Files needing any global beyond these are refused: unpickling them could run code.
SAFE_GLOBALS = [argparse.Namespace]


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint dict on the CPU without executing anything stored in it.

    torch.load(weights_only=True) accepts tensors, plain containers and argparse.Namespace (the
    released files pickle one). Raises CheckpointError, naming the file, for a missing, empty,
    truncated or foreign file, and for one that would need other Python objects to load.
    """
    if os.path.isdir(path):
        inside = os.path.join(path, 'checkpoint.pth')
        hint = f'; did you mean {inside}?' if os.path.isfile(inside) else ''
        raise CheckpointError(f'checkpoint {path} is a folder, not a checkpoint file{hint}')
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist')
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter('ignore', UserWarning)  # pickle-protocol chatter from the safe unpickler
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r'GLOBAL (\S+)', str(err))
        if found:
            raise CheckpointError(
                f'refusing {path}: loading it needs the Python object {found.group(1)}, which could run code; '
                f'only tensors, plain containers and argparse.Namespace are loaded (it was not unpickled)') from None
        raise CheckpointError(f'{path} is not a PyTorch checkpoint this code can read safely') from None
    except EOFError:
        raise CheckpointError(f'{path} is empty or truncated') from None
    except (RuntimeError, OSError, KeyError, ValueError, IndexError, TypeError) as err:
        # the zip reader says 'failed finding central directory' for a cut-off file
        detail = str(err).split('.')[0][:120]
        raise CheckpointError(f'{path} is truncated or not a PyTorch checkpoint ({detail})') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict')
    return ckpt


# ---- progress logging --------------------------------------------------------------------------------
class SmoothedValue:
    """A scalar series: median / mean over a recent window, and the average over everything seen."""

    def __init__(self, window: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})'):
        self.window = deque(maxlen=window)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1):
        self.window.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return float(np.median(self.window)) if self.window else 0.0

    @property
    def avg(self) -> float:
        return float(np.mean(self.window)) if self.window else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(self.window) if self.window else 0.0

    @property
    def value(self) -> float:
        return self.window[-1] if self.window else 0.0

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


def max_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated on the GPU, or the process's peak resident set on the CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource  # POSIX only; ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricLogger:
    """Named SmoothedValues plus a progress printer for a loop over a data loader."""

    def __init__(self, device: torch.device, delimiter: str = '  '):
        self.meters = defaultdict(SmoothedValue)
        self.device, self.delimiter = device, delimiter

    def update(self, **values):
        for name, v in values.items():
            self.meters[name].update(v.item() if isinstance(v, torch.Tensor) else float(v))

    def add_meter(self, name: str, meter: SmoothedValue):
        self.meters[name] = meter

    def __str__(self):
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq: int, header: str = '', batch_size: int = 0):
        """Yield from `iterable`, printing every `print_freq` steps and at the last one:
        eta, the meters, img/s (per process, when batch_size is given), step and data time, peak memory."""
        n = len(iterable)
        step_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        width = len(str(n))
        start = end = time.time()
        for i, obj in enumerate(iterable):
            check_interrupted()
            data_time.update(time.time() - end)
            yield obj
            step_time.update(time.time() - end)
            if is_log_step(i, n, print_freq):
                eta = datetime.timedelta(seconds=int(step_time.global_avg * (n - i - 1)))
                parts = [f'{header} [{i:{width}d}/{n}]', f'eta: {eta}', str(self)]
                if batch_size:
                    parts.append(f'img/s: {batch_size / max(step_time.avg, 1e-9):.1f}')
                parts += [f'time: {step_time}', f'data: {data_time}',
                          f'max mem: {max_memory_mb(self.device):.0f}MB']
                print(self.delimiter.join(p for p in parts if p))
            end = time.time()
        total = time.time() - start
        print(f'{header} Total time: {datetime.timedelta(seconds=int(total))} ({total / max(n, 1):.4f} s / it)')
