"""Write an ImageFolder of ImageNet-like JPEG photos, of any size, from the two photos in scikit-learn.

scikit-learn ships two 427x640 JPEG photos (load_sample_images: a temple in China, a flower), so
nothing is downloaded. Every image is a random region of one of them, resized to a random size of
200..500 px a side and saved as a JPEG at quality 90; --gray of them are grayscale JPEGs and --odd
of them CMYK JPEGs or RGBA PNGs, so the unusual formats are exercised too. Classes are vertical
bands of the photos (--classes, an even number: half per photo); an image's region is centred in
its class's band.

    OUT/train/<photo>_<band>/<index>.jpg (or .png)
    OUT/val/<photo>_<band>/<index>.jpg

    python scripts/make_photo_folder.py --out runs/photos --train 2000 --val 200
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from common import Parser, fresh_image_folder

PHOTOS = ('china', 'flower')  # the order of load_sample_images()


def parse_args(argv=None):
    p = Parser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='output folder (gets train/ and val/)')
    p.add_argument('--train', type=int, default=1000, help='training images (default 1000)')
    p.add_argument('--val', type=int, default=100, help='validation images (default 100)')
    p.add_argument('--classes', type=int, default=4, help='number of classes, even, 2..16 (default 4)')
    p.add_argument('--min-side', type=int, default=200, help='smallest image side in px (default 200)')
    p.add_argument('--max-side', type=int, default=500, help='largest image side in px (default 500)')
    p.add_argument('--gray', type=float, default=0.1, help='share of grayscale JPEGs (default 0.1)')
    p.add_argument('--odd', type=float, default=0.04, help='share of CMYK JPEGs and RGBA PNGs (default 0.04)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--overwrite', action='store_true', help='replace existing OUT/train and OUT/val')
    args = p.parse_args(argv)
    if args.train < 1 or args.val < 0:
        p.error(f'--train must be >= 1 and --val >= 0, got {args.train} and {args.val}')
    if args.classes < 2 or args.classes > 16 or args.classes % 2:
        p.error(f'--classes must be even, between 2 and 16, got {args.classes}')
    if not 16 <= args.min_side <= args.max_side:
        p.error(f'need 16 <= --min-side <= --max-side, got {args.min_side} and {args.max_side}')
    if not (0 <= args.gray <= 1 and 0 <= args.odd <= 1 and args.gray + args.odd <= 1):
        p.error(f'--gray and --odd are shares adding up to at most 1, got {args.gray} and {args.odd}')
    return args


def random_photo(photo: np.ndarray, band: int, bands: int, rng, min_side: int, max_side: int) -> Image.Image:
    """A region of `photo` centred in vertical band `band` of `bands`, resized to a random size.

    The region's size is the output size times a random zoom of 0.6..1.2, shrunk (keeping its
    aspect) to fit the photo, so the pixels keep about their source resolution.
    """
    height, width = photo.shape[:2]
    out_w, out_h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    zoom = rng.uniform(0.6, 1.2)
    box_w, box_h = out_w * zoom, out_h * zoom
    fit = min(1.0, width / box_w, height / box_h)
    box_w, box_h = max(int(box_w * fit), 1), max(int(box_h * fit), 1)
    centre = (band + rng.uniform(0, 1)) * width / bands
    left = int(np.clip(centre - box_w / 2, 0, width - box_w))
    top = int(rng.integers(0, height - box_h + 1))
    region = Image.fromarray(photo[top:top + box_h, left:left + box_w])
    return region.resize((out_w, out_h), Image.BICUBIC)


def save(img: Image.Image, path: Path, kind: str) -> Path:
    """kind: 'rgb' | 'gray' | 'cmyk' (JPEG, quality 90) or 'rgba' (PNG)."""
    if kind == 'rgba':
        img = img.convert('RGBA')
        img.putalpha(200)
        path = path.with_suffix('.png')
        img.save(path)
        return path
    mode = {'rgb': 'RGB', 'gray': 'L', 'cmyk': 'CMYK'}[kind]
    img.convert(mode).save(path.with_suffix('.jpg'), quality=90)
    return path.with_suffix('.jpg')


def main(argv=None):
    args = parse_args(argv)
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    out = fresh_image_folder(args.out, args.overwrite)
    rng = np.random.default_rng(args.seed)
    bands = args.classes // 2
    names = [f'{photo}_{band}' for photo in PHOTOS for band in range(bands)]
    counts = dict.fromkeys(('rgb', 'gray', 'cmyk', 'rgba'), 0)
    pixels = 0
    for split, n in (('train', args.train), ('val', args.val)):
        for i in range(n):
            label = i % len(names)  # balanced classes
            img = random_photo(photos[label // bands], label % bands, bands, rng, args.min_side, args.max_side)
            u = rng.uniform()
            kind = 'gray' if u < args.gray else ('rgb' if u < 1 - args.odd else ('cmyk', 'rgba')[i % 2])
            folder = out / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            save(img, folder / f'{i:06d}', kind)
            counts[kind] += 1
            pixels += img.width * img.height
    total = args.train + args.val
    print(f'wrote {args.train} train + {args.val} val images ({args.classes} classes, '
          f'{pixels / total / 1000:.0f} kilopixels on average; {counts["rgb"]} RGB, {counts["gray"]} grayscale, '
          f'{counts["cmyk"]} CMYK JPEGs, {counts["rgba"]} RGBA PNGs) to {out}')


if __name__ == '__main__':
    main()
