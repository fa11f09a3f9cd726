"""ThreeAugment: the light train-time augmentation of the DeiT-III / ViT-5 recipe.

A crop and flip, then exactly one of {grayscale, solarize, gaussian blur} picked uniformly,
then optional color jitter. Everything comes from torchvision except the blur (see below).
"""
import torch
from PIL import ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.transforms import InterpolationMode


class RandomRadiusBlur:
    """PIL gaussian blur with a radius drawn uniformly from [radius_min, radius_max].

    torchvision's GaussianBlur wants a fixed kernel size and blurs with a truncated kernel of
    that size; the recipe blurs with PIL's filter, whose extent follows the radius, so small
    and large radii both come out as released. The radius is drawn from torch's generator,
    like every torchvision transform, so seeding torch (per DataLoader worker) fixes it.
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
