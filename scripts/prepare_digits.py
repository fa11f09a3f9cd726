"""Write scikit-learn's handwritten digits as an ImageFolder for the quick start.

The 1797 digits (8x8, 16 grey levels) ship inside scikit-learn, so nothing is
downloaded. Each is upscaled to --size px and saved as an RGB PNG:

    OUT/train/<digit>/<index>.png    (80%, stratified)
    OUT/val/<digit>/<index>.png      (20% held out; same split for the same --seed)

<index> is the digit's position in sklearn.datasets.load_digits(), so a file can be
traced back to the source array.

    python scripts/prepare_digits.py --out runs/quickstart/data
"""
import argparse
import shutil

import numpy as np
from PIL import Image

from common import Parser, fresh_image_folder


def parse_args(argv=None):
    p = Parser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='output folder (gets train/ and val/)')
    p.add_argument('--size', type=int, default=32, help='side of the saved images in px (default 32)')
    p.add_argument('--val-fraction', type=float, default=0.2, help='held-out share per class (default 0.2)')
    p.add_argument('--seed', type=int, default=0, help='seed of the train/val split (default 0)')
    p.add_argument('--overwrite', action='store_true', help='replace existing OUT/train and OUT/val')
    args = p.parse_args(argv)
    if args.size < 8:
        p.error(f'--size must be at least 8, got {args.size}')
    if not 0 < args.val_fraction < 1:
        p.error(f'--val-fraction must be between 0 and 1, got {args.val_fraction}')
    return args


def split_indices(labels: np.ndarray, val_fraction: float, seed: int):
    """Stratified split: the same share of every class goes to val."""
    from sklearn.model_selection import train_test_split
    idx = np.arange(len(labels))
    train, val = train_test_split(idx, test_size=val_fraction, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)


def to_image(digit: np.ndarray, size: int) -> Image.Image:
    """8x8 array of 0..16 -> size x size RGB image (white strokes on black)."""
    grey = Image.fromarray(np.round(digit * (255 / 16)).astype(np.uint8), mode='L')
    return grey.resize((size, size), Image.BICUBIC).convert('RGB')


def main(argv=None):
    args = parse_args(argv)
    from sklearn.datasets import load_digits
    digits = load_digits()
    out = fresh_image_folder(args.out, args.overwrite)

    train, val = split_indices(digits.target, args.val_fraction, args.seed)
    for split, indices in (('train', train), ('val', val)):
        # written beside its place and renamed into it when whole: an interrupted run leaves no half split
        partial = out / f'.{split}.partial'
        shutil.rmtree(partial, ignore_errors=True)  # this script's own leftover
        for i in indices:
            folder = partial / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            to_image(digits.images[i], args.size).save(folder / f'{i:04d}.png')
        partial.rename(out / split)
    print(f'wrote {len(train)} train + {len(val)} val digits ({args.size}x{args.size}, 10 classes) to {out}')


if __name__ == '__main__':
    main()
