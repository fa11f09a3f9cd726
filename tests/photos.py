"""Real photos for the data tests: crops of the two JPEG photos that ship with scikit-learn
(427x640 each), in ImageNet-like shapes or at extreme ones, and saved in awkward file formats."""
from pathlib import Path

import numpy as np
from PIL import Image


def photo_arrays():
    """The two photos, (427, 640, 3) uint8 arrays."""
    from sklearn.datasets import load_sample_images
    return load_sample_images().images


def sample_photos():
    return [Image.fromarray(a) for a in photo_arrays()]


def photo_crop(photos, rng, low=20, high=420):
    """A random region of one of `photos` (arrays), sides drawn from [low, high), as a PIL image."""
    p = photos[rng.integers(2)]
    h, w = (int(v) for v in rng.integers(low, high, size=2))
    top, left = rng.integers(0, p.shape[0] - h + 1), rng.integers(0, p.shape[1] - w + 1)
    return Image.fromarray(p[top:top + h, left:left + w])


def photo_crops(n, min_side=32, max_side=427, seed=0):
    """n RGB crops with sides drawn uniformly from [min_side, max_side], from random places of the photos."""
    photos, rng = photo_arrays(), np.random.default_rng(seed)
    return [photo_crop(photos, rng, min_side, max_side + 1) for _ in range(n)]


def photo_folder(root, train: int, val: int, classes: int = 3, seed: int = 0):
    """root/{train,val}/class_k/i.jpg: JPEG photo crops (quality 90) of 40 to 160 px a side, `train` and `val`
    images per class; root."""
    crops = iter(photo_crops(classes * (train + val), min_side=40, max_side=160, seed=seed))
    for split, n in (('train', train), ('val', val)):
        for k in range(classes):
            folder = Path(root) / split / f'class_{k}'
            folder.mkdir(parents=True)
            for i in range(n):
                next(crops).save(folder / f'{i}.jpg', quality=90)
    return root


# sizes at the extremes: single pixels, single rows and columns, a whole photo
EXTREME_SIZES = [(1, 1), (1, 300), (300, 1), (2, 3), (7, 400), (640, 427)]

# file formats real data sets contain, beside plain RGB JPEGs
ODD_FORMATS = {
    'gray.jpg': lambda im: im.convert('L'),
    'cmyk.jpg': lambda im: im.convert('CMYK'),
    'rgba.png': lambda im: im.convert('RGBA'),
    'gray_alpha.png': lambda im: im.convert('LA'),
    'palette.png': lambda im: im.convert('P'),
    'bilevel.png': lambda im: im.convert('1'),
    'gray16.png': lambda im: Image.fromarray(np.asarray(im.convert('L'), dtype=np.uint16) * 257),
}


def write_odd_formats(folder, crop):
    """`crop` saved once in each of ODD_FORMATS under `folder`; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, convert in ODD_FORMATS.items():
        paths.append(folder / name)
        convert(crop).save(paths[-1])
    return paths
