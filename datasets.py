"""Data sets and transforms of the recipe: ImageNet / any image folder, CIFAR-10/100, iNaturalist,
WebDataset shards (wds_data.py).

Every problem with the data on disk raises DataError with the path at fault in the message;
main.py turns it into a one-line error.
"""
import contextlib
import json
import os
import warnings
from typing import Optional

import numpy as np
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from augment import fix_posterize, three_augment_transform


class DataError(ValueError):
    """The data on disk is missing, empty or unreadable."""


# 16-bit (and 32-bit integer) grayscale, e.g. scientific or medical PNGs
WIDE_GRAY_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB (grayscale replicated, alpha dropped, CMYK and palettes converted).

    PIL's convert('RGB') clips 16-bit grayscale at 255, which turns almost every pixel white;
    such images are scaled to 8 bits instead (65535 -> 255), keeping their content.
    """
    if img.mode in WIDE_GRAY_MODES:
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257), 0, 255).astype(np.uint8))  # mode 'L'
    return img.convert('RGB')


def load_image(source, name: Optional[str] = None) -> Image.Image:
    """Open an image as RGB: a path, or a binary file object (a shard's member) that messages call `name`.
    A broken file raises DataError naming it.

    A module-level function so DataLoader workers can pickle it.
    """
    try:
        with open(source, 'rb') if name is None else contextlib.nullcontext(source) as f:
            return to_rgb(Image.open(f))
    # PIL signals bad files with OSError (truncated, unidentified), SyntaxError (broken PNG),
    # ValueError and DecompressionBombError (absurd sizes)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f'cannot read image {source if name is None else name}: {err}') from err


class ImageFolderDataset(datasets.ImageFolder):
    """ImageFolder reading through load_image.

    With `class_names` (the train split's classes), the folder's classes are mapped onto those
    indices, so a val split holding a subset of the classes keeps the train labels; a class
    unknown to the train split is an error rather than a silently shifted label.
    """

    def __init__(self, root, transform=None, class_names=None):
        self.class_names = class_names
        super().__init__(root, transform=transform, loader=load_image,
                         allow_empty=class_names is not None)

    def find_classes(self, directory):
        classes, class_to_idx = super().find_classes(directory)
        if self.class_names is None:
            return classes, class_to_idx
        unknown = sorted(set(classes) - set(self.class_names))
        if unknown:
            raise DataError(f'{directory} has classes that the train split lacks: {unknown[:5]}')
        return list(self.class_names), {c: i for i, c in enumerate(self.class_names)}


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f'cannot read annotation file {path}: {err}') from err


def _inat_path(root, file_name, flat):
    parts = file_name.split('/')
    return os.path.join(root, parts[0], *parts[2:]) if flat else os.path.join(root, file_name)


class INatDataset(datasets.VisionDataset):
    """iNaturalist 2018/2019 from its json annotations (as DeiT reads them).

    A class is one distinct value of the chosen `category` field ('name', 'genus', ...) of
    categories.json, numbered in order of first appearance among the train{year}.json
    annotations, so train and val agree. An image's category id comes from its annotation.
    """

    def __init__(self, root, train=True, year=2018, category='name', transform=None):
        super().__init__(root, transform=transform)
        categories = _read_json(os.path.join(root, 'categories.json'))  # list, indexed by id
        categories = {c.get('id', i): c for i, c in enumerate(categories)}
        label_of = {}  # category value -> class index
        for ann in _read_json(os.path.join(root, f'train{year}.json'))['annotations']:
            label_of.setdefault(categories[ann['category_id']][category], len(label_of))
        split = _read_json(os.path.join(root, f'{"train" if train else "val"}{year}.json'))
        cat_of_image = {ann['image_id']: ann['category_id'] for ann in split['annotations']}
        # file names read <split dir>/<super-category>/<category id>/<file>; DeiT's copies drop
        # the super-category folder, so that layout is used when only it is on disk
        names = [img['file_name'] for img in split['images']]
        flat = bool(names) and not os.path.exists(_inat_path(root, names[0], False)) \
            and os.path.exists(_inat_path(root, names[0], True))
        self.samples = []  # [(path, class index)]
        for img, name in zip(split['images'], names):
            value = categories[cat_of_image[img['id']]][category]
            self.samples.append((_inat_path(root, name, flat), label_of[value]))
        self.nb_classes = len(label_of)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = load_image(path)
        return (self.transform(img) if self.transform else img), target


SMALL_INPUT = 32  # inputs of this size or less (CIFAR-sized) are cropped with padding, never resized


def eval_data_config(input_size: int, crop_ratio: float) -> dict:
    """The evaluation transform below in timm's data-config terms (the fields of a pretrained cfg), so
    timm.data.create_transform(**cfg) gives the same tensors: resize the shorter side to
    input_size / crop_ratio (bicubic), centre crop, ImageNet mean and std. Small inputs are not resized:
    crop_pct 1 says so for images of the input size (a resize to their own size leaves them as they are)."""
    return dict(input_size=(3, input_size, input_size), interpolation='bicubic', crop_mode='center',
                crop_pct=1.0 if input_size <= SMALL_INPUT else crop_ratio,
                mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def build_transform(is_train: bool, args):
    """PIL image -> normalised tensor (3, input_size, input_size)."""
    size = args.input_size
    small = size <= SMALL_INPUT
    if is_train and args.ThreeAugment:
        return three_augment_transform(size, args.color_jitter, args.src, args.hflip)
    if is_train:
        aa = None if args.aa in (None, '', 'none') else args.aa  # timm has no 'none' policy
        t = create_transform(size, is_training=True, color_jitter=args.color_jitter,
                             hflip=args.hflip, auto_augment=aa, interpolation=args.train_interpolation,
                             re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
        fix_posterize(t)  # RandAugment's 0-bit posterize: black image, as the recipe had it, on any Pillow
        if small:
            t.transforms[0] = transforms.RandomCrop(size, padding=4)  # replaces the random resized crop
        return t
    cfg, t = eval_data_config(size, args.eval_crop_ratio), []
    if not small:
        t += [transforms.Resize(int(size / cfg['crop_pct']), interpolation=InterpolationMode(cfg['interpolation'])),
              transforms.CenterCrop(size)]
    t += [transforms.ToTensor(), transforms.Normalize(cfg['mean'], cfg['std'])]
    return transforms.Compose(t)


def _image_folder(root, split, transform):
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f'no {split}/ folder in data path {root}')
    class_names = None
    if split != 'train' and os.path.isdir(os.path.join(root, 'train')):
        class_names = datasets.folder.find_classes(os.path.join(root, 'train'))[0]
    try:
        dataset = ImageFolderDataset(folder, transform, class_names)
    except FileNotFoundError as err:  # torchvision: no class folders, or a class without images
        raise DataError(f'no images found in {folder}: {err}') from err
    if len(dataset) == 0:
        raise DataError(f'no images found in {folder}')
    return dataset, len(dataset.classes)


def build_dataset(is_train: bool, args, transform=None):
    """Returns (dataset, nb_classes); args.nb_classes, when set, overrides the count.

    `transform` replaces build_transform's for the PIL images (--data-pipeline gpu: the worker half).
    WDS: the split's shards (wds_data.Shards), read through its train_stream / eval_stream.
    """
    if args.data_set == 'WDS':  # a folder or URL prefix; webdataset is imported for shards only
        import wds_data
        shards = wds_data.open_split(args.data_path or '', is_train, transform or build_transform(is_train, args),
                                     args.nb_classes)
        return shards, shards.nb_classes
    root = args.data_path
    if not root or not os.path.isdir(root):
        raise DataError(f'data path {root!r} does not exist or is not a folder')
    transform = transform or build_transform(is_train, args)
    kind = args.data_set
    if kind in ('CIFAR', 'CIFAR10'):
        cls = datasets.CIFAR100 if kind == 'CIFAR' else datasets.CIFAR10
        try:  # never downloads: the batches must already be under root
            dataset = cls(root, train=is_train, transform=transform, download=False)
        except RuntimeError as err:
            raise DataError(f'no {cls.__name__} data in {root}: {err}') from err
        nb_classes = len(dataset.classes)
    elif kind in ('IMNET', 'FOLDER'):
        dataset, nb_classes = _image_folder(root, 'train' if is_train else 'val', transform)
        if kind == 'IMNET' and nb_classes != 1000:
            warnings.warn(f'IMNET at {root} has {nb_classes} classes, not 1000')
    elif kind in ('INAT', 'INAT19'):
        year = 2018 if kind == 'INAT' else 2019
        try:
            dataset = INatDataset(root, is_train, year, args.inat_category, transform)
        except KeyError as err:
            raise DataError(f'iNaturalist {year} annotations in {root} lack {err}') from err
        if len(dataset) == 0:
            raise DataError(f'no images listed in the iNaturalist {year} annotations in {root}')
        nb_classes = dataset.nb_classes
    else:
        raise DataError(f'unknown data set {kind!r}')
    if args.nb_classes is not None:
        if args.nb_classes < nb_classes:
            raise DataError(f'--nb-classes {args.nb_classes} is fewer than the {nb_classes} classes in {root}')
        nb_classes = args.nb_classes
    return dataset, nb_classes
