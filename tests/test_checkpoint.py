"""checkpoint.py: atomic writes read back before they count, the previous file kept, the fallback of
--auto-resume, and the safe loader."""
import argparse
import os
from pathlib import Path

import pytest
import torch

import checkpoint
import utils
from utils import CheckpointError


# ---- saving -------------------------------------------------------------------------------------
def test_save_is_atomic_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint.pth')
    checkpoint.save_checkpoint({'epoch': 1, 'w': torch.ones(3)}, path)
    real_save = torch.save

    def crash_mid_write(obj, f):
        real_save({'partial': torch.zeros(1000)}, f)  # some bytes reach the disk, then the job dies
        raise OSError('No space left on device')

    monkeypatch.setattr(torch, 'save', crash_mid_write)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint({'epoch': 2, 'w': torch.zeros(3)}, path)
    assert os.listdir(tmp_path) == ['checkpoint.pth']  # no temporary file left behind
    assert checkpoint.load_checkpoint(path)['epoch'] == 1


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(utils, 'get_rank', lambda: 1)
    checkpoint.save_checkpoint({'epoch': 0}, str(tmp_path / 'c.pth'))
    assert not os.listdir(tmp_path)


# ---- loading ------------------------------------------------------------------------------------
def test_load_accepts_tensors_containers_and_namespace(tmp_path):
    path = tmp_path / 'ok.pth'
    torch.save({'model': {'w': torch.arange(3)}, 'args': argparse.Namespace(lr=0.1, betas=[0.9, 0.99]),
                'epoch': 4, 'max_accuracy': None}, path)
    ckpt = checkpoint.load_checkpoint(str(path))
    assert ckpt['args'].lr == 0.1 and ckpt['epoch'] == 4 and torch.equal(ckpt['model']['w'], torch.arange(3))


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_load_refuses_code_and_never_runs_it(tmp_path):
    torch.save({'model': {}, 'hook': Payload(tmp_path / 'ran')}, tmp_path / 'evil.pth')
    with pytest.raises(CheckpointError, match=r'refusing .*evil\.pth.*Path\.touch|refusing .*evil\.pth'):
        checkpoint.load_checkpoint(str(tmp_path / 'evil.pth'))
    assert not (tmp_path / 'ran').exists()
    # the payload is real: an unsafe load would have run it
    torch.save({'hook': Payload(tmp_path / 'ran_unsafe')}, tmp_path / 'evil2.pth')
    torch.load(tmp_path / 'evil2.pth', weights_only=False)
    assert (tmp_path / 'ran_unsafe').exists()


@pytest.mark.parametrize('content, message', [
    (None, 'does not exist'),
    (b'', 'empty or truncated'),
    (b'just some text\n', 'not a PyTorch checkpoint'),
    ('half', 'truncated'),
    ('list', 'holds a list'),
])
def test_load_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / 'bad.pth'
    if content == 'half':
        torch.save({'w': torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif content == 'list':
        torch.save([1, 2], path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as info:
        checkpoint.load_checkpoint(str(path))
    assert str(path) in str(info.value) and '\n' not in str(info.value)


# ---- the previous checkpoint, and falling back to it ----------------------------------------------------
def test_a_save_keeps_the_file_it_replaces_until_the_next(tmp_path):
    path = str(tmp_path / 'checkpoint.pth')
    for epoch in range(3):
        checkpoint.save_checkpoint({'epoch': epoch}, path, keep_previous=True)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint.pth', 'previous_checkpoint.pth']
    assert checkpoint.load_checkpoint(path)['epoch'] == 2
    assert checkpoint.load_checkpoint(checkpoint.previous_path(path))['epoch'] == 1
    checkpoint.save_checkpoint({'epoch': 0}, str(tmp_path / 'best_checkpoint.pth'))  # no previous_ for it
    assert not (tmp_path / 'previous_best_checkpoint.pth').exists()


def test_a_write_that_does_not_read_back_replaces_nothing(tmp_path, monkeypatch):
    """torch.save returned, but the bytes on disk are not a whole checkpoint (a failing disk, a file system
    that lost the tail): the new file is refused before it replaces anything, both good files stay."""
    path = str(tmp_path / 'checkpoint.pth')
    for epoch in range(2):
        checkpoint.save_checkpoint({'epoch': epoch, 'w': torch.ones(100)}, path, keep_previous=True)
    real_save = torch.save

    def lose_the_tail(obj, f):
        real_save(obj, f)
        f.flush()
        f.truncate(f.tell() // 2)

    monkeypatch.setattr(torch, 'save', lose_the_tail)
    with pytest.raises(CheckpointError, match=r'checkpoint\.pth\.tmp is truncated'):
        checkpoint.save_checkpoint({'epoch': 2, 'w': torch.ones(100)}, path, keep_previous=True)
    assert sorted(os.listdir(tmp_path)) == ['checkpoint.pth', 'previous_checkpoint.pth']
    assert [checkpoint.load_checkpoint(p)['epoch'] for p in (path, checkpoint.previous_path(path))] == [1, 0]


def test_newest_checkpoint_falls_back_to_the_previous_one_with_one_line(tmp_path, capsys):
    path = str(tmp_path / 'checkpoint.pth')
    assert checkpoint.newest_checkpoint(path) is None  # a fresh run
    for epoch in range(2):
        checkpoint.save_checkpoint({'epoch': epoch, 'w': torch.ones(100)}, path, keep_previous=True)
    assert checkpoint.newest_checkpoint(path)[1]['epoch'] == 1 and capsys.readouterr().out == ''
    raw = Path(path).read_bytes()
    Path(path).write_bytes(raw[:len(raw) // 2])
    found, ckpt = checkpoint.newest_checkpoint(path)
    out = capsys.readouterr().out
    assert found == checkpoint.previous_path(path) and ckpt['epoch'] == 0
    assert out.count('\n') == 1 and out.startswith(f'{path} is truncated') and out.endswith(
        f': resuming from the one before, {found}\n')
    os.remove(path)  # gone between the two renames of a save
    assert checkpoint.newest_checkpoint(path)[0] == found and 'does not exist' in capsys.readouterr().out
    Path(found).write_bytes(b'')
    with pytest.raises(CheckpointError, match=r'^no checkpoint to resume from: .* does not exist; and .* is empty'):
        checkpoint.newest_checkpoint(path)
