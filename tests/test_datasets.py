import json
import os
import pickle
import random
import shlex
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from augment import fix_posterize
from datasets import DataError, build_dataset, build_transform
from photos import photo_crops
from tinyrun import REPO, parse


def make_args(**kw):
    args = dict(data_set='FOLDER', data_path=None, input_size=32, color_jitter=0.3, hflip=0.5,
                aa='rand-m9-mstd0.5-inc1', train_interpolation='bicubic', reprob=0.25,
                remode='pixel', recount=1, eval_crop_ratio=0.875, ThreeAugment=False, src=False,
                inat_category='name', nb_classes=None)
    args.update(kw)
    return SimpleNamespace(**args)


def write_image(path, size=(40, 30), colour=(10, 200, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', size, colour).save(path)


def make_folder(root, splits):
    """splits: {'train': {'cat': 2, ...}, ...} -> root/split/class/i.png"""
    for split, classes in splits.items():
        os.makedirs(root / split, exist_ok=True)
        for name, count in classes.items():
            os.makedirs(root / split / name, exist_ok=True)
            for i in range(count):
                write_image(str(root / split / name / f'{i}.png'))
    return str(root)


# ---- transforms ------------------------------------------------------------------------------

def test_train_transform_small_inputs_use_padded_random_crop():
    t = build_transform(True, make_args(input_size=32))
    assert isinstance(t.transforms[0], transforms.RandomCrop) and t.transforms[0].padding == 4
    assert t(Image.new('RGB', (32, 32))).shape == (3, 32, 32)


def test_train_transform_large_inputs_use_random_resized_crop():
    t = build_transform(True, make_args(input_size=224))
    assert isinstance(t.transforms[0], RandomResizedCropAndInterpolation)
    names = [type(x).__name__ for x in t.transforms]
    assert 'RandAugment' in names and 'RandomErasing' in names
    assert t(Image.new('RGB', (50, 40))).shape == (3, 224, 224)


def test_train_transform_aa_none_and_threeaugment():
    t = build_transform(True, make_args(input_size=64, aa='none', reprob=0.0))
    names = [type(x).__name__ for x in t.transforms]
    assert 'RandAugment' not in names and 'ColorJitter' in names and 'RandomErasing' not in names
    t = build_transform(True, make_args(input_size=64, ThreeAugment=True))
    assert any(isinstance(x, transforms.RandomChoice) for x in t.transforms)
    t = build_transform(True, make_args(input_size=64, ThreeAugment=True, src=True))
    assert isinstance(t.transforms[0], transforms.Resize)


@pytest.mark.parametrize('ratio, resized', [(0.875, 256), (1.0, 224)])
def test_eval_transform_resize_then_center_crop(ratio, resized):
    t = build_transform(False, make_args(input_size=224, eval_crop_ratio=ratio))
    resize, crop = t.transforms[:2]
    assert isinstance(resize, transforms.Resize) and resize.size == resized
    assert isinstance(crop, transforms.CenterCrop) and crop.size == (224, 224)
    assert t(Image.new('RGB', (400, 300))).shape == (3, 224, 224)


def test_eval_transform_small_inputs_are_not_resized():
    t = build_transform(False, make_args(input_size=32))
    assert [type(x) for x in t.transforms] == [transforms.ToTensor, transforms.Normalize]
    x = t(Image.new('RGB', (32, 32), (124, 116, 104)))  # ~ImageNet mean colour -> ~0
    assert x.shape == (3, 32, 32) and x.abs().max() < 0.02


# ---- image folders ---------------------------------------------------------------------------

def test_folder_counts_classes_and_nb_classes_overrides(tmp_path):
    root = make_folder(tmp_path, {'train': {'a': 2, 'b': 1, 'c': 1}, 'val': {'a': 1, 'b': 1, 'c': 1}})
    ds, nb = build_dataset(True, make_args(data_path=root))
    assert nb == 3 and len(ds) == 4
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == 0
    ds, nb = build_dataset(False, make_args(data_path=root, nb_classes=10))
    assert nb == 10 and len(ds) == 3
    with pytest.raises(DataError, match='--nb-classes 2'):
        build_dataset(True, make_args(data_path=root, nb_classes=2))


def test_val_subset_keeps_train_labels(tmp_path):
    root = make_folder(tmp_path, {'train': {'a': 1, 'b': 1, 'c': 1}, 'val': {'c': 2}})
    ds, nb = build_dataset(False, make_args(data_path=root))
    assert nb == 3 and [y for _, y in ds.samples] == [2, 2]  # 'c' is class 2 in train


def test_val_class_unknown_to_train_is_an_error(tmp_path):
    root = make_folder(tmp_path, {'train': {'a': 1}, 'val': {'a': 1, 'zebra': 1}})
    with pytest.raises(DataError, match='zebra'):
        build_dataset(False, make_args(data_path=root))


def test_eval_only_folder_without_train_split(tmp_path):
    root = make_folder(tmp_path, {'val': {'a': 1, 'b': 1}})
    assert build_dataset(False, make_args(data_path=root))[1] == 2
    with pytest.raises(DataError, match='no train/ folder'):
        build_dataset(True, make_args(data_path=root))


def test_imnet_counts_classes_and_warns_when_not_1000(tmp_path):
    root = make_folder(tmp_path, {'train': {'n01': 1, 'n02': 1}})
    with pytest.warns(UserWarning, match='2 classes'):
        assert build_dataset(True, make_args(data_set='IMNET', data_path=root))[1] == 2


def test_dataset_pickles_for_workers(tmp_path):
    root = make_folder(tmp_path, {'train': {'a': 2}})
    ds = pickle.loads(pickle.dumps(build_dataset(True, make_args(data_path=root))[0]))
    assert ds[1][0].shape == (3, 32, 32)


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['FOLDER', 'IMNET', 'CIFAR', 'INAT'])
def test_missing_data_path_is_named(tmp_path, kind):
    missing = str(tmp_path / 'no_such_dir')
    with pytest.raises(DataError, match=r"'.*no_such_dir' does not exist"):
        build_dataset(True, make_args(data_set=kind, data_path=missing))


@pytest.mark.parametrize('split, folders', [('train', ['train']),  # no class folders
                                            ('train', ['train/a']),  # a class without images
                                            ('val', ['train/a', 'val/a'])])  # val maps onto train classes
def test_empty_data_set(tmp_path, split, folders):
    for folder in folders:
        os.makedirs(tmp_path / folder)
    if split == 'val':
        write_image(str(tmp_path / 'train' / 'a' / '0.png'))
    with pytest.raises(DataError, match='no images found'):
        build_dataset(split == 'train', make_args(data_path=str(tmp_path)))


@pytest.mark.parametrize('damage', ['garbage', 'truncated'])
def test_unreadable_image_names_the_file(tmp_path, damage):
    root = make_folder(tmp_path, {'train': {'a': 1}})
    bad = tmp_path / 'train' / 'a' / 'bad.jpg'
    if damage == 'garbage':
        bad.write_bytes(b'not an image at all')
    else:
        Image.new('RGB', (64, 64), (1, 2, 3)).save(bad)
        bad.write_bytes(bad.read_bytes()[:200])
    ds, _ = build_dataset(True, make_args(data_path=root))
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(DataError, match=r'cannot read image .*bad\.jpg'):
        ds[index]


def test_unreadable_image_error_crosses_dataloader_workers(tmp_path):
    root = make_folder(tmp_path, {'train': {'a': 1}})
    (tmp_path / 'train' / 'a' / 'bad.png').write_bytes(b'\x89PNG broken')
    ds, _ = build_dataset(True, make_args(data_path=root))
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1))
    with pytest.raises(DataError, match=r'bad\.png'):  # the type survives the worker
        next(batches)
    assert list(batches) == []  # drained: the worker exits now, not after a 5 s join timeout


def test_cifar_is_never_downloaded(tmp_path):
    for kind in ('CIFAR', 'CIFAR10'):
        with pytest.raises(DataError, match=str(tmp_path)):
            build_dataset(True, make_args(data_set=kind, data_path=str(tmp_path)))
    assert os.listdir(tmp_path) == []


def test_unknown_data_set(tmp_path):
    with pytest.raises(DataError, match='MNIST'):
        build_dataset(True, make_args(data_set='MNIST', data_path=str(tmp_path)))


# ---- iNaturalist -----------------------------------------------------------------------------

def make_inat(root, year, flat=False):
    """Three species in two genera; file names as in the official json files."""
    cats = [{'id': 0, 'name': 'canis lupus', 'genus': 'canis'},
            {'id': 1, 'name': 'felis catus', 'genus': 'felis'},
            {'id': 2, 'name': 'canis aureus', 'genus': 'canis'}]
    json.dump(cats, open(root / 'categories.json', 'w'))
    # train lists felis first: class indices follow first appearance, not category ids
    for split, cat_ids in (('train', [1, 0, 2, 0]), ('val', [2, 1])):
        images, anns = [], []
        for i, c in enumerate(cat_ids):
            name = f'train_val{year}/Animalia/{c}/{split}{i}.jpg'
            on_disk = f'train_val{year}/{c}/{split}{i}.jpg' if flat else name
            write_image(str(root / on_disk), (32, 32))
            images.append({'id': 100 + i, 'file_name': name})
            anns.append({'id': i, 'image_id': 100 + i, 'category_id': c})
        json.dump({'images': images, 'annotations': anns}, open(root / f'{split}{year}.json', 'w'))
    return str(root)


@pytest.mark.parametrize('kind, year, flat', [('INAT', 2018, False), ('INAT19', 2019, True)])
def test_inat_labels_by_category(tmp_path, kind, year, flat):
    root = make_inat(tmp_path, year, flat)
    ds, nb = build_dataset(True, make_args(data_set=kind, data_path=root))
    assert nb == 3 and [y for _, y in ds.samples] == [0, 1, 2, 1]
    ds, nb = build_dataset(False, make_args(data_set=kind, data_path=root))
    assert [y for _, y in ds.samples] == [2, 0]
    assert ds[0][0].shape == (3, 32, 32) and all(os.path.exists(p) for p, _ in ds.samples)
    ds, nb = build_dataset(False, make_args(data_set=kind, data_path=root, inat_category='genus'))
    assert nb == 2 and [y for _, y in ds.samples] == [1, 0]  # felis first, then canis


def test_inat_missing_annotations_named(tmp_path):
    make_inat(tmp_path, 2018)
    os.remove(tmp_path / 'val2018.json')
    with pytest.raises(DataError, match='val2018.json'):
        build_dataset(False, make_args(data_set='INAT', data_path=str(tmp_path)))
    with pytest.raises(DataError, match='species'):
        build_dataset(True, make_args(data_set='INAT', data_path=str(tmp_path), inat_category='species'))


@pytest.mark.parametrize('three_augment', [False, True])
def test_hflip_probability_reaches_the_flip(three_augment):
    for p in (0.0, 0.5):
        t = build_transform(True, make_args(input_size=32, aa='none', reprob=0.0, hflip=p,
                                            ThreeAugment=three_augment))
        flips = [x for x in t.transforms if isinstance(x, transforms.RandomHorizontalFlip)]
        assert [f.p for f in flips] == ([p] if p or three_augment else [])


def test_every_file_format_loads_as_rgb_with_its_content(tmp_path):
    """Grayscale, CMYK, alpha, palette, bilevel and 16-bit files of a real photo all come back as 8-bit RGB
    that still looks like the photo (16-bit grayscale is scaled, not clipped to white)."""
    import numpy as np
    from datasets import load_image
    from photos import sample_photos, write_odd_formats
    crop = sample_photos()[0].crop((50, 60, 250, 210))
    gray = np.asarray(crop.convert('L'), dtype=np.float32)
    for path in write_odd_formats(tmp_path, crop):
        img = load_image(str(path))
        assert img.mode == 'RGB' and img.size == crop.size, path.name
        got = np.asarray(img.convert('L'), dtype=np.float32)
        tolerance = 130 if path.name == 'bilevel.png' else 12  # 1-bit dithering keeps only the layout
        assert np.abs(got - gray).mean() < tolerance, path.name
        assert np.corrcoef(got.ravel(), gray.ravel())[0, 1] > (0.3 if path.name == 'bilevel.png' else 0.95)


# ---- the released fine-tuning transforms against timm's create_transform --------------------------------
def transform_settings(transform) -> list:
    """Each step of a Compose with what it is set to: the repr of plain steps (torchvision's ToTensor and
    timm's MaybeToTensor are the same step on PIL images), Normalize's mean and std, and for timm's
    RandAugment the layer count,
    choice weights and each op's name, probability, magnitude (mean, std, max), hyperparameters and PIL
    arguments."""
    steps = []
    for t in transform.transforms:
        if isinstance(t, RandAugment):
            steps.append(('RandAugment', t.num_layers, t.choice_weights, [
                (op.name, op.prob, op.magnitude, op.magnitude_std, op.magnitude_max, op.hparams, op.kwargs)
                for op in t.ops]))
        elif isinstance(t, transforms.Normalize):  # timm holds mean and std as float32 tensors
            steps.append(('Normalize', *(torch.as_tensor(v, dtype=torch.float32).tolist() for v in (t.mean, t.std))))
        else:
            steps.append(repr(t).replace('MaybeToTensor', 'ToTensor'))
    return steps


def released_finetune_args():
    """main.py's arguments for the released fine-tuning command, as scripts/finetune_vit5.sh gives them."""
    proc = subprocess.run(['bash', 'scripts/finetune_vit5.sh', 'small', '--dry-run', '--ckpt', 'CKPT', '--data-path',
                           'DATA'], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout.strip().splitlines()[-1])
    return parse(argv[argv.index('main.py') + 1:])


def test_finetune_transforms_are_timms_for_the_released_flags():
    """The train and eval transforms of the released fine-tuning flags are the ones timm's create_transform
    builds for the released settings (DeiT's call): the same steps and settings (random resized crop of
    scale 0.08..1, bicubic; flip; RandAugment rand-m9-mstd0.5-inc1 with no colour jitter beside it; no random
    erasing at --reprob 0; eval: bicubic resize to 224 / 1.0 and centre crop), and the same pixels on real
    photo crops under the same seeds."""
    args = released_finetune_args()
    assert (args.input_size, args.aa, args.reprob, args.eval_crop_ratio) == (224, 'rand-m9-mstd0.5-inc1', 0.0, 1.0)
    ours = dict(train=build_transform(True, args), eval=build_transform(False, args))
    reference = dict(
        train=create_transform(224, is_training=True, color_jitter=0.3, auto_augment='rand-m9-mstd0.5-inc1',
                               interpolation='bicubic', re_prob=0.0, re_mode='pixel', re_count=1),
        eval=create_transform(224, is_training=False, interpolation='bicubic', crop_pct=1.0))
    for split in ('train', 'eval'):
        assert transform_settings(ours[split]) == transform_settings(reference[split]), split
    assert [type(t).__name__ for t in ours['train'].transforms] == [
        'RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'MaybeToTensor', 'Normalize']
    crop = ours['train'].transforms[0]
    assert (crop.scale, crop.ratio, crop.interpolation) == ((0.08, 1.0), (3 / 4, 4 / 3), InterpolationMode.BICUBIC)
    # the reference gets the same posterize as ours (a 0-bit draw gives black, augment.fix_posterize, tested in
    # test_augment.py), so a rare 0-bit draw does not raise on Pillow 13
    fix_posterize(reference['train'])
    for i, image in enumerate(photo_crops(8, min_side=60, max_side=427, seed=5)):
        for split in ('train', 'eval'):
            outputs = []
            for transform in (ours[split], reference[split]):
                random.seed(i)
                np.random.seed(i)
                torch.manual_seed(i)
                outputs.append(transform(image))
            assert torch.equal(*outputs), (split, i)
