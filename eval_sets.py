"""The evaluation sets papers report beside ImageNet-1k val: ImageNet-ReaL, -V2, -A, -R and -Sketch.

Each set is read from its own folder, as it is distributed, and each has a labelling rule that is easy
to get silently wrong. Here every rule is written once, and a folder that does not fit its set raises
DataError (main.py: one line, exit code 2) instead of giving a confident wrong number:

- v2: class folders `0` .. `999`; the folder name IS the ImageNet-1k index (ImageFolder would sort
  the names as strings and make `10` class 2).
- a, r: synset folders of 200 classes each; the logits are restricted to those 200 classes before the
  argmax (over all 1000, ImageNet-A scores near zero). Targets are positions in the 200.
- sketch: synset folders of the 1000 classes; a folder keeps its ImageNet-1k index when others are
  missing.
- real: the ImageNet val images with the reassessed label sets of Beyer et al. 2020 ("Are we done
  with ImageNet?"), found by the number in `ILSVRC2012_val_NNNNNNNN`; a prediction is right when it is
  in the image's set; images with an empty set are left out.

The class lists and the ReaL labels are the copies timm ships in `timm/data/_info`.
"""
import importlib.resources
import json
import os
import re
from typing import Optional

import torch
from timm.data import ImageNetInfo
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS

from datasets import DataError, load_image

EVAL_SETS = ('in1k', 'real', 'v2', 'a', 'r', 'sketch')
TITLES = dict(in1k='ImageNet-1k', real='ImageNet-ReaL', v2='ImageNet-V2', a='ImageNet-A', r='ImageNet-R',
              sketch='ImageNet-Sketch')
# images in each set as distributed (ReaL: the val images with a non-empty label set)
FULL_SIZES = dict(real=46837, v2=10000, a=7500, r=30000, sketch=50889)
NUM_CLASSES = 1000  # every set is scored by an ImageNet-1k classifier
REAL_NAME = re.compile(r'ILSVRC2012_val_(\d{8})$')
TIMM_REAL = "timm's imagenet_real_labels.json"
# what the class folders of each set are named, for the refusal of a folder that does not fit
FOLDER_RULES = dict(v2='named 0 to 999 (the ImageNet-1k class index)',
                    a="ImageNet-A's 200 synsets (timm's imagenet_a_synsets.txt)",
                    r="ImageNet-R's 200 synsets (timm's imagenet_r_synsets.txt)",
                    sketch='the 1000 ImageNet-1k synsets (n01440764, ...)')


def _timm_info(name: str) -> str:
    return (importlib.resources.files('timm.data') / '_info' / name).read_text()


def _subset_synsets(name: str) -> tuple:
    """ImageNet-A or -R: the 200 synsets, in ImageNet-1k order."""
    return tuple(_timm_info(f'imagenet_{name}_synsets.txt').split())


def logit_classes(name: str) -> Optional[torch.Tensor]:
    """The ImageNet-1k logits `name` is scored on, in the order of its targets; None for all 1000."""
    if name not in ('a', 'r'):
        return None
    return torch.tensor([int(i) for i in _timm_info(f'imagenet_{name}_indices.txt').split()])


def folder_labels(name: str) -> dict:
    """Class folder name -> target, for the sets read as class folders (v2, a, r, sketch)."""
    if name == 'v2':
        return {str(i): i for i in range(NUM_CLASSES)}
    if name in ('a', 'r'):
        return {synset: i for i, synset in enumerate(_subset_synsets(name))}
    return {synset: i for i, synset in enumerate(ImageNetInfo().label_names())}


class ClassFolderSet(datasets.ImageFolder):
    """Class folders whose names the set's rule turns into targets; an unknown name is a DataError.
    Folders may be missing (a partial copy): the others keep their targets."""

    def __init__(self, root, name: str, transform=None):
        self.name, self.labels = name, folder_labels(name)
        super().__init__(root, transform=transform, loader=load_image, allow_empty=True)

    def find_classes(self, directory):
        names = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith('.'))
        if not names:
            raise DataError(f'{directory} holds no class folders, which {TITLES[self.name]} needs '
                            f'({FOLDER_RULES[self.name]})')
        unknown = [n for n in names if n not in self.labels]
        if unknown:
            more = f' and {len(unknown) - 1} more' if len(unknown) > 1 else ''
            inner = os.path.join(directory, names[0])  # the folder a download unpacks to (imagenet-a/, sketch/)?
            nested = len(names) == 1 and any(e.is_dir() for e in os.scandir(inner))
            hint = f' (did you mean --data-path {inner}?)' if nested else ''
            raise DataError(f'{directory} is not {TITLES[self.name]}: its class folders are '
                            f'{FOLDER_RULES[self.name]}, but it has {unknown[0]!r}{more}{hint}')
        return names, {n: self.labels[n] for n in names}


def read_real_labels(path: Optional[str] = None) -> list:
    """The ReaL label sets, one list of ImageNet-1k indices per val image (image N at N - 1):
    timm's copy of the authors' real.json, or the file at `path`."""
    source = path or TIMM_REAL
    try:
        if path is None:
            text = _timm_info('imagenet_real_labels.json')
        else:
            with open(path) as f:
                text = f.read()
        labels = json.loads(text)
    except (OSError, ValueError) as err:
        raise DataError(f'cannot read the ReaL labels {source}: {err}') from None
    valid = isinstance(labels, list) and all(
        isinstance(s, list) and all(isinstance(c, int) and 0 <= c < NUM_CLASSES for c in s) for s in labels)
    if not valid:
        raise DataError(f'{source} is not a ReaL label file: a JSON list, per val image, of lists of '
                        f'class indices in [0, {NUM_CLASSES})')
    return labels


def _real_images(root: str) -> list:
    """Image files in `root` and in its sub-folders: the flat val folder or the synset-sorted one."""
    found = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith('.'):
            found += [os.path.join(entry.path, f) for f in sorted(os.listdir(entry.path))]
        else:
            found.append(entry.path)
    return [p for p in found if p.lower().endswith(IMG_EXTENSIONS)]


class RealSet(torch.utils.data.Dataset):
    """ImageNet val images with their ReaL label sets; a target is a (1000,) bool mask of the right
    classes. Images whose set is empty are left out (`skipped` counts them).

    Not timm's RealLabelsImagenet: that one matches predictions, in loader order, against the file
    names of all 50,000 images in one process. Here each image carries its set as its target, so a
    partial folder, --dist-eval shards and engine.evaluate's sums work unchanged.
    """

    def __init__(self, root: str, transform=None, labels_file: Optional[str] = None):
        self.transform = transform
        labels = read_real_labels(labels_file)
        paths = _real_images(root)
        if not paths:
            raise DataError(f'no images found in {root} (ImageNet-ReaL reads the ImageNet val folder, flat or '
                            f'sorted into synset folders)')
        seen, self.samples, self.skipped = {}, [], 0
        for path in paths:
            match = REAL_NAME.match(os.path.splitext(os.path.basename(path))[0])
            if match is None:
                raise DataError(f'{path} is not an ImageNet val image: ImageNet-ReaL finds its labels by the '
                                f'number in ILSVRC2012_val_NNNNNNNN')
            number = int(match.group(1))
            if not 1 <= number <= len(labels):
                raise DataError(f'{path}: the ReaL labels ({labels_file or TIMM_REAL}) cover val images 1 to '
                                f'{len(labels)}, not {number}')
            if number in seen:
                raise DataError(f'{path}: val image {number} is also at {seen[number]}')
            seen[number] = path
            if labels[number - 1]:
                self.samples.append((path, tuple(labels[number - 1])))
            else:
                self.skipped += 1

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, classes = self.samples[index]
        target = torch.zeros(NUM_CLASSES, dtype=torch.bool)
        target[list(classes)] = True
        img = load_image(path)
        return (self.transform(img) if self.transform else img), target


def build_eval_set(name: str, root: str, transform=None, real_labels: Optional[str] = None):
    """The dataset of eval set `name` (not in1k, which is datasets.build_dataset's val split) at
    `root`, as distributed. Prints what differs from the full set."""
    if not root or not os.path.isdir(root):
        raise DataError(f'data path {root!r} does not exist or is not a folder')
    if name == 'real':
        if os.path.isdir(os.path.join(root, 'val')):  # an ImageNet root, as --data-set IMNET reads it
            root = os.path.join(root, 'val')
        dataset = RealSet(root, transform, real_labels)
        if dataset.skipped:
            print(f'{TITLES[name]}: {dataset.skipped} of {len(dataset) + dataset.skipped} images in {root} have '
                  f'an empty label set and are left out')
    else:
        dataset = ClassFolderSet(root, name, transform)
    if len(dataset) == 0:
        raise DataError(f'no images found in {root}')
    if len(dataset) != FULL_SIZES[name]:
        print(f'Note: {root} holds {len(dataset)} of the {FULL_SIZES[name]} images of {TITLES[name]}; '
              f'its top-1 is not comparable with published numbers')
    return dataset
