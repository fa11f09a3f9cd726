"""scripts/make_shards.py: an ImageFolder as shards in the Hub's layout (the files' bytes unchanged, main.py's
labels, _info.json), _info.json for shards that lack one, and its errors."""
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from shardsets import hub_shards
from tinyrun import make_image_folder
import make_shards  # noqa: E402  (shardsets put scripts/ on the path)


def read_tar(path):
    """{member name: bytes} of a tar file, read with the standard library (not through our reader)."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_shards_hold_the_files_bytes_with_main_pys_labels(photo_set):
    from datasets import ImageFolderDataset
    photos, shards = photo_set
    info = json.loads((shards / '_info.json').read_text())
    train = ImageFolderDataset(str(photos / 'train'))
    assert info['name'] == 'photos' and info['num_classes'] == 4 and info['classes'] == train.classes
    kinds = set()
    for split, folder in (('train', 'train'), ('validation', 'val')):
        entry = info['splits'][split]
        expected = ImageFolderDataset(str(photos / folder), class_names=train.classes).samples
        assert entry['name'] == split and entry['num_samples'] == len(expected) == sum(entry['shard_lengths'])
        assert len(entry['filenames']) > 1 and entry['filenames'][0] == f'photos-{split}-00.tar'
        order = []
        for name, length in zip(entry['filenames'], entry['shard_lengths']):
            members = read_tar(shards / name)
            keys = list(dict.fromkeys(m.rsplit('.', 1)[0] for m in members))
            assert len(keys) == length
            for key in keys:
                meta = json.loads(members[f'{key}.json'])
                source = photos / folder / meta['filename']
                ext = {'.jpg': 'jpg', '.png': 'png'}[source.suffix]  # a PNG stays a PNG
                assert members[f'{key}.{ext}'] == source.read_bytes()  # not re-encoded
                kinds.add(ext)
                assert int(members[f'{key}.cls']) == train.class_to_idx[meta['class_name']] == \
                    dict(expected)[str(source)]
                assert key == meta['filename'].rsplit('.', 1)[0]
                order.append(str(source))
        assert sorted(order) == sorted(path for path, _ in expected)
        # train is shuffled before it is cut (every shard a random sample of the set); validation keeps its order
        assert (order == [path for path, _ in expected]) == (split == 'validation')
    assert kinds == {'jpg', 'png'}


def test_a_val_split_missing_classes_keeps_the_train_labels(tmp_path):
    folder = Path(make_image_folder(tmp_path / 'folder', train_per_class=(2, 2, 2), val_per_class=(1, 1, 1)))
    shutil.rmtree(folder / 'val' / 'class_0')
    make_shards.main(['--src', str(folder), '--out', str(tmp_path / 'shards')])
    members = read_tar(tmp_path / 'shards' / 'folder-validation-00.tar')
    assert [int(members[f'class_{k}/0.cls']) for k in (1, 2)] == [1, 2]


def test_same_folder_same_bytes_with_any_writer_count(photo_set, tmp_path):
    photos, shards = photo_set
    make_shards.main(['--src', str(photos), '--out', str(tmp_path), '--shard-size', '0.015', '--workers', '1', '--json'])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in shards.iterdir())
    for path in shards.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_write_info_counts_our_shards_and_the_hubs(photo_set, tmp_path):
    photos, shards = photo_set
    ours = Path(shutil.copytree(shards, tmp_path / 'ours'))
    (ours / '_info.json').unlink()
    make_shards.main(['--write-info', str(ours), '--workers', '2'])
    written, original = (json.loads((d / '_info.json').read_text()) for d in (ours, shards))
    assert written['splits'] == original['splits'] and written['name'] == 'photos'
    hub = tmp_path / 'hub'
    hub_shards(hub, photos)
    listed = json.loads((hub / '_info.json').read_text())
    (hub / '_info.json').unlink()
    make_shards.main(['--write-info', str(hub)])
    assert json.loads((hub / '_info.json').read_text())['splits'] == listed['splits']


def test_default_shard_size_names_and_progress_bar(photo_set, tmp_path, capsys):
    photos, _ = photo_set
    make_shards.main(['--src', str(photos), '--out', str(tmp_path), '--prefix', 'imagenet1k', '--workers', '2'])
    out, err = capsys.readouterr()
    assert '87/87' in err.splitlines()[-1]  # the bar, on stderr
    assert f'wrote 66 train images in 1 shards, 21 validation images in 1 shards (4 classes) to {tmp_path}' in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        '_info.json', 'imagenet1k-train-00.tar', 'imagenet1k-validation-00.tar']
    members = read_tar(tmp_path / 'imagenet1k-validation-00.tar')  # no .json unless asked
    assert len(members) == 42 and {m.rsplit('.', 1)[1] for m in members} == {'cls', 'jpg', 'png'}


@pytest.mark.parametrize('argv, message', [
    (['--src', 'nowhere', '--out', 'x'], 'has no train/ folder'),
    (['--out', 'x'], 'give --src and --out'),
    (['--write-info', 'x', '--src', 'y'], '--write-info takes the shards folder alone'),
    (['--src', 'y', '--out', 'x', '--shard-size', '0'], '--shard-size must be > 0'),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        make_shards.main(argv)
    err = capsys.readouterr().err + (exc.value.code if isinstance(exc.value.code, str) else '')
    assert exc.value.code != 0 and len(err.strip().splitlines()) == 1 and message in err, err


def test_existing_shards_need_overwrite_and_broken_shards_are_named(photo_set, tmp_path, capsys):
    photos, shards = photo_set
    out = Path(shutil.copytree(shards, tmp_path / 'out'))
    with pytest.raises(SystemExit, match='already exists; pass --overwrite'):
        make_shards.main(['--src', str(photos), '--out', str(out)])
    with pytest.raises(SystemExit, match='_info.json already exists'):
        make_shards.main(['--write-info', str(out)])
    with pytest.raises(SystemExit, match='holds no <prefix>-train-N.tar'):
        make_shards.main(['--write-info', str(photos)])
    first = out / 'photos-train-00.tar'
    first.write_bytes(first.read_bytes()[:5000])
    with pytest.raises(SystemExit, match=f'shard {first}.* sample '):  # cut in a member's header or data
        make_shards.main(['--write-info', str(out), '--overwrite'])


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        make_shards.main(['--help'])
    text = capsys.readouterr().out
    assert exc.value.code == 0 and all(flag in text for flag in (
        '--src', '--out', '--prefix', '--shard-size', '--workers', '--seed', '--json', '--overwrite', '--write-info'))
