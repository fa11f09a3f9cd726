"""Run-level helpers: distributed setup, signals, progress logging, the run folder.

Nothing here knows about the model or the data; main.py, engine.py and checkpoint.py import from it.
"""
import builtins
import contextlib
import datetime
import math
import os
import random
import signal
import sys
import threading
import time
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


class Stopped(Exception):
    """A stop signal (SIGTERM, SIGUSR1) ended training at a step boundary, after its checkpoint was written."""


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
    refuse_stale_store_restarts()
    dist.init_process_group(backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank,
                            timeout=dist_timeout(args), **bind)
    dist.barrier(device_ids=[args.local_rank] if device_type == 'cuda' else None)
    quiet_non_main_ranks(args.rank == 0)
    print(f'Distributed: {args.world_size} process(es), {backend} backend')


def refuse_stale_store_restarts() -> None:
    """torchrun --max-restarts with the store its agent shares with the workers cannot restart: that store
    outlives the failed group, so the restarted group's gloo or NCCL rendezvous reads the dead processes'
    addresses ('Gloo connectFullMesh failed ... Connection refused'; pytorch/pytorch#135712, #167288).
    With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and c10d rendezvous (--standalone, or --rdzv-backend c10d)
    each round gets a fresh store; the static rendezvous (torchrun's default without those) always shares."""
    env = os.environ
    if env.get('TORCHELASTIC_USE_AGENT_STORE') == 'True' and int(env.get('TORCHELASTIC_MAX_RESTARTS', 0)) > 0:
        raise ConfigError('torchrun --max-restarts cannot restart this group: its workers share the agent\'s store, '
                          'where a restarted group finds the failed one\'s addresses; set '
                          'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and launch with --standalone (one node) or '
                          '--rdzv-backend c10d --rdzv-endpoint HOST:PORT (the scripts/ launchers do both)')


def lost_contact(err: BaseException) -> bool:
    """True for the errors a collective raises when another rank died, hung past --dist-timeout or lost its
    node: torch's DistError family, and gloo's plain RuntimeErrors (their text names gloo's sources)."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and (
        '/gloo/' in str(err) or 'NCCL' in str(err)))


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


# ---- signals: Ctrl-C, and the stop signals of clusters --------------------------------------------------
_interrupted = False
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # SLURM's preemption / time limit (--signal), Kubernetes eviction
_stop_signal = None  # the name of the first stop signal received


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


@contextlib.contextmanager
def stop_signals_noted():
    """Inside: SIGTERM and SIGUSR1 ask training to stop, and the handler only notes the signal. The training
    loop reads the note where the ranks meet anyway (engine: the loss read at each progress line), all ranks
    agree to stop at the end of that optimizer step, write its checkpoint and leave (main.py). On leaving,
    the handlers from before are back and the note is dropped (main.py's code also runs inside other
    programs: tests, scripts).

    A process forked from this one inherits the handler: a DataLoader worker blocks these signals
    (loader_worker_init); any other child (a multiprocessing pool, ...) gets the signals' default action."""
    global _stop_signal
    _stop_signal = None
    main_pid = os.getpid()

    def on_stop(signum, frame):
        global _stop_signal
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        elif _stop_signal is None:
            _stop_signal = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, on_stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_signal = None  # a note is about the run inside


def stop_requested():
    """The name of the stop signal this process received ('SIGTERM', 'SIGUSR1'), or None."""
    return _stop_signal


def loader_worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn: a terminal's Ctrl-C reaches the whole process group, and SLURM sends
    its stop signals to every process of a job step, but only the main process should act on them (it
    stops the workers); a worker that died of one would print its own traceback and leave the main
    process waiting for its batch. The worker's helper threads talk to the main process only (they hand
    it the batches' shared memory); when it stops, their connection drops mid-transfer, which is no
    news worth a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # not ignored outright: the DataLoader (and multiprocessing, at exit) end workers with SIGTERM
    if hasattr(signal, 'sigwaitinfo'):  # Linux (SLURM's home); macOS has no sigwaitinfo
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # in this thread and the threads started from it
        threading.Thread(target=_take_stop_signals_from, args=(os.getppid(),), daemon=True).start()
    lost = (ConnectionError, EOFError)
    thread_hook, hook = threading.excepthook, sys.excepthook  # multiprocessing's fd server reports via the latter
    threading.excepthook = lambda a: None if issubclass(a.exc_type, lost) else thread_hook(a)
    sys.excepthook = lambda kind, value, tb: None if issubclass(kind, lost) else hook(kind, value, tb)


def _take_stop_signals_from(parent: int) -> None:
    """A DataLoader worker's stop signals: from the main process (the DataLoader ending its workers) they
    end the worker at once; from anyone else (SLURM signalling the whole job step) they are dropped."""
    while True:
        if signal.sigwaitinfo(set(STOP_SIGNALS)).si_pid == parent:
            os._exit(0)


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

    The same collective carries each rank's stop request (`read(stop=True)` on a rank that received a
    stop signal); afterwards `stopping` says, alike on every rank, whether any rank asked.
    """

    def __init__(self, device: torch.device):
        self.device = device
        dtype = torch.float32 if device.type == 'mps' else torch.float64  # MPS has no float64
        # [loss sum, first non-finite step, stop requested], built on the device (no host-to-device copy)
        self.state = torch.zeros(3, dtype=dtype, device=device)
        self.state[1].fill_(math.inf)
        self.steps = 0  # on this rank; every rank runs the same number (drop_last, equal shards)
        self.read_sum, self.read_steps = 0.0, 0  # all ranks, as of the previous read
        self.stopping = False

    def add(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().reshape(()).to(self.state.dtype)
        self.state[0].add_(loss)
        self.state[1].clamp_(max=torch.where(torch.isfinite(loss), math.inf, step))
        self.steps += 1

    def read(self, where: str, stop: bool = False) -> tuple:
        """(mean loss since the previous read, the number of losses it averages), over all ranks."""
        if stop:
            self.state[2].fill_(1)  # a kernel with a host scalar: no sync
        with sync_allowed(self.device):
            parts = [self.state]
            if is_dist():
                parts = [torch.empty_like(self.state) for _ in range(get_world_size())]
                dist.all_gather(parts, self.state)
            per_rank = torch.stack(parts).tolist()  # [[loss sum, first bad step, stop], ...] per rank
        self.stopping = any(row[2] for row in per_rank)
        first_bad = min(row[1] for row in per_rank)
        if math.isfinite(first_bad):
            ranks = ', '.join(str(r) for r, row in enumerate(per_rank) if row[1] == first_bad)
            raise NonFiniteLossError(
                f'loss is non-finite at {where}, step {int(first_bad)} (rank {ranks}); training stopped on '
                f'every rank at step {self.steps - 1}, nothing saved for this epoch')
        total, steps = sum(row[0] for row in per_rank), self.steps * len(per_rank)
        new_sum, new_steps = total - self.read_sum, steps - self.read_steps
        self.read_sum, self.read_steps = total, steps
        return new_sum / max(new_steps, 1), new_steps

    def state_dict(self) -> dict:
        """This rank's numbers so far (one host read), for a mid-epoch checkpoint."""
        with sync_allowed(self.device):
            loss_sum, first_bad, _ = self.state.tolist()
        return dict(sum=loss_sum, first_bad=first_bad, steps=self.steps, read_sum=self.read_sum,
                    read_steps=self.read_steps)

    def load_state_dict(self, state: dict) -> None:
        self.state[0].fill_(state['sum'])
        self.state[1].fill_(state['first_bad'])
        self.steps, self.read_sum, self.read_steps = state['steps'], state['read_sum'], state['read_steps']


def all_finite(tensors) -> bool:
    """True when every floating-point tensor (all on one device) is finite: one host read in all."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


# ---- seeding ------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ---- the run folder ----------------------------------------------------------------------------------
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

    def state_dict(self) -> dict:
        return dict(window=list(self.window), total=self.total, count=self.count)

    def load_state_dict(self, state: dict) -> None:
        self.window.clear()
        self.window.extend(state['window'])
        self.total, self.count = state['total'], state['count']


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

    def log_every(self, iterable, print_freq: int, header: str = '', batch_size: int = 0, first: int = 0):
        """Yield from `iterable`, printing every `print_freq` steps and at the last one:
        eta, the meters, img/s (per process, when batch_size is given), step and data time, peak memory.
        `first`: the step `iterable` starts at (a resumed epoch's batches after the ones it skipped)."""
        n = first + len(iterable)
        step_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        width = len(str(n))
        start = end = time.time()
        for i, obj in enumerate(iterable, first):
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
        print(f'{header} Total time: {datetime.timedelta(seconds=int(total))} ({total / max(n - first, 1):.4f} s / it)')
