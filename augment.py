"""Train-time augmentation pieces of the recipes that the libraries do not provide as needed.

ThreeAugment (DeiT-III / ViT-5 pretraining): a crop and flip, then exactly one of {grayscale,
solarize, gaussian blur} picked uniformly, then optional color jitter. Everything comes from
torchvision except the blur (see below).

RandAugment / AutoAugment / AugMix (fine-tuning, `--aa`) come from timm; `fix_posterize` makes
their posterize ops give the recipe's result on every Pillow (see there).
"""
import torch
from PIL import Image, ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import AugmentOp
from torchvision import transforms
from torchvision.transforms import InterpolationMode


class RandomRadiusBlur:
    """PIL gaussian blur with a radius drawn uniformly from [radius_min, radius_max].

    torchvision's GaussianBlur wants a fixed kernel size and blurs with a truncated kernel of
    that size; the recipe blurs with PIL's filter, whose extent follows the radius, so small
    and large radii both come out as released. The radius is drawn from torch's generator,
    like every torchvision transform, so seeding torch (per sample: seeding.SeededDataset) fixes it.
    """

    def __init__(self, radius_min: float = 0.1, radius_max: float = 2.0):
        self.radius_min, self.radius_max = radius_min, radius_max

    def __call__(self, img):
        radius = torch.empty(()).uniform_(self.radius_min, self.radius_max).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self):
        return f'{type(self).__name__}(radius=({self.radius_min}, {self.radius_max}))'


def three_augment_transform(input_size: int, color_jitter: float = 0.3, src: bool = False, hflip: float = 0.5):
    """PIL image -> normalised float tensor (3, input_size, input_size)."""
    bicubic = InterpolationMode.BICUBIC
    if src:  # "simple random crop": keep the whole image, shift it by up to 4 px
        crop = [transforms.Resize(input_size, interpolation=bicubic),
                transforms.RandomCrop(input_size, padding=4, padding_mode='reflect')]
    else:
        crop = [transforms.RandomResizedCrop(input_size, scale=(0.08, 1.0), interpolation=bicubic)]
    tfl = crop + [
        transforms.RandomHorizontalFlip(hflip),
        transforms.RandomChoice([  # uniform choice, exactly one op per image
            transforms.Grayscale(num_output_channels=3),  # keep 3 channels for the model
            transforms.RandomSolarize(threshold=128, p=1.0),  # PIL's default threshold
            RandomRadiusBlur(0.1, 2.0),
        ]),
    ]
    if color_jitter:  # brightness, contrast, saturation; no hue
        tfl.append(transforms.ColorJitter(color_jitter, color_jitter, color_jitter))
    tfl += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(tfl)


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Keep the `bits_to_keep` most significant bits of every channel (0..8); 0 bits gives black.

    timm's RandAugment asks for 0 bits at its extremes ('PosterizeIncreasing' at magnitude 10, which
    `rand-m9-mstd0.5` draws in about 1 of 44 picks of that op; 'Posterize' at magnitude 0). The Pillow
    the recipe was made with turned that into an all-black image; recent Pillow (13) raises ValueError
    instead, which kills a training run within minutes of an ImageNet epoch. Same table as Pillow's
    for 1..8 bits, extended to 0, and applied with `Image.point` so every Pillow gives the same pixels.
    """
    bits = min(max(int(bits_to_keep), 0), 8)
    if bits == 8:
        return img
    drop = 8 - bits
    table = [(v >> drop) << drop for v in range(256)]  # bits == 0: every value -> 0
    return img.point(table * len(img.getbands()))


def _augment_ops(transform):
    """timm AugmentOps in a transform: itself, or in a Compose -> RandAugment/AugMix (.ops) or AutoAugment (.policy)."""
    for t in getattr(transform, 'transforms', [transform]):
        if isinstance(t, AugmentOp):
            yield t
        yield from getattr(t, 'ops', [])
        for sub_policy in getattr(t, 'policy', []):
            yield from sub_policy


def fix_posterize(transform):
    """Route the posterize ops of a timm auto-augment transform (or one op) through `posterize` (0 bits -> black).

    Only this transform's op objects are changed (their `aug_fn`), not timm's module tables.
    Returns the transform.
    """
    for op in _augment_ops(transform):
        if op.name.startswith('Posterize'):
            op.aug_fn = posterize
    return transform
