"""scripts/make_photo_folder.py: an ImageFolder of JPEG photo crops (and a few odd formats) of any size."""
import sys
from collections import Counter

import pytest
from PIL import Image

from datasets import load_image
from tinyrun import REPO, run_cli

sys.path.insert(0, str(REPO / 'scripts'))
import make_photo_folder  # noqa: E402


def make(out, *extra):
    make_photo_folder.main(['--out', str(out), '--train', '16', '--val', '8', '--min-side', '40',
                            '--max-side', '90', '--gray', '0.25', '--odd', '0.25', *map(str, extra)])


def test_folder_layout_sizes_and_formats(tmp_path, capsys):
    make(tmp_path / 'a')
    assert 'wrote 16 train + 8 val images (4 classes' in capsys.readouterr().out
    files = sorted((tmp_path / 'a').glob('*/*/*'))
    assert len(files) == 24
    assert sorted({f.parent.name for f in files}) == ['china_0', 'china_1', 'flower_0', 'flower_1']
    assert Counter(f.parts[-3] for f in files) == {'train': 16, 'val': 8}
    modes = Counter()
    for f in files:
        with Image.open(f) as img:
            assert 40 <= img.width <= 90 and 40 <= img.height <= 90
            assert img.format == ('PNG' if f.suffix == '.png' else 'JPEG')
            modes[img.mode] += 1
        assert load_image(str(f)).mode == 'RGB'  # every format reads as the loaders read it
    assert set(modes) == {'RGB', 'L', 'CMYK', 'RGBA'}, modes


def test_same_seed_same_files_and_classes_differ(tmp_path):
    make(tmp_path / 'a')
    make(tmp_path / 'b')
    make(tmp_path / 'c', '--seed', 1)
    a, b, c = (sorted((tmp_path / d).glob('*/*/*')) for d in 'abc')
    assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]
    assert [f.read_bytes() for f in a] != [f.read_bytes() for f in c]
    # the classes are different parts of the photos: their mean colours differ
    means = {}
    for f in a:
        means.setdefault(f.parent.name, []).append(sum(load_image(str(f)).resize((1, 1)).getpixel((0, 0))))
    averages = sorted(sum(v) / len(v) for v in means.values())
    assert averages[-1] - averages[0] > 30


@pytest.mark.parametrize('argv, message', [
    (['--out', 'x', '--classes', '3'], '--classes'),
    (['--out', 'x', '--gray', '0.8', '--odd', '0.5'], '--gray'),
    (['--out', 'x', '--min-side', '300', '--max-side', '200'], '--min-side'),
    ([], '--out'),
])
def test_bad_arguments_are_one_line_errors(argv, message):
    proc = run_cli(argv, timeout=60, script='scripts/make_photo_folder.py')
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_existing_folder_needs_overwrite(tmp_path, capsys):
    make(tmp_path)
    with pytest.raises(SystemExit) as exc:
        make(tmp_path)
    assert 'already exists' in str(exc.value.code) and '--overwrite' in str(exc.value.code)
    make(tmp_path, '--overwrite')
    assert len(list(tmp_path.glob('*/*/*'))) == 24
