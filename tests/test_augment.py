import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from augment import RandomRadiusBlur, three_augment_transform

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def _pixels(x):
    """Normalised tensor (3, H, W) -> 0..255 values."""
    return (x * STD + MEAN) * 255


def _seed(s=0):
    torch.manual_seed(s)
    random.seed(s)  # RandomChoice draws from python's generator
    np.random.seed(s)  # timm's RandAugment picks its ops with numpy


@pytest.mark.parametrize('src', [False, True])
def test_output_shape_and_normalisation(src):
    _seed()
    t = three_augment_transform(24, color_jitter=0.0, src=src)
    img = Image.new('RGB', (40, 30), (128, 128, 128))
    for _ in range(10):
        x = t(img)
        assert x.shape == (3, 24, 24) and x.dtype == torch.float32
        # a mid-gray image stays 128 (grayscale, blur) or 127 (solarize inverts >= 128)
        v = _pixels(x)
        assert torch.allclose(v, torch.full_like(v, 128.0), atol=1.01)


def test_exactly_one_of_three_ops_is_chosen_uniformly():
    _seed()
    rgb = (200, 40, 90)
    gray = round(0.299 * 200 + 0.587 * 40 + 0.114 * 90)
    outcomes = {'gray': (gray,) * 3, 'solarize': (255 - 200, 40, 90), 'blur': rgb}
    t = three_augment_transform(16, color_jitter=0.0)
    img = Image.new('RGB', (20, 20), rgb)  # uniform: crop, flip and blur keep the colour
    counts = dict.fromkeys(outcomes, 0)
    for _ in range(300):
        colour = _pixels(t(img)).mean((1, 2))
        hits = [k for k, c in outcomes.items() if torch.allclose(colour, torch.tensor(c, dtype=torch.float), atol=1.5)]
        assert len(hits) == 1, colour
        counts[hits[0]] += 1
    assert all(70 <= c <= 130 for c in counts.values()), counts  # 100 +- 30 each when uniform


def test_color_jitter_only_when_positive():
    kinds = lambda t: [type(x) for x in t.transforms]
    assert transforms.ColorJitter not in kinds(three_augment_transform(16, color_jitter=0.0))
    t = three_augment_transform(16, color_jitter=0.3)
    cj = t.transforms[kinds(t).index(transforms.ColorJitter)]
    assert cj.brightness == cj.contrast == cj.saturation == (0.7, 1.3) and cj.hue is None
    _seed()
    img = Image.new('RGB', (20, 20), (200, 40, 90))
    colours = {tuple(_pixels(t(img)).mean((1, 2)).round().tolist()) for _ in range(20)}
    assert len(colours) > 3  # jitter adds variety beyond the three ops


def test_crop_stage():
    t = three_augment_transform(32)
    rrc = t.transforms[0]
    assert isinstance(rrc, transforms.RandomResizedCrop)
    assert rrc.scale == (0.08, 1.0) and rrc.interpolation == InterpolationMode.BICUBIC
    assert isinstance(t.transforms[1], transforms.RandomHorizontalFlip)

    t = three_augment_transform(32, src=True)
    resize, crop, flip = t.transforms[:3]
    assert isinstance(resize, transforms.Resize) and resize.size == 32
    assert isinstance(crop, transforms.RandomCrop)
    assert crop.padding == 4 and crop.padding_mode == 'reflect'
    assert isinstance(flip, transforms.RandomHorizontalFlip)


def test_src_keeps_the_whole_image():
    # src never zooms: a left-dark / right-bright image stays so up to a 4 px shift and a flip
    _seed()
    a = np.full((32, 32, 3), 30, np.uint8)
    a[:, 16:] = 100  # both below the solarize threshold, so every op keeps the two halves
    img = Image.fromarray(a)
    t = three_augment_transform(32, color_jitter=0.0, src=True)
    for _ in range(10):
        col = _pixels(t(img)).mean((0, 1))  # (W,) column brightness
        bright = (col > 65).sum().item()
        assert 12 <= bright <= 20  # RandomResizedCrop would often fill the frame with one side


def test_random_radius_blur():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    blur = RandomRadiusBlur(0.1, 2.0)
    torch.manual_seed(0)
    outs = [np.asarray(blur(img), dtype=np.float32) for _ in range(4)]
    assert all(o.std() < np.asarray(img, dtype=np.float32).std() for o in outs)  # smoother
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])  # the radius varies
    torch.manual_seed(0)
    assert np.array_equal(np.asarray(blur(img), dtype=np.float32), outs[0])  # seeded by torch


def test_picklable_for_workers():
    t = pickle.loads(pickle.dumps(three_augment_transform(16, src=True)))
    assert t(Image.new('RGB', (20, 20))).shape == (3, 16, 16)


# ---- the recipes on real photos, and every augmentation at its extremes ------------------------------
from PIL import ImageOps  # noqa: E402
from timm.data.auto_augment import AugmentOp, _RAND_INCREASING_TRANSFORMS, _RAND_TRANSFORMS  # noqa: E402
from timm.data.random_erasing import RandomErasing  # noqa: E402

from augment import fix_posterize, posterize  # noqa: E402
from datasets import build_transform, load_image  # noqa: E402
from photos import EXTREME_SIZES, photo_crops, sample_photos, write_odd_formats  # noqa: E402
from test_datasets import make_args  # noqa: E402

FINETUNE_AA = 'rand-m9-mstd0.5-inc1'  # the released fine-tuning recipe's policy (and our default)


def test_posterize_zero_bits_is_black_and_otherwise_equals_pillow():
    photo = sample_photos()[0].crop((0, 0, 64, 48))
    black = posterize(photo, 0)
    assert black.mode == 'RGB' and black.size == photo.size and not np.asarray(black).any()
    assert not np.asarray(posterize(photo.convert('L'), 0)).any()  # any band count
    for bits in range(1, 9):
        assert np.array_equal(np.asarray(posterize(photo, bits)), np.asarray(ImageOps.posterize(photo, bits)))


@pytest.mark.parametrize('policy, zero_bits_magnitude', [
    (FINETUNE_AA, 10),  # PosterizeIncreasing: 4 - int(m / 10 * 4) bits
    ('rand-m9-mstd0.5', 0),  # Posterize: int(m / 10 * 4) bits
    ('v0', 0),  # AutoAugment's policy with plain Posterize
    ('augmix-m5-w4-d2', 10),
])
def test_every_posterize_op_of_a_policy_gives_black_at_zero_bits(policy, zero_bits_magnitude):
    t = build_transform(True, make_args(input_size=64, aa=policy, reprob=0.0))
    ops = [op for step in t.transforms for op in getattr(step, 'ops', []) + sum(getattr(step, 'policy', []), [])
           if op.name.startswith('Posterize')]
    assert ops, t
    photo = sample_photos()[1].crop((100, 100, 164, 164))
    for op in ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, zero_bits_magnitude, 0
        assert not np.asarray(op(photo)).any(), op


def test_finetune_recipe_runs_over_thousands_of_real_photo_crops():
    """The released fine-tuning transform at 224 px on 2,500 crops of real photos: before fix_posterize,
    about 1 crop in 600 hit RandAugment's 0-bit posterize and Pillow raised."""
    _seed()
    t = build_transform(True, make_args(input_size=224, aa=FINETUNE_AA, reprob=0.0))
    for crop in photo_crops(2500, min_side=16, max_side=427, seed=1):
        x = t(crop)
        assert x.shape == (3, 224, 224)


def _extreme_inputs(tmp_path):
    """Real photo crops of extreme sizes, and one crop read back from each awkward file format."""
    photo = sample_photos()[0]
    crops = [photo.crop((0, 0, w, h)) for w, h in EXTREME_SIZES]
    return crops + [load_image(p) for p in write_odd_formats(tmp_path, photo.crop((50, 60, 250, 210)))]


@pytest.mark.parametrize('magnitude', [0, 10])
def test_every_randaugment_op_at_its_extreme_magnitudes(tmp_path, magnitude):
    hparams = dict(translate_const=100, img_mean=(124, 116, 104))
    names = sorted(set(_RAND_TRANSFORMS + _RAND_INCREASING_TRANSFORMS))
    images = _extreme_inputs(tmp_path)
    random.seed(0)
    for name in names:
        op = fix_posterize(AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams))
        for img in images:
            out = op(img)
            assert out.mode == 'RGB' and out.size == img.size, (name, img.size)


@pytest.mark.parametrize('kind', ['three', 'src', 'erase-pixel', 'erase-rand', 'erase-const'])
def test_recipe_transforms_on_extreme_images(tmp_path, kind):
    if kind in ('three', 'src'):
        t = build_transform(True, make_args(input_size=64, ThreeAugment=True, src=kind == 'src', color_jitter=0.3))
    else:  # random erasing at its extremes: always, up to 3 boxes per image
        t = build_transform(True, make_args(input_size=64, aa=FINETUNE_AA, reprob=1.0, remode=kind[6:], recount=3))
        assert any(isinstance(s, RandomErasing) for s in t.transforms)
    _seed()
    for img in _extreme_inputs(tmp_path) * 4:
        x = t(img)
        assert x.shape == (3, 64, 64) and torch.isfinite(x).all()


@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
def test_mixup_and_cutmix_at_their_extremes_on_real_photos(mode):
    """main.build_mixup from flags at the ends of their ranges: finite images, targets that sum to 1."""
    import main
    from tinyrun import parse
    t = build_transform(False, make_args(input_size=64))
    photos = torch.stack([t(c) for c in photo_crops(8, seed=3)])
    labels = torch.arange(8) % 5
    settings = [['--mixup', 1e-3, '--cutmix', 0], ['--mixup', 1e3, '--cutmix', 0], ['--mixup', 0, '--cutmix', 1e-3],
                ['--mixup', 0, '--cutmix', 1e3], ['--cutmix-minmax', 0.0, 1.0], ['--cutmix-minmax', 0.99, 1.0],
                ['--mixup-switch-prob', 1.0], ['--mixup-prob', 0.0], ['--smoothing', 0.0]]
    np.random.seed(0)
    for flags in settings:
        mix = main.build_mixup(parse(flags + ['--mixup-mode', mode, '--input-size', 64]), nb_classes=5)
        for _ in range(5):
            x, y = mix(photos.clone(), labels.clone())
            assert x.shape == photos.shape and torch.isfinite(x).all(), flags
            assert y.shape == (8, 5) and torch.allclose(y.sum(1), torch.ones(8)), flags
