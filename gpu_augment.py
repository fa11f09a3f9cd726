"""The ThreeAugment recipe and the evaluation resize, run on the training device (--data-pipeline gpu).

The work is split where it is cheapest. DataLoader workers decode with PIL (any format, CMYK and
grayscale JPEGs included, exactly as the CPU path reads them), draw each image's random
parameters from torch's generator, seeded for that sample, in the order the CPU path draws them, cut the random
crop out at source resolution and ship its uint8 pixels with one row of parameters; a batch
travels as the crops' pixel rows stacked (each row padded to the widest crop only). The device
then, for the whole batch at once:

    crop pixels (B, H, W, 3) uint8, gathered from those rows, zero-padded to the largest crop
      -> bicubic resize to (S, S), flip and Gaussian blur: two batched matmuls with per-sample
         weight matrices (PIL's bicubic coefficients, the flip and the blur folded in)
      -> grayscale | solarize, colour jitter in the sample's order, ToTensor + Normalize.

Every step follows PIL's integer arithmetic (the CPU path is PIL), so for the same parameters the
pixels match the CPU path: resize within one grey level (float32 matmul instead of PIL's fixed
point), flip, grayscale, solarize, jitter and normalisation exactly, blur within a few levels
(PIL rounds between its six box passes; here the blur is one linear map).

Why by hand: torchvision's tensor resize takes one output size per call (a loop of small kernels
per batch), and its tensor grayscale and contrast use other weights and no rounding, so they drift
a grey level or more from the PIL path at each step; kornia crops and resizes with grid_sample,
without antialiasing (PIL averages when it shrinks), and its colour jitter follows neither.
"""
import contextlib
import math

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

# One float64 row of per-sample parameters travels with the pixels (integers are exact in float64):
#   IN_H, IN_W    size of the pixels shipped
#   SRC_H, SRC_W  size of the region they show, at source resolution (the CPU path resizes this)
#   RED_H, RED_W  integer factors the worker shrank the region by (1: not reduced)
#   OUT_H, OUT_W  size of the whole resized grid (S x S for a random-resized crop, else the resized image)
#   TOP, LEFT     where the S x S output window starts in that grid (negative: padding)
#   REFLECT       1: rows outside the grid mirror back in (--src padding); 0: they are black
#   FLIP          1: mirror left-right
#   OP            the one-of choice: 0 grayscale, 1 solarize, 2 blur; -1 none (evaluation)
#   RADIUS        Gaussian blur radius (PIL's: the standard deviation)
#   FN0..FN2      colour jitter steps in order: 0 brightness, 1 contrast, 2 saturation; -1 none
#   F0..F2        the factor of each step
(IN_H, IN_W, SRC_H, SRC_W, RED_H, RED_W, OUT_H, OUT_W, TOP, LEFT, REFLECT, FLIP, OP, RADIUS,
 FN0, FN1, FN2, F0, F1, F2) = range(20)
NUM_PARAMS = 20
GRAY, SOLARIZE, BLUR = 0, 1, 2
BRIGHTNESS, CONTRAST, SATURATION = 0, 1, 2
PIL_BITS = 22  # PIL's fixed-point precision for 8-bit resampling coefficients


# ---- worker side: PIL image -> (uint8 pixels, parameters) -------------------------------------------
def resized_size(height: int, width: int, short: int):
    """torchvision Resize(int): the shorter side becomes `short`, the longer keeps the aspect (floored)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def reduce_factors(box_h: int, box_w: int, out_h: int, out_w: int, gap):
    """Pillow's `reducing_gap` rule: shrink by an integer factor while the region stays >= gap x the output.

    Bounds the pixels shipped per image (a 4000 px photo would otherwise pad a whole batch to
    4000 px); with gap >= 3 Pillow documents the result as indistinguishable from plain resampling.
    """
    if not gap:
        return 1, 1
    return max(int(box_h / out_h / gap), 1), max(int(box_w / out_w / gap), 1)


def _ship(img, box, out_h: int, out_w: int, gap, params: list):
    """Cut `box` (left, upper, right, lower) out of `img`, reduced per `gap`; fill the size fields."""
    left, upper, right, lower = box
    fy, fx = reduce_factors(lower - upper, right - left, out_h, out_w, gap)
    region = img.crop(box) if (fx, fy) == (1, 1) else img.reduce((fx, fy), box=box)
    params[IN_H], params[IN_W] = region.height, region.width
    params[SRC_H], params[SRC_W] = lower - upper, right - left
    params[RED_H], params[RED_W] = fy, fx
    params[OUT_H], params[OUT_W] = out_h, out_w
    return np.asarray(region)  # (h, w, 3) uint8, PIL's own layout: rows copy fast into the batch


def _new_params():
    p = [0.0] * NUM_PARAMS
    p[RED_H] = p[RED_W] = 1
    p[OP] = -1
    p[FN0] = p[FN1] = p[FN2] = -1
    p[F0] = p[F1] = p[F2] = 1.0
    return p


class ThreeAugmentDraw:
    """Worker half of the ThreeAugment recipe: PIL RGB image -> (crop pixels (h, w, 3) uint8, params (NUM_PARAMS,)).

    Draws from torch's global generator (seeded per sample by seeding.SeededDataset, from the seed, the
    epoch and the sample's position in the epoch's order), in the CPU path's order: crop box (torchvision's own RandomResizedCrop.get_params, so the same area
    and ratio law and the centre-crop fallback after 10 failed tries), flip, one of three ops, the
    blur radius when blurring, then ColorJitter.get_params. The one-of choice uses torch's
    generator where torchvision's RandomChoice uses Python's: the same uniform law.
    """

    def __init__(self, input_size: int, color_jitter: float = 0.3, src: bool = False, hflip: float = 0.5,
                 reducing_gap=3.0):
        self.size, self.src, self.hflip, self.gap = input_size, src, hflip, reducing_gap
        # the CPU path's objects, kept for their parameter ranges and draws
        self.rrc = transforms.RandomResizedCrop(input_size, scale=(0.08, 1.0))
        self.jitter = transforms.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter else None

    def __call__(self, img):
        p, s = _new_params(), self.size
        if self.src:  # Resize(S), then RandomCrop(S, padding=4, reflect) on the resized image
            out_h, out_w = resized_size(img.height, img.width, s)
            p[TOP] = torch.randint(0, out_h + 8 - s + 1, size=(1,)).item() - 4
            p[LEFT] = torch.randint(0, out_w + 8 - s + 1, size=(1,)).item() - 4
            p[REFLECT] = 1
            box = (0, 0, img.width, img.height)
        else:
            i, j, h, w = self.rrc.get_params(img, self.rrc.scale, self.rrc.ratio)
            out_h = out_w = s
            box = (j, i, j + w, i + h)
        p[FLIP] = float(torch.rand(1).item() < self.hflip)
        p[OP] = torch.randint(0, 3, size=(1,)).item()
        if p[OP] == BLUR:
            p[RADIUS] = torch.empty(()).uniform_(0.1, 2.0).item()
        if self.jitter is not None:
            order, *factors = self.jitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                                     self.jitter.saturation, None)
            steps = [k for k in order.tolist() if k != 3]  # 3 is hue, which the recipe leaves off
            p[FN0:FN2 + 1] = steps
            p[F0:F2 + 1] = [factors[k] for k in steps]
        return _ship(img, box, out_h, out_w, self.gap, p), np.array(p)


class EvalResizeDraw:
    """Worker half of evaluation: the whole image, and where Resize(S / crop_ratio) + CenterCrop(S) puts it.

    Inputs of 32 px and less are not resized (as on the CPU path): the window is their centre.
    """

    def __init__(self, input_size: int, eval_crop_ratio: float = 0.875, reducing_gap=3.0):
        self.size, self.gap = input_size, reducing_gap
        self.short = int(input_size / eval_crop_ratio)

    def __call__(self, img):
        p, s = _new_params(), self.size
        out_h, out_w = (img.height, img.width) if s <= 32 else resized_size(img.height, img.width, self.short)
        # torchvision CenterCrop: round((n - S) / 2) (Python's round), or zero padding when n < S
        p[TOP], p[LEFT] = [int(round((n - s) / 2.0)) if n >= s else -((s - n) // 2) for n in (out_h, out_w)]
        return _ship(img, (0, 0, img.width, img.height), out_h, out_w, self.gap, p), np.array(p)


def collate(batch):
    """[((pixels (h, w, 3), params), target)] -> (rows (sum of h + 1, widest w, 3) uint8, params (B, NUM_PARAMS)
    float64, targets (B,) or (B, C) for per-image class masks): the workers' batch.

    Every crop's rows, one after the other, padded to the widest crop, and a last black row (for
    padding on the device). Padding each crop to the batch's largest instead would ship several
    times the bytes, and each byte costs twice on the host (shared memory, then pinned memory).
    """
    samples, targets = zip(*batch)
    pixels, params = zip(*samples)
    rows = np.zeros((sum(p.shape[0] for p in pixels) + 1, max(p.shape[1] for p in pixels), 3), np.uint8)
    start = 0
    for src in pixels:
        rows[start:start + src.shape[0], :src.shape[1]] = src
        start += src.shape[0]
    targets = torch.utils.data.default_collate(targets)  # class indices, or stacked class masks (ReaL)
    return torch.from_numpy(rows), torch.from_numpy(np.stack(params)), targets


# ---- device side: geometry ------------------------------------------------------------------------
def bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel: a = -0.5, support 2 (evaluated in the same order as PIL, in float64)."""
    x = x.abs()
    near = (1.5 * x - 2.5) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_matrix(in_len, extent, out_len, index, in_max: int, taps: int) -> torch.Tensor:
    """PIL's bicubic resampling of each sample's axis as a matrix (B, S, in_max), float32.

    in_len (B,): valid input pixels; extent (B,): the input length mapped onto out_len (B,) output
    pixels (in_len, or less after a worker-side reduce); index (B, S): which output pixels of that
    grid to produce (float64; outside [0, out_len) gives a zero row). Window, normalisation and the
    22-bit fixed-point rounding of the coefficients are PIL's; `taps` >= PIL's largest window.
    torch's interpolate(antialias=True) computes the same kernel but one output size per call.
    """
    scale = (extent / out_len)[:, None]  # (B, 1) input pixels per output pixel
    fscale = scale.clamp(min=1.0)  # shrinking widens the kernel (antialiasing)
    support = 2.0 * fscale
    center = (index + 0.5) * scale  # (B, S) in input pixels
    first = torch.floor(center - support + 0.5).clamp(min=0)
    stop = torch.minimum(torch.floor(center + support + 0.5), in_len[:, None])
    cols = first[..., None] + torch.arange(taps, dtype=torch.float64, device=index.device)  # (B, S, taps)
    w = bicubic((cols - center[..., None] + 0.5) * (1.0 / fscale)[..., None]) * (cols < stop[..., None])
    total = w.sum(-1, keepdim=True)
    w = torch.where(total != 0, w / total, w)
    w = torch.sign(w) * torch.floor(w.abs() * 2 ** PIL_BITS + 0.5) / 2 ** PIL_BITS
    w = w * ((index >= 0) & (index < out_len[:, None]))[..., None]
    dense = torch.zeros(*index.shape, in_max, dtype=torch.float32, device=index.device)
    return dense.scatter_add_(2, cols.long().clamp_(max=in_max - 1), w.float())


def pil_round(x: torch.Tensor) -> torch.Tensor:
    """PIL's rounding of a resampling pass into uint8 (half up, clipped), kept in float."""
    return torch.floor(x + 0.5).clamp_(0, 255)


def resample(pixels: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor, vertical_first: bool) -> torch.Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, S, S) float, integer-valued: two batched matmuls, rounded like PIL's passes."""
    n, height, width, _ = pixels.shape
    x = torch.empty(n, 3, height, width, device=pixels.device).copy_(pixels.permute(0, 3, 1, 2))
    wx_t = wx.transpose(1, 2)[:, None]  # (n, 1, W, S)
    wy = wy[:, None]  # (n, 1, S, H)
    if vertical_first:
        return pil_round(pil_round(wy @ x) @ wx_t)  # (n, 3, S, W) -> (n, 3, S, S)
    return pil_round(wy @ pil_round(x @ wx_t))  # (n, 3, H, S) -> (n, 3, S, S)


def vertical_first(src_h, src_w, out_h, out_w) -> np.ndarray:
    """Which of PIL's two resampling passes runs first (it rounds in between, so the order shows).

    Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
    pixels as the width; earlier Pillow always ran the horizontal pass first.
    """
    import PIL
    if int(PIL.__version__.split('.')[0]) < 13:
        return np.zeros(len(src_h), dtype=bool)
    drop = src_h - out_h
    return (drop > 0) & (drop > 2 * (src_w - out_w))


# ---- device side: blur ----------------------------------------------------------------------------
def box_blur_weights(radius: np.ndarray):
    """PIL's GaussianBlur(radius) is three box blurs of a fractional radius r = l + a each way
    (Gwosdek et al. 2011); returns per sample (l, ww, fw): weights, in units of 2**-24, of the
    2l + 1 taps around a pixel (ww each) and of the two taps just beyond (fw each).
    Float32 arithmetic where PIL's C code uses float, float64 where it uses double.
    """
    r = radius.astype(np.float32)
    sigma2 = r * r / np.float32(3)
    big_l = np.sqrt(12.0 * sigma2.astype(np.float64) + 1.0).astype(np.float32)
    l = np.floor((big_l.astype(np.float64) - 1.0) / 2.0).astype(np.float32)
    a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2)
    a = a / (6 * (sigma2 - (l + 1) * (l + 1)))
    fractional = (l + a).astype(np.float32)
    taps = fractional.astype(np.int64)
    ww = (np.float32(1 << 24) / (fractional * 2 + 1)).astype(np.int64)
    fw = ((1 << 24) - (taps * 2 + 1) * ww) // 2
    return taps, ww, fw


def to_device(array: np.ndarray, device) -> torch.Tensor:
    """A host array on `device` without the host waiting: on CUDA, copied from pinned memory with
    non_blocking (a pageable copy would wait for the device's queue to drain)."""
    tensor = torch.from_numpy(array)
    if torch.device(device).type != 'cuda':
        return tensor.to(device)
    if torch.cuda.is_available():  # (not under a fake CUDA device, which needs no pinned source)
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@contextlib.contextmanager
def full_float32():
    """float32 matmuls in full precision inside, whatever torch.set_float32_matmul_precision says
    outside (main.py's --tf32 sets 'high', which lets CUDA round their inputs to TF32 and would move
    resized pixels by several grey levels). The setting is process-wide: restored on the way out."""
    before = torch.get_float32_matmul_precision()
    if before == 'highest':
        yield
        return
    torch.set_float32_matmul_precision('highest')
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def blur_matrix(radius: np.ndarray, size: int, device) -> torch.Tensor:
    """(n, S, S): PIL's three box passes over one axis of an S-pixel line (edges repeat the last
    pixel) as one matrix. Applied to both axes it is PIL's GaussianBlur without PIL's rounding
    after each of its six passes."""
    taps, ww, fw = box_blur_weights(radius)
    reach = int(taps.max()) + 1
    dist = np.abs(np.arange(-reach, reach + 1))[None]  # (1, K)
    weight = np.where(dist <= taps[:, None], ww[:, None], np.where(dist == taps[:, None] + 1, fw[:, None], 0))
    weight = to_device((weight / 2 ** 24).astype(np.float32), device)  # (n, K)
    pixel = torch.arange(size, device=device)
    offsets = torch.arange(-reach, reach + 1, device=device)  # made on the device: no copy
    source = (pixel[None, :, None] + offsets[:, None, None]).clamp_(0, size - 1)
    shifts = (source == pixel).float()  # (K, S, S): output pixel i reads pixel clamp(i + offset)
    one_pass = torch.einsum('nk,kij->nij', weight, shifts)  # a matmul: deterministic, unlike a scatter-add
    return one_pass @ one_pass @ one_pass


# ---- device side: colour --------------------------------------------------------------------------
def pil_gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W): PIL's RGB -> L, (19595 R + 38470 G + 7471 B + 2**15) >> 16.
    torchvision's tensor grayscale uses other weights and truncates. Exact in float32 (sums < 2**24)."""
    return torch.floor((x[:, :1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:] * 7471 + 32768) / 65536)


def pil_blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance: degenerate + factor * (x - degenerate) in float32, clipped, truncated to an integer."""
    return (degenerate + factor * (x - degenerate)).clamp_(0, 255).trunc_()


def color_jitter(x: torch.Tensor, steps: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter on PIL images, per sample: steps (B, 3) in each sample's random order
    (brightness, contrast or saturation; -1 skips), factors (B, 3) float32.

    Each step blends with what PIL calls the degenerate image: black (brightness), the rounded mean
    of the grayscale image (contrast) or the grayscale image (saturation).
    """
    area = x.shape[-1] * x.shape[-2]
    for t in range(steps.shape[1]):
        step = steps[:, t, None, None, None]  # (B, 1, 1, 1)
        gray = pil_gray(x)
        mean = torch.floor(gray.sum((2, 3), keepdim=True, dtype=torch.float64) / area + 0.5).float()
        degenerate = torch.where(step == CONTRAST, mean, torch.where(step == SATURATION, gray, 0.0))
        x = pil_blend(degenerate, x, factors[:, t, None, None, None])  # factor 1 (no step) keeps x exactly
    return x


# ---- the device stage and the loader around it ----------------------------------------------------
class DeviceAugment:
    """(rows uint8 on the device, params (B, NUM_PARAMS) on the CPU), as collate makes them, -> (B, 3, S, S)
    float32, normalised: the device half of the recipe (or of evaluation: the params say which).

    What depends on the parameters' values (pass-order groups, kernel widths, who blurs) is decided
    on the host from the CPU copy, so nothing waits for the device: the constants stay on the device,
    and host arrays go over from pinned memory without blocking (`to_device`). The matmuls run in full
    float32 whatever the model's --tf32 says (`full_float32`). With `compile`, the pixel-wise
    rest (grayscale, solarize, jitter, normalisation: some 40 elementwise passes over the batch in
    eager mode) is fused by torch.compile; the function it compiles is the plain one below.
    """

    def __init__(self, input_size: int, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, compile: bool = False):
        self.size = input_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.on_device = {}  # device -> (mean, std) there, copied once
        self.finish = torch.compile(finish, dynamic=None) if compile else finish

    def constants(self, device: torch.device):
        """(mean, std) on `device`, copied there on the first call only."""
        if device not in self.on_device:
            self.on_device[device] = (to_device(self.mean.numpy(), device), to_device(self.std.numpy(), device))
        return self.on_device[device]

    def __call__(self, rows: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        device = rows.device
        with full_float32():
            p = params.to(device, non_blocking=True)  # pinned by the DataLoader (pin_memory) on CUDA
            host = params.numpy()
            x = self.geometry(rows, p, host)
            mean, std = self.constants(device)
            return self.finish(x, p[:, OP], p[:, FN0:FN2 + 1], p[:, F0:F2 + 1].float(), mean, std,
                               one_of=bool((host[:, OP] >= 0).any()), jitter=bool((host[:, FN0:FN2 + 1] >= 0).any()))

    def geometry(self, rows: torch.Tensor, p: torch.Tensor, host: np.ndarray) -> torch.Tensor:
        """Crop window, resize, flip and blur of every sample, in one group per PIL pass order."""
        s, device = self.size, rows.device
        steps = torch.arange(s, dtype=torch.float64, device=device)
        first_row = p[:, IN_H].cumsum(0) - p[:, IN_H]  # where each crop's rows start
        grid_y = p[:, TOP, None] + steps  # (B, S): which rows of the resized grid the output shows
        flip = p[:, FLIP, None] > 0
        grid_x = p[:, LEFT, None] + torch.where(flip, s - 1 - steps, steps)  # a flip reads the window backwards
        grid_y, grid_x = (torch.where(p[:, REFLECT, None] > 0, _reflect(idx, p[:, n, None]), idx)
                          for idx, n in ((grid_y, OUT_H), (grid_x, OUT_W)))
        order = vertical_first(host[:, SRC_H], host[:, SRC_W], host[:, OUT_H], host[:, OUT_W])
        out = torch.empty(len(host), 3, s, s, device=device)
        for first in (False, True):
            group = np.flatnonzero(order == first)
            if len(group) == 0:
                continue
            g = host[group]
            height, width = int(g[:, IN_H].max()), int(g[:, IN_W].max())
            idx = to_device(group, device)
            q = p[idx]
            wy = resample_matrix(q[:, IN_H], q[:, SRC_H] / q[:, RED_H], q[:, OUT_H], grid_y[idx], height,
                                 _taps(g[:, SRC_H] / g[:, RED_H] / g[:, OUT_H]))
            wx = resample_matrix(q[:, IN_W], q[:, SRC_W] / q[:, RED_W], q[:, OUT_W], grid_x[idx], width,
                                 _taps(g[:, SRC_W] / g[:, RED_W] / g[:, OUT_W]))
            blurred = np.flatnonzero(g[:, OP] == BLUR)
            if len(blurred):  # blur after resize and flip = blur matrix times the resize matrix
                b = to_device(blurred, device)
                kernel = blur_matrix(g[blurred, RADIUS], s, device)
                wy[b], wx[b] = kernel @ wy[b], kernel @ wx[b]
            # (n, height, width, 3): each crop's rows, then the black last row
            y = torch.arange(height, dtype=torch.float64, device=device)
            take = torch.where(y < q[:, IN_H, None], first_row[idx, None] + y, len(rows) - 1).long()
            x = resample(rows[:, :width][take], wy, wx, first)
            if len(group) == len(host):
                return x
            out[idx] = x
        return out


def _taps(scale: np.ndarray) -> int:
    """PIL's largest bicubic window (ksize) for these input/output ratios."""
    return int(math.ceil(2.0 * max(float(scale.max()), 1.0))) * 2 + 1


def finish(x, op, steps, factors, mean, std, one_of: bool, jitter: bool) -> torch.Tensor:
    """Resized (B, 3, S, S) integer-valued pixels -> the model's input: the one-of choice's grayscale
    or solarize (op (B,); blur was folded into the resize), colour jitter when `jitter`, then
    ToTensor + Normalize as the same float32 operations."""
    if one_of:
        op = op[:, None, None, None]
        x = torch.where(op == GRAY, pil_gray(x).expand_as(x), x)
        x = torch.where((op == SOLARIZE) & (x >= 128), 255 - x, x)  # PIL's solarize at 128
    if jitter:
        x = color_jitter(x, steps, factors)
    return x.div(255).sub_(mean).div_(std)


def _reflect(index: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """numpy's 'reflect' padding (-1 -> 1, n -> n - 2) of grid indices."""
    index = torch.where(index < 0, -index, index)
    return torch.where(index > n - 1, 2 * (n - 1) - index, index)


class DeviceLoader:
    """A DataLoader of (pixels, params, targets) that yields ready (images, targets) on `device`.

    train_one_epoch / evaluate see an ordinary loader: len, batch_size, sampler and dataset pass
    through. On CUDA the next batch's copy and augmentation are queued on a side stream while the
    current batch trains (pinned memory, non-blocking copies), so they overlap the step.
    """

    def __init__(self, loader, augment: DeviceAugment, device):
        self.loader, self.augment, self.device = loader, augment, torch.device(device)

    def __len__(self):
        return len(self.loader)

    @property
    def batch_size(self):
        return self.loader.batch_size

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset

    def _ready(self, batch):
        pixels, params, targets = batch
        images = self.augment(pixels.to(self.device, non_blocking=True), params)
        return images, targets.to(self.device, non_blocking=True)

    def __iter__(self):
        if self.device.type != 'cuda':
            for batch in self.loader:
                yield self._ready(batch)
            return
        side = torch.cuda.Stream(self.device)
        pending = None
        for batch in self.loader:
            with torch.cuda.stream(side):
                ready = self._ready(batch)
                done = side.record_event()
            if pending is not None:
                yield self._hand_over(*pending)
            pending = ready, done
        if pending is not None:
            yield self._hand_over(*pending)

    def _hand_over(self, ready, done):
        """Make the consuming stream wait for the batch, and keep its memory until that stream is through."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        for t in ready:
            t.record_stream(current)
        return ready


def worker_transform(is_train: bool, args):
    """The DataLoader workers' half for main.py's settings."""
    if is_train:
        return ThreeAugmentDraw(args.input_size, args.color_jitter, args.src, args.hflip)
    return EvalResizeDraw(args.input_size, args.eval_crop_ratio)
