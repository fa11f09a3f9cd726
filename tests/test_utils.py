"""Launcher detection, signals, the training loss read and progress logging."""
import builtins
import math
import os
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import utils
from utils import ConfigError, NonFiniteLossError


# ---- launchers ----------------------------------------------------------------------------------
LAUNCH_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID')


@pytest.fixture
def clean_env(monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_launcher_env_torchrun_and_slurm(clean_env):
    assert utils.launcher_env() == {}
    clean_env.setenv('SLURM_PROCID', '5')
    clean_env.setenv('SLURM_NTASKS', '16')
    clean_env.setenv('SLURM_LOCALID', '1')
    assert utils.launcher_env() == dict(rank=5, world_size=16, local_rank=1)
    for k, v in dict(RANK='3', WORLD_SIZE='8', LOCAL_RANK='3').items():
        clean_env.setenv(k, v)
    assert utils.launcher_env() == dict(rank=3, world_size=8, local_rank=3)  # torchrun's own variables win


def test_single_process_without_launcher(clean_env):
    args = SimpleNamespace(world_size=1, distributed=False, dist_url='env://')
    utils.init_distributed(args, 'cpu')
    assert (args.distributed, args.rank, args.world_size) == (False, 0, 1)
    with pytest.raises(ConfigError, match='launcher'):
        utils.init_distributed(SimpleNamespace(world_size=1, distributed=True, dist_url='env://'), 'cpu')
    with pytest.raises(ConfigError, match='--world_size 4'):
        utils.init_distributed(SimpleNamespace(world_size=4, distributed=False, dist_url='env://'), 'cpu')


def test_one_process_under_a_launcher_joins_a_group_only_with_distributed(clean_env):
    for k, v in dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1',
                     MASTER_PORT='0').items():  # the store binds a free port and keeps it
        clean_env.setenv(k, v)
    clean_env.setattr(builtins, 'print', builtins.print)  # init_distributed mutes other ranks' print
    plain = SimpleNamespace(world_size=1, distributed=False, dist_url='env://', dist_timeout=utils.DIST_TIMEOUT_MINUTES)
    utils.init_distributed(plain, 'cpu')
    assert not plain.distributed and not utils.is_dist()
    args = SimpleNamespace(world_size=1, distributed=True, dist_url='env://', dist_timeout=utils.DIST_TIMEOUT_MINUTES)
    utils.init_distributed(args, 'cpu')
    try:
        assert args.distributed and utils.is_dist() and utils.get_world_size() == 1
        losses = utils.RunningLoss(torch.device('cpu'))  # its read goes through the collective
        losses.add(torch.tensor(2.5), 0)
        assert losses.read('epoch 0') == (2.5, 1)
    finally:
        torch.distributed.destroy_process_group()


def test_slurm_needs_a_rendezvous_address(clean_env):
    clean_env.setenv('SLURM_PROCID', '0')
    clean_env.setenv('SLURM_NTASKS', '2')
    clean_env.delenv('MASTER_ADDR', raising=False)
    with pytest.raises(ConfigError, match='MASTER_ADDR'):
        utils.init_distributed(SimpleNamespace(world_size=1, distributed=False, dist_url='env://'), 'cpu')


def test_torchrun_restarts_through_the_agents_store_are_refused(clean_env):
    """Workers of a torchrun that may restart them and shares its store with them (its default) would find
    the failed group's addresses there after a restart: refused at the start, saying what to set."""
    for k, v in dict(RANK='0', WORLD_SIZE='2', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT='1',
                     TORCHELASTIC_USE_AGENT_STORE='True', TORCHELASTIC_MAX_RESTARTS='1').items():
        clean_env.setenv(k, v)
    args = SimpleNamespace(world_size=1, distributed=False, dist_url='env://', dist_timeout=utils.DIST_TIMEOUT_MINUTES)
    with pytest.raises(ConfigError, match='TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and launch with --standalone'):
        utils.init_distributed(args, 'cpu')


def test_lost_contact_tells_collective_failures_from_other_errors():
    gloo = RuntimeError('[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:31651: '
                        'Connection reset by peer.')
    assert utils.lost_contact(gloo) and utils.lost_contact(torch.distributed.DistBackendError('NCCL timeout'))
    assert not utils.lost_contact(RuntimeError('mat1 and mat2 shapes cannot be multiplied'))
    assert not utils.lost_contact(ValueError('gloo'))


# ---- the training loss, read at log steps ------------------------------------------------------------
def test_log_steps_every_print_freq_and_the_last():
    assert [i for i in range(25) if utils.is_log_step(i, 25, 10)] == [0, 10, 20, 24]


def test_running_loss_interval_means_and_counts():
    losses = utils.RunningLoss(torch.device('cpu'))
    for i, v in enumerate([1.0, 2.0, 6.0]):
        losses.add(torch.tensor(v), i)
    assert losses.read('epoch 0') == (3.0, 3)
    losses.add(torch.tensor([5.0]), 3)  # a one-element loss counts as a scalar
    assert losses.read('epoch 0') == (5.0, 1)
    assert losses.read('epoch 0') == (0.0, 0)  # nothing new since the last read


def test_running_loss_carries_stop_requests_and_survives_a_checkpoint():
    losses = utils.RunningLoss(torch.device('cpu'))
    for i, v in enumerate([1.0, 2.0, 6.0]):
        losses.add(torch.tensor(v), i)
    assert losses.read('epoch 0') == (3.0, 3) and not losses.stopping
    losses.add(torch.tensor(4.0), 3)
    restored = utils.RunningLoss(torch.device('cpu'))
    restored.load_state_dict(losses.state_dict())
    for running in (losses, restored):
        running.add(torch.tensor(1.0), 4)
        assert running.read('epoch 0', stop=running is restored) == (2.5, 2)
    assert restored.stopping and not losses.stopping


@pytest.mark.parametrize('bad', [float('nan'), float('inf'), -float('inf')])
def test_running_loss_names_the_first_nonfinite_step(bad):
    losses = utils.RunningLoss(torch.device('cpu'))
    for i, v in enumerate([1.0, 1.0, bad, 1.0, bad, 1.0]):
        losses.add(torch.tensor(v), i)  # nothing is raised while steps run
    with pytest.raises(NonFiniteLossError, match=r'^loss is non-finite at epoch 7, step 2 \(rank 0\); training '
                                                 r'stopped on every rank at step 5, nothing saved for this epoch$'):
        losses.read('epoch 7')


def test_all_finite_checks_every_floating_tensor():
    ok = [torch.ones(3), torch.zeros(2, 2), torch.tensor([1, 2])]
    assert utils.all_finite(ok) and utils.all_finite([])
    assert not utils.all_finite(ok + [torch.tensor([0.0, math.inf])])
    assert not utils.all_finite([torch.tensor([math.nan], dtype=torch.float64)])


# ---- progress -----------------------------------------------------------------------------------
def test_smoothed_value_window_and_global_average():
    v = utils.SmoothedValue(window=2)
    for x in (1.0, 2.0, 6.0):
        v.update(x)
    assert (v.median, v.avg, v.max, v.value) == (4.0, 4.0, 6.0, 6.0) and v.global_avg == 3.0


def test_progress_line_fields(capsys):
    logger = utils.MetricLogger(torch.device('cpu'))
    for i in logger.log_every(range(3), print_freq=2, header='Epoch: [0]', batch_size=4):
        logger.update(loss=torch.tensor(0.5), lr=1e-3)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(']')[1].split('/')[0].strip('[ ') for line in lines[:2]] == ['0', '2']
    assert all(re.search(p, lines[0]) for p in (r'eta: \d', r'loss: 0\.5', r'lr: ', r'img/s: [\d.]+',
                                                r'time: ', r'data: ', r'max mem: \d+MB'))
    assert 'Total time' in lines[-1]


def test_a_ctrl_c_python_dropped_is_raised_at_the_next_step(monkeypatch):
    """A SIGINT landing in a fork handler (DataLoader workers starting) is printed and dropped by Python;
    handle_ctrl_c remembers it, and the step loop raises it."""
    logger = utils.MetricLogger(torch.device('cpu'))
    steps = logger.log_every(range(5), print_freq=100)
    assert next(steps) == 0
    monkeypatch.setattr(utils, '_interrupted', True)
    with pytest.raises(KeyboardInterrupt):
        next(steps)


class _Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        import signal
        return os.getpid(), int(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def test_loader_workers_leave_ctrl_c_and_stop_signals_to_the_main_process():
    """Ctrl-C reaches the workers' process group, and SLURM signals every process of a job step: a worker
    ignores both, and ends on the SIGTERM of its own main process (the DataLoader's shutdown)."""
    import signal
    loader = iter(torch.utils.data.DataLoader(_Pids(), batch_size=1, num_workers=1,
                                              worker_init_fn=utils.loader_worker_init))
    pid, ignores_ctrl_c = (int(t) for t in next(loader))
    assert ignores_ctrl_c == 1
    for sig in ('TERM', 'USR1'):  # from another process, as from SLURM
        subprocess.run(['kill', f'-{sig}', str(pid)], check=True)
    assert int(next(loader)[0]) == pid  # still there, still serving
    os.kill(pid, signal.SIGTERM)  # from its main process
    deadline = time.monotonic() + 60
    while process_state(pid) not in 'ZX':  # a zombie (exited, not yet reaped) or gone
        assert time.monotonic() < deadline, 'the worker outlived its main process\'s SIGTERM'
        time.sleep(0.01)
    del loader


def process_state(pid: int) -> str:
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(') ', 1)[1][0]
    except FileNotFoundError:
        return 'X'


def test_stop_signals_are_noted_inside_restored_after_and_kill_forked_children():
    """Inside stop_signals_noted a SIGUSR1 is only noted; a child forked in there that is no DataLoader
    worker (a multiprocessing pool's) still dies of SIGTERM (it used to note it and live on, and a pool
    terminated from a test that had run main.cli in-process hung); outside, the handlers from before."""
    import signal
    before = signal.getsignal(signal.SIGTERM)
    with utils.stop_signals_noted():
        ready, go = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child says it runs, then waits; it leaves quietly if a signal only woke it
            os.write(go, b'1')
            signal.pause()
            os._exit(0)
        os.read(ready, 1)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert utils.stop_requested() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert utils.stop_requested() == 'SIGUSR1'
    assert signal.getsignal(signal.SIGTERM) is before and utils.stop_requested() is None
