"""Cluster faults as real processes on this machine (gloo on CPU), through the launch scripts' real commands:
a worker SIGKILLed under torchrun --max-restarts, a stop signal to one rank of a SLURM job that then
requeues itself, two torchrun agents standing for two nodes, a rank that hangs. Every run that trains to
the end does so bit-identical (model, EMA, log) to one that never stopped, without a traceback."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import checkpoint
from tinyrun import REPO, read_log

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available()
                                or not Path('/proc/self/environ').exists(),
                                reason='needs torch.distributed with gloo, and /proc (Linux)')

TORCHRUN = f'{sys.executable} -m torch.distributed.run'
SLURM_SHIMS = REPO / 'tests' / 'slurm'  # srun and scontrol stand-ins
# every launch trains the same tiny run: the launchers' recipes with these flags appended (later flags win)
FLAGS = ['--model', 'vit5_tiny', '--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2', '--input-size', '48',
         '--device', 'cpu', '--num_workers', '0', '--data-set', 'FOLDER', '--warmup-epochs', '1',
         '--cooldown-epochs', '0', '--batch', '2', '--epochs', '2', '--lr', '4e-3', '--drop-path', '0.05',
         '--model-ema-decay', '0.9', '--save-interval', '2']
STEPS = 18  # per epoch and rank: 24 images x 3 repeats over 2 ranks, batch 2
TIMEOUT = 300  # seconds any one launch may take on a busy 2-core machine


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """An image folder of real photo crops (JPEG, 40 to 160 px a side): 3 classes of 8 train and 2 val images."""
    from photos import photo_folder
    return photo_folder(tmp_path_factory.mktemp('photos'), train=8, val=2, seed=5)


def free_port(below: int = 65536) -> int:
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        if port < below:
            return port
    raise RuntimeError(f'no free port below {below}')


class Launch:
    """A command started in a session of its own, output to files; killed with all it started on close."""

    def __init__(self, cmd, log: Path, env=None):
        self.log = log
        self.out, self.err = open(f'{log}.out', 'w'), open(f'{log}.err', 'w')
        self.proc = subprocess.Popen([str(c) for c in cmd], cwd=REPO, stdout=self.out, stderr=self.err,
                                     env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})},
                                     start_new_session=True)

    def wait(self):
        try:
            self.proc.wait(timeout=TIMEOUT)
        finally:
            self.close()
        return self.proc.returncode

    def output(self) -> str:
        return Path(f'{self.log}.out').read_text() + Path(f'{self.log}.err').read_text()

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.out.close()
        self.err.close()


def launcher(script, *args):
    return ['bash', REPO / 'scripts' / script, *args]


def wait_for(condition, what: str, timeout: float = TIMEOUT):
    """Poll `condition` until it holds (returns its value); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f'timed out waiting for {what}')


def descendants(pid: int) -> list:
    children = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            parent = int(stat.read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def main_py_with(root: int, entry: str):
    """The pid of the main.py process under `root` whose environment holds `entry` (e.g. 'RANK=1'), or None."""
    for pid in descendants(root):
        try:
            cmdline = Path(f'/proc/{pid}/cmdline').read_bytes().split(b'\0')
            environ = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
        except OSError:
            continue
        if any(arg.endswith(b'main.py') for arg in cmdline) and entry.encode() in environ:
            return pid
    return None


def first_checkpoint(out: Path):
    return wait_for(lambda: (out / 'checkpoint.pth').exists(), f'a checkpoint in {out}')


def assert_same_run(reference: Path, out: Path):
    """Final model and EMA bit for bit, and the same log lines (losses, accuracies) epoch by epoch."""
    full, other = (checkpoint.load_checkpoint(str(d / 'checkpoint.pth')) for d in (reference, out))
    assert full['epoch'] == other['epoch'] == 1 and full['batches_done'] is other['batches_done'] is None
    for key in ('model', 'model_ema'):
        for name, tensor in full[key].items():
            assert torch.equal(tensor, other[key][name]), f'{key}.{name}'
    assert read_log(out) == read_log(reference)


@pytest.fixture(scope='module')
def two_nodes(data, tmp_path_factory):
    """Two nodes on one machine: the launcher's multi-node command twice, one process each (c10d rendezvous
    hosted by node 0), trained without interruption. The runs below, one node of two processes, end
    equal to it bit for bit: one run shows both that and that it recovered exactly."""
    out, port = tmp_path_factory.mktemp('two_nodes'), free_port()
    nodes = [Launch(launcher('pretrain_vit5.sh', 'small', '--gpus', 1, '--nnodes', 2, '--node-rank', rank,
                             '--master-addr', '127.0.0.1', '--master-port', port, '--data-path', data,
                             '--output-dir', out, '--', *FLAGS), out.parent / f'node{rank}', env={'TORCHRUN': TORCHRUN})
             for rank in (0, 1)]
    for node in nodes:
        assert node.wait() == 0, node.output()[-3000:]
    return out, nodes


def test_two_agents_of_one_process_each(two_nodes):
    out, nodes = two_nodes
    for node in nodes:
        assert 'Traceback' not in node.output() and '--rdzv-backend c10d' in node.output()
    assert [e['epoch'] for e in read_log(out)] == [0, 1]


def test_worker_killed_mid_epoch_restarts_the_group_and_resumes(data, two_nodes, tmp_path):
    """torchrun --max-restarts 1 (through the launcher, one node of two processes), rank 1 SIGKILLed after the
    first mid-epoch checkpoint: rank 0 leaves with one line, torchrun restarts both, they resume from the
    newest checkpoint and end as the uninterrupted two-node run."""
    out = tmp_path / 'out'
    run = Launch(launcher('pretrain_vit5.sh', 'small', '--gpus', 2, '--max-restarts', 1, '--data-path', data,
                          '--output-dir', out, '--', *FLAGS, '--auto-resume'), tmp_path / 'run',
                 env={'TORCHRUN': TORCHRUN})
    try:
        first_checkpoint(out)
        os.kill(wait_for(lambda: main_py_with(run.proc.pid, 'RANK=1'), 'rank 1'), signal.SIGKILL)
    finally:
        rc = run.wait()
    output = run.output()
    assert rc == 0, output[-3000:]
    assert 'Traceback' not in output
    assert 'error: rank 0 lost contact with the other processes' in output  # the survivor, in one line
    assert 'failed (exitcode: -9)' in output and 'Auto-resuming from' in output  # torchrun's restart
    assert_same_run(two_nodes[0], out)


def slurm_job(tmp_path: Path, data: Path, out: Path, name: str, extra=()):
    """scripts/slurm_pretrain.sbatch as SLURM would run it, 2 tasks on this machine (tests/slurm stand-ins)."""
    port = free_port(below=40000)  # the script derives its port from the job id: 20000 + id % 20000
    env = dict(PATH=f'{SLURM_SHIMS}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}',
               SLURM_JOB_ID=str(port - 20000), SLURM_JOB_NODELIST='node0', SLURM_NTASKS='2', SLURM_CPUS_PER_TASK='0',
               DATA_PATH=str(data), OUTPUT_DIR=str(out), SRUN_LOG=str(tmp_path / f'{name}.srun'),
               SCONTROL_LOG=str(tmp_path / 'scontrol'))
    job = Launch(['bash', REPO / 'scripts' / 'slurm_pretrain.sbatch', *FLAGS, *extra], tmp_path / name, env)
    job.job_id = env['SLURM_JOB_ID']
    return job


def test_stop_signal_to_one_rank_then_the_requeued_job_resumes(data, two_nodes, tmp_path):
    """A SLURM job's rank 1 alone gets SIGTERM mid-epoch, its DataLoader worker too (SLURM signals every
    process of a task): both ranks stop after the same step, write its checkpoint, print one line and exit
    with 75; the script requeues the job, which resumes exactly (with a loader worker per rank, where the
    uninterrupted run had none)."""
    out, workers = tmp_path / 'out', ('--num_workers', '1')
    job = slurm_job(tmp_path, data, out, 'job', workers)
    try:
        first_checkpoint(out)
        rank1 = wait_for(lambda: main_py_with(job.proc.pid, 'SLURM_PROCID=1'), 'task 1')
        worker = wait_for(lambda: descendants(rank1), 'its DataLoader worker')
        for pid in [rank1, *worker]:
            os.kill(pid, signal.SIGTERM)
    finally:
        rc = job.wait()
    output = job.output()
    assert rc == 75 and 'Traceback' not in output, output[-3000:]
    assert (tmp_path / 'job.srun').read_text() == 'task 0 exit 75\ntask 1 exit 75\n'  # rank 0 stopped too
    stopped = checkpoint.load_checkpoint(str(out / 'checkpoint.pth'))
    epoch, done = stopped['epoch'], stopped['batches_done']
    assert epoch == 0 and 2 < done < STEPS  # mid-epoch, after the checkpoint the signal waited for
    assert [line for line in output.splitlines() if line.startswith('Stopped')] == [
        f'Stopped on a stop signal to another rank at epoch {epoch} after batch {done} of {STEPS}: '
        f'{out / "checkpoint.pth"} holds that step; continue with --auto-resume (or --resume {out / "checkpoint.pth"})']
    assert (tmp_path / 'scontrol').read_text() == f'requeue {job.job_id}\n'
    requeued = slurm_job(tmp_path, data, out, 'requeued', workers)
    assert requeued.wait() == 0, requeued.output()[-3000:]
    assert 'Traceback' not in requeued.output()
    assert f'Training for 2 epochs from epoch {epoch}, batch {done}' in requeued.output()
    assert_same_run(two_nodes[0], out)


def test_a_rank_that_hangs_ends_the_others_within_the_collective_timeout(data, tmp_path):
    """Rank 1 stopped dead (SIGSTOP) mid-epoch: rank 0 leaves after --dist-timeout (3 s here) with one line
    and exit code 1, instead of waiting forever."""
    out, port = tmp_path / 'out', free_port()
    ranks = [Launch([sys.executable, 'main.py', *FLAGS, '--data-path', data, '--output_dir', out, '--dist-timeout', 0.05],
                    tmp_path / f'rank{r}', env=dict(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), SLURM_NTASKS='2',
                                                   SLURM_PROCID=str(r), SLURM_LOCALID=str(r)))
             for r in (0, 1)]
    try:
        first_checkpoint(out)
        os.kill(ranks[1].proc.pid, signal.SIGSTOP)
        assert ranks[0].wait() == 1
    finally:
        for rank in ranks:
            rank.close()
    err = Path(f'{tmp_path / "rank0"}.err').read_text()
    assert err.startswith('error: rank 0 lost contact with the other processes (Timed out waiting') and \
        err.endswith('one of them died, hung for more than --dist-timeout 0.05 min, or lost its node\n'), err
