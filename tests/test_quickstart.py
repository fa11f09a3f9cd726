"""scripts/quickstart.sh as a user runs it (a tiny model, a few digits): it installs the repository with
`pip install -e .` (pyproject.toml) so the models import from any folder, never deletes or overwrites a run,
and a run stopped with Ctrl-C goes on through the script with the command that the stop prints."""
import os
import shlex
import signal
import site
import subprocess
import sys
import threading

import pytest

import checkpoint
from tinyrun import REPO, read_log

sys.path.insert(0, str(REPO / 'scripts'))
from prepare_digits import to_image  # noqa: E402

# 1 block of width 32 on batches of 16: the run takes seconds; the recipe's other flags stay as they are
TINY = ['--model-kwargs', 'patch_size=8', 'embed_dim=32', 'num_heads=2', 'depth=1', '--batch-size', '16']


@pytest.fixture(scope='module')
def venv(tmp_path_factory):
    """A fresh environment that borrows this one's packages (torch, timm) through a .pth file, so the script's
    pip finds every requirement installed and downloads nothing; the editable install runs as a user's would."""
    venv = tmp_path_factory.mktemp('qs') / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    purelib = subprocess.run([str(venv / 'bin' / 'python'), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                             check=True, capture_output=True, text=True).stdout.strip()
    (venv / purelib).joinpath('borrowed.pth').write_text(site.getsitepackages()[0] + '\n')
    return venv


def digits_folder(root):
    """root/{train,val}/<digit>/*.png for the digits 0-3 (12 train, 4 held out each), as prepare_digits writes
    them: the script finds its data there and leaves it as it is."""
    from sklearn.datasets import load_digits
    data = load_digits()
    for k in range(4):
        index = [i for i, t in enumerate(data.target) if t == k]
        for split, chosen in (('train', index[:12]), ('val', index[12:16])):
            folder = root / split / str(k)
            folder.mkdir(parents=True)
            for i in chosen:
                to_image(data.images[i], 32).save(folder / f'{i:04d}.png')


def quickstart(*flags, env, **popen):
    """`bash scripts/quickstart.sh FLAGS` from the repository root, as a user runs it."""
    return subprocess.Popen(['bash', 'scripts/quickstart.sh', *map(str, flags)], cwd=REPO, text=True,
                            env={**os.environ, 'PYTHONUNBUFFERED': '1', **env}, **popen)


def run_quickstart(*flags, env):
    proc = quickstart(*flags, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def stop_after_first_epoch(proc):
    """Ctrl-C as a terminal sends it (to the whole process group) once epoch 0's checkpoint is written."""
    watchdog = threading.Timer(300, proc.kill)  # a hung run ends the wait (and fails) instead of the suite
    watchdog.start()
    try:
        for line in proc.stdout:  # epoch 1's first progress line comes after epoch 0's checkpoint
            if line.startswith('Epoch: [1] ['):
                break
        else:
            pytest.fail(f'the quick start ended (code {proc.wait()}) before epoch 1: {proc.stderr.read()[-2000:]}')
        os.killpg(proc.pid, signal.SIGINT)
        return proc.communicate(timeout=60)[1]
    finally:
        watchdog.cancel()
        proc.kill()


def test_quickstart_keeps_every_run_and_continues_one_stopped_with_ctrl_c(venv, tmp_path):
    out = tmp_path / 'run'
    digits_folder(out / 'data')
    env = {'VENV': str(venv), 'OUT': str(out)}
    proc = quickstart(*TINY, '--epochs', 3, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      start_new_session=True)
    err = stop_after_first_epoch(proc)
    ckpt = out / 'checkpoint.pth'
    assert proc.returncode == 130, err[-2000:]
    note, through_script = err.strip().splitlines()[-2:]
    assert note == f'interrupted; {ckpt} holds the last finished epoch (continue with --resume {ckpt})'
    command = through_script.split('continue through the quick start with: ', 1)[1]
    assert shlex.split(command) == ['bash', 'scripts/quickstart.sh', '--resume', str(ckpt), *TINY, '--epochs', '3']
    assert checkpoint.load_checkpoint(str(ckpt))['epoch'] == 0

    # the run's folder is never reused for another run: refused in one line, before anything is touched
    before = {p: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for flags in ([], ['--finetune', ckpt, '--epochs', 5]):  # the second deleted the checkpoint it names
        code, _, err = run_quickstart(*flags, env=env)
        assert code == 2 and err.count('\n') == 1, err
        assert err.startswith(f'error: {out} already holds a run (checkpoint.pth best_checkpoint.pth log.txt '
                              f'args.json); continue it with `bash scripts/quickstart.sh --resume {ckpt}`')
        assert f'rm -r {out}`' in err and f'OUT={out}-2 bash scripts/quickstart.sh' in err
        assert {p: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    code, _, err = run_quickstart('--output_dir', tmp_path / 'elsewhere', env=env)
    assert code == 2 and err == 'error: the quick start writes to OUT: give OUT=DIR instead of --output_dir\n'

    # the printed command, as the user pastes it (no OUT: the run goes on in the checkpoint's folder)
    proc = subprocess.run(['bash', '-c', command], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'VENV': str(venv)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'holds them already' in proc.stdout and 'Training for 3 epochs from epoch 1' in proc.stdout
    assert [row['epoch'] for row in read_log(out)] == [0, 1, 2]  # the first epoch's line kept, the rest appended
    assert checkpoint.load_checkpoint(str(ckpt))['epoch'] == 2
    assert (out / 'curves.png').is_file() and (out / 'attention.png').is_file()
    assert 'Held-out top-1 after 3 epochs' in proc.stdout

    # the script installed the repository, editable: the models import from any folder, from the repository's
    # file (not a copy), and the package's dependencies are requirements.txt
    check = ('import importlib.metadata as md, importlib.util; print(importlib.util.find_spec("models_vit5").origin); '
             'print(sorted(r.split(">")[0].split("=")[0] for r in md.requires("vit5")))')
    found = subprocess.run([str(venv / 'bin' / 'python'), '-c', check], cwd=tmp_path, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    path, requires = found.stdout.splitlines()
    assert path == str(REPO / 'models_vit5.py')
    listed = [line.split('>')[0].split('=')[0].strip() for line in (REPO / 'requirements.txt').read_text().splitlines()
              if line.strip() and not line.startswith('#')]
    assert requires == str(sorted(listed))
