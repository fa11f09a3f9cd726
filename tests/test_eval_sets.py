"""The evaluation sets (eval_sets.py) through main.py --eval --eval-set and scripts/eval_suite.py.

The model is a tiny ViT-5 whose prediction is written in each image: its blocks are switched off
(LayerScale 0), its head averages the patch tokens, and each token is the image's mean (red, green)
after normalisation, so the argmax is the class whose head row points the way the image's colour
does. Each test image is painted the colour of the class the model should say, so every expected
top-1 below is exact and the labelling rules decide it.
"""
import argparse
import csv
import importlib.resources
import json
import math
import sys

import pytest
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo

import eval_sets
import main
import checkpoint
from tinyrun import REPO, TORCHRUN, one_thread, run_cli, run_main

sys.path.insert(0, str(REPO / 'scripts'))
import eval_suite  # noqa: E402

SYNSETS = ImageNetInfo().label_names()
# classes the model can say, evenly around a circle of colours (neighbours 40 degrees apart)
CODES = [0, 1, 2, 4, 6, 10, 13, 970, 999]
# decoys: classes outside ImageNet-A and -R that outscore the class they shadow on its own colour,
# so ImageNet-A/R images of classes 6 and 4 score only when the argmax is over the set's 200 classes
DECOYS = {3: 6, 5: 4}
MODEL_KWARGS = dict(depth=2, embed_dim=48, num_heads=2, global_pool='avg')

# ReaL labels for --real-labels: image N's set at N - 1 (image 4 is not on disk)
REAL_LABELS = [[], [2, 10], [1], [4], [6], [13, 970], [0]]
# ReaL images: number -> the class the model says
REAL_IMAGES = {1: 0, 2: 10, 3: 0, 5: 999, 6: 13, 7: 0}

# folder -> classes the model says for its images, per set
FOLDERS = {
    'in1k': {f'val/{SYNSETS[0]}': [0, 0], f'val/{SYNSETS[1]}': [1, 2]},
    'v2': {'10': [10, 10, 10], '13': [13], '999': [2]},  # as strings, 10 < 13 < 999 would be classes 0, 1, 2
    'a': {SYNSETS[6]: [6, 6], SYNSETS[13]: [13, 6]},  # A's classes 0 and 2 (its class 1, 11, is missing)
    'r': {SYNSETS[4]: [4, 4], SYNSETS[1]: [970]},  # R's classes 2 and 0
    'sketch': {SYNSETS[1]: [1], SYNSETS[999]: [999], SYNSETS[10]: [2, 13]},
}
# the exact results: top-1, top-5 (None: not designed), images scored
EXPECTED = {
    'in1k': (75.0, None, 4),
    'real': (60.0, 80.0, 5),  # 2 and 6 and 7 right; 3's label (1) is second-best; image 1 has no label
    'v2': (80.0, None, 5),
    'a': (75.0, 100.0, 4),  # over A's 200 classes its two present classes are the top 2 for every image
    'r': (200 / 3, None, 3),
    'sketch': (50.0, None, 4),
}


def colour(cls: int):
    """The RGB colour the model reads as class `cls`: its angle on a circle around the mean colour."""
    angle = 2 * math.pi * CODES.index(cls) / len(CODES)
    mean = [255 * m for m in IMAGENET_DEFAULT_MEAN]
    return (round(mean[0] + 100 * math.cos(angle)), round(mean[1] + 100 * math.sin(angle)), round(mean[2]))


def direction(cls: int):
    """The unit vector a class's colour becomes after normalisation (red, green)."""
    r, g, _ = colour(cls)
    x = (r / 255 - IMAGENET_DEFAULT_MEAN[0]) / IMAGENET_DEFAULT_STD[0]
    y = (g / 255 - IMAGENET_DEFAULT_MEAN[1]) / IMAGENET_DEFAULT_STD[1]
    return torch.tensor([x, y]) / math.hypot(x, y)


def write_coded_checkpoint(path):
    torch.manual_seed(0)
    model = timm.create_model('vit5_tiny', num_classes=1000, img_size=32, **MODEL_KWARGS)
    state = model.state_dict()
    for key, value in state.items():
        if '.gamma_' in key or key == 'pos_embed':
            value.zero_()  # blocks add nothing; no position term
    state['patch_embed.proj.weight'].zero_()
    state['patch_embed.proj.bias'].zero_()
    for channel in (0, 1):  # token channel c = the patch's mean of colour channel c (red, green)
        state['patch_embed.proj.weight'][channel, channel] = 1 / 256
    state['head.weight'].zero_()
    state['head.bias'].copy_(-100 - 1e-3 * torch.arange(1000))  # all other classes: far below, in index order
    for cls in CODES:
        state['head.weight'][cls, :2] = direction(cls)
        state['head.bias'][cls] = 0
    for decoy, shadowed in DECOYS.items():
        state['head.weight'][decoy, :2] = direction(shadowed)
        state['head.bias'][decoy] = 0.5
    saved = argparse.Namespace(model='vit5_tiny', model_kwargs=MODEL_KWARGS, input_size=32, nb_classes=1000)
    torch.save({'model': state, 'args': saved}, path)
    return path


def paint(path, cls: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (32, 32), colour(cls)).save(path)


def write_folders(root, folders: dict, ext='png'):
    for folder, classes in folders.items():
        for i, cls in enumerate(classes):
            paint(root / folder / f'{i}.{ext}', cls)
    return root


def write_real(root, images=REAL_IMAGES, folder_of=lambda number: ''):
    for number, cls in images.items():
        paint(root / folder_of(number) / f'ILSVRC2012_val_{number:08d}.JPEG', cls)
    return root


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
    top = tmp_path_factory.mktemp('eval_sets')
    roots = {name: str(write_folders(top / name, folders)) for name, folders in FOLDERS.items()}
    roots['real'] = str(write_real(top / 'real'))  # the flat val folder
    labels = top / 'real_labels.json'
    labels.write_text(json.dumps(REAL_LABELS))
    return argparse.Namespace(top=top, roots=roots, labels=str(labels),
                              ckpt=str(write_coded_checkpoint(top / 'coded.pth')))


def eval_argv(ckpt, name, root, *extra):
    return ['--eval', '--resume', ckpt, '--eval-set', name, '--data-path', root, '--device', 'cpu',
            '--num_workers', 0, '--batch-size', 2, '--eval-crop-ratio', 1.0, *extra]  # batches of 3


def test_the_coded_model_says_the_class_painted_on_each_image(sets):
    model = timm.create_model('vit5_tiny', num_classes=1000, img_size=32, **MODEL_KWARGS)
    model.load_state_dict(checkpoint.load_checkpoint(sets.ckpt)['model'])
    images = torch.stack([(torch.tensor(colour(c)) / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN))
                          / torch.tensor(IMAGENET_DEFAULT_STD) for c in CODES])[:, :, None, None].expand(-1, -1, 32, 32)
    predicted = model.eval()(images).argmax(-1).tolist()
    assert predicted == [next((d for d, s in DECOYS.items() if s == c), c) for c in CODES]  # 4 and 6: decoys


def test_the_sets_classes_are_where_the_tests_assume():
    a, r = (set(eval_sets.logit_classes(name).tolist()) for name in ('a', 'r'))
    assert len(a) == len(r) == 200 and a & set(CODES) == {6, 13} and {1, 4, 6, 13} <= r
    assert not (a | r) & set(DECOYS)
    # A's and R's synsets are their classes' ImageNet-1k synsets, in the order of their indices
    for name in ('a', 'r'):
        indices = eval_sets.logit_classes(name).tolist()
        assert [eval_sets.folder_labels(name)[SYNSETS[i]] for i in indices] == list(range(200))


@pytest.mark.parametrize('name', ['v2', 'a', 'r', 'sketch'])
def test_class_folder_sets_apply_their_rule(sets, name):
    stats, out = run_main(eval_argv(sets.ckpt, name, sets.roots[name]))
    top1, top5, n = EXPECTED[name]
    assert stats['n'] == n and stats['acc1'] == pytest.approx(top1)
    if top5 is not None:
        assert stats['acc5'] == pytest.approx(top5)
    assert f'Accuracy of the network on the {n} test images' in out
    assert f'holds {n} of the {eval_sets.FULL_SIZES[name]} images' in out  # a partial copy says so


def test_real_finds_labels_by_file_name_and_leaves_out_empty_sets(sets):
    """The flat val folder with --real-labels; the data set flag is ignored with a note."""
    stats, out = run_main(eval_argv(sets.ckpt, 'real', sets.roots['real'], '--real-labels', sets.labels,
                                    '--data-set', 'FOLDER'))
    top1, top5, n = EXPECTED['real']
    assert (stats['acc1'], stats['acc5'], stats['n']) == (pytest.approx(top1), pytest.approx(top5), n)
    assert '1 of 6 images' in out and 'empty label set' in out
    assert 'Note: --eval-set real reads its own layout; --data-set FOLDER is ignored' in out
    # the loss is against the label set, spread evenly: image 2 (set {2, 10}) is read as 1/2 and 1/2
    assert math.isfinite(stats['loss']) and stats['loss'] > 0


def test_real_with_timms_labels_in_a_synset_sorted_val_folder(sets, tmp_path):
    """An ImageNet root (val/ sorted into synset folders), timm's label file, the device data pipeline."""
    timm_labels = json.loads((importlib.resources.files('timm.data') / '_info' / 'imagenet_real_labels.json')
                             .read_text())
    images = {1: 970, 2: 970, 4: 970, 22: 0}  # 1 and 22: empty sets; 2's set holds 970, 4's does not
    assert not timm_labels[0] and not timm_labels[21] and 970 in timm_labels[1] and 970 not in timm_labels[3]
    root = write_real(tmp_path / 'imagenet', images, folder_of=lambda number: f'val/{SYNSETS[number]}')
    for pipeline in ('cpu', 'gpu'):
        stats, out = run_main(eval_argv(sets.ckpt, 'real', root, '--data-pipeline', pipeline))
        assert (stats['acc1'], stats['n']) == (50.0, 2) and '2 of 4 images' in out


def test_a_dist_eval_under_torchrun_equals_one_process(sets, tmp_path):
    """The suite under torchrun x2 with --dist-eval on ImageNet-A and -ReaL (5 images: uneven shards)."""
    out = tmp_path / 'out'
    proc = run_cli(['--ckpt', sets.ckpt, '--output-dir', out, '--a', sets.roots['a'], '--real', sets.roots['real'],
                    '--real-labels', sets.labels, '--', '--dist-eval', '--device', 'cpu', '--num_workers', 0,
                    '--batch-size', 2, '--eval-crop-ratio', 1.0], launcher=TORCHRUN, script='scripts/eval_suite.py')
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]
    assert [r['set'] for r in results] == ['real', 'a']
    for r in results:
        top1, top5, n = EXPECTED[r['set']]
        assert (r['top1'], r['top5'], r['images']) == (pytest.approx(top1), pytest.approx(top5), n)


@pytest.mark.filterwarnings('ignore:IMNET at')  # the in1k folder has 2 classes
def test_eval_suite_writes_one_table_of_every_set(sets, tmp_path, capsys):
    out = tmp_path / 'results'
    argv = ['--ckpt', sets.ckpt, '--output-dir', out, '--real-labels', sets.labels,
            *[arg for name, root in sets.roots.items() for arg in (f'--{name}', root)],
            '--', '--device', 'cpu', '--num_workers', 0, '--batch-size', 2, '--eval-crop-ratio', 1.0]
    with one_thread():
        assert eval_suite.cli([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((out / 'results.csv').open()))
    assert list(rows[0]) == list(eval_suite.CSV_COLUMNS)
    assert [r['set'] for r in rows] == list(eval_sets.EVAL_SETS)  # in1k, real, v2, a, r, sketch
    for row in rows:
        top1, top5, n = EXPECTED[row['set']]
        assert (float(row['top1']), int(row['images'])) == (round(top1, 3), n), row
        assert float(row['top1_err']) == round(100 - top1, 3) and row['model'] == sets.ckpt
        assert (row['img_size'], row['crop_pct'], row['interpolation']) == ('32', '1.0', 'bicubic')
    lines = [json.loads(line) for line in (out / 'results.jsonl').read_text().splitlines()]
    assert [(r['set'], r['root']) for r in lines] == [(n, sets.roots[n]) for n in eval_sets.EVAL_SETS]
    assert lines[0]['model'] == sets.ckpt and lines[0]['loss'] > 0
    table = (out / 'results.md').read_text()
    assert '| ImageNet-A | 4 | 75.000 | 100.000 |' in table and table.split('\n\n', 1)[1] in printed
    assert printed.count('trainable parameters') == 1  # one model, built once, for every set


# ---- folders that do not fit their set: one line, exit code 2 -------------------------------------
def misfit_v2_synsets(root):
    return write_folders(root, {SYNSETS[0]: [0]})


MISFITS = [  # (set, writes the folder, words the refusal must hold)
    ('v2', misfit_v2_synsets, ['is not ImageNet-V2', 'named 0 to 999', SYNSETS[0]]),
    ('v2', lambda root: write_folders(root, {'0': [0], '010': [10]}), ["'010'"]),
    ('v2', lambda root: write_folders(root, {'.': [0, 1]}), ['holds no class folders']),  # images, no folders
    ('a', lambda root: write_folders(root, {SYNSETS[6]: [6], SYNSETS[0]: [0]}), ['is not ImageNet-A', SYNSETS[0]]),
    ('r', lambda root: write_folders(root, {SYNSETS[3]: [0]}), ['is not ImageNet-R', SYNSETS[3]]),
    ('sketch', lambda root: write_folders(root, {'0': [0]}), ['is not ImageNet-Sketch', "but it has '0'\n"]),  # no hint
    ('sketch', lambda root: write_folders(root, {f'sketch/{SYNSETS[1]}': [1]}), ['did you mean --data-path']),
    ('real', lambda root: write_folders(write_real(root), {'.': [0]}), ['0.png is not an ImageNet val image']),
    ('real', lambda root: write_real(root, {50001: 0}), ['cover val images 1 to 50000, not 50001']),
    ('real', lambda root: write_real(write_real(root, {2: 10}, lambda n: SYNSETS[0])), ['val image 2 is also at']),
]


@pytest.mark.parametrize('name, write, words', MISFITS, ids=[f'{m[0]}-{i}' for i, m in enumerate(MISFITS)])
def test_a_folder_that_does_not_fit_its_set_is_refused(sets, tmp_path, capsys, name, write, words):
    root = write(tmp_path / 'set')
    assert_one_line(capsys, eval_argv(sets.ckpt, name, root), words + [str(tmp_path / 'set')])


def test_bad_real_labels_and_flags_that_do_not_fit_are_refused(sets, tmp_path, capsys):
    broken = tmp_path / 'broken.json'
    broken.write_text('{"ILSVRC2012_val_00000001": [1]}')
    real = ['real', sets.roots['real']]
    assert_one_line(capsys, eval_argv(sets.ckpt, *real, '--real-labels', broken), ['is not a ReaL label file'])
    assert_one_line(capsys, eval_argv(sets.ckpt, *real, '--real-labels', tmp_path / 'no.json'),
                    ['cannot read the ReaL labels', 'no.json'])
    v2 = eval_argv(sets.ckpt, 'v2', sets.roots['v2'])
    assert_one_line(capsys, v2 + ['--real-labels', sets.labels], ['--real-labels is read by --eval-set real'])
    assert_one_line(capsys, [a for a in v2 if a != '--eval'], ['--eval-set v2 is an evaluation set: add --eval'])
    assert_one_line(capsys, v2 + ['--nb-classes', 10], ['scores the 1000 ImageNet-1k classes; this model has 10'])


def test_a_misfit_folder_through_the_command_line(sets, tmp_path):
    root = misfit_v2_synsets(tmp_path / 'v2')
    proc = run_cli(eval_argv(sets.ckpt, 'v2', root))
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and 'Traceback' not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f'error: {root} is not ImageNet-V2: its class folders are named 0 to 999')


@pytest.mark.filterwarnings('ignore:IMNET at')
def test_eval_suite_refuses_what_it_cannot_run(sets, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        eval_suite.parse_args(['--help'])
    assert stop.value.code == 0 and '--sketch DIR' in capsys.readouterr().out
    for argv, words in ((['--ckpt', sets.ckpt, '--output-dir', tmp_path], 'no set to evaluate'),
                        (['--ckpt', sets.ckpt, '--output-dir', tmp_path, '--v2', sets.roots['v2'], '--',
                          '--data-path', tmp_path], '--data-path after -- is set by the suite'),
                        (['--ckpt', sets.ckpt, '--output-dir', tmp_path, '--v2', sets.roots['v2'], '--real-labels',
                          sets.labels], '--real-labels is read for --real')):
        with pytest.raises(SystemExit) as stop:
            eval_suite.parse_args([str(a) for a in argv])
        assert stop.value.code == 2 and words in capsys.readouterr().err
    argv = ['--ckpt', sets.ckpt, '--output-dir', tmp_path / 'out', '--v2', misfit_v2_synsets(tmp_path / 'v2'),
            '--', '--device', 'cpu', '--num_workers', 0]
    with one_thread():
        assert eval_suite.cli([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'is not ImageNet-V2' in err and not (tmp_path / 'out').exists()
    # a 2-class model (its args do not say so) fits the in1k folder, not the 1000 classes of V2 after it
    model = timm.create_model('vit5_tiny', num_classes=2, img_size=32, **MODEL_KWARGS)
    saved = argparse.Namespace(model='vit5_tiny', model_kwargs=MODEL_KWARGS, input_size=32)
    torch.save({'model': model.state_dict(), 'args': saved}, tmp_path / 'two.pth')
    argv = ['--ckpt', tmp_path / 'two.pth', '--output-dir', tmp_path / 'out', '--in1k', sets.roots['in1k'],
            '--v2', sets.roots['v2'], '--', '--device', 'cpu', '--num_workers', 0]
    with one_thread():
        assert eval_suite.cli([str(a) for a in argv]) == 2
    assert 'is scored on 1000 classes, but the model built for the sets before it has 2' in capsys.readouterr().err


def assert_one_line(capsys, argv, words):
    capsys.readouterr()
    with one_thread():
        code = main.cli([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith('error: ') and err.count('\n') == 1, err
    for word in words:
        assert word in err, (word, err)
