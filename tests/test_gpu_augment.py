"""The device pipeline (gpu_augment.py) against the CPU path (PIL through torchvision), on CPU.

Pixels: given the same parameters, the device path gives the CPU path's pixels (resize within one
grey level, flip / grayscale / solarize / jitter / normalisation exactly, blur within a few levels).
Statistics: the parameters it draws follow the CPU path's laws.
"""
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import stats
from torchvision import transforms
from torchvision.transforms import functional as F

import gpu_augment as ga
from datasets import build_transform
from photos import photo_arrays, photo_crop
from tinyrun import parse

MEAN = torch.tensor(ga.IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(ga.IMAGENET_DEFAULT_STD).view(3, 1, 1)
JITTER = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)


@pytest.fixture(scope='module')
def photos():
    return photo_arrays()  # two (427, 640, 3) uint8 photos


def levels(x):
    """Normalised (..., 3, H, W) -> 0..255 grey levels."""
    return x * STD * 255 + MEAN * 255


def run_device(samples, size):
    """[(pixels, params)] through collate and DeviceAugment -> (B, 3, S, S) normalised."""
    pixels, params, _ = ga.collate([(s, 0) for s in samples])
    return ga.DeviceAugment(size)(pixels, params)


def params_for(img, size, **fields):
    """A parameter row: `img` resized whole to size x size, plus the given fields (e.g. FLIP=1)."""
    p = ga._new_params()
    p[ga.IN_H] = p[ga.SRC_H] = img.height
    p[ga.IN_W] = p[ga.SRC_W] = img.width
    p[ga.OUT_H] = p[ga.OUT_W] = size
    for name, value in fields.items():
        p[getattr(ga, name)] = value
    return np.asarray(img), np.array(p)


def replay_cpu(img, p, size):
    """The CPU path's ops (torchvision on PIL) with the parameters in row `p`, on the crop `img`."""
    out = img.resize((size, size), Image.BICUBIC)
    if p[ga.FLIP]:
        out = F.hflip(out)
    op = int(p[ga.OP])
    if op == ga.GRAY:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    elif op == ga.SOLARIZE:
        out = F.solarize(out, 128)
    elif op == ga.BLUR:
        out = out.filter(ImageFilter.GaussianBlur(float(p[ga.RADIUS])))
    for t in range(3):
        if p[ga.FN0 + t] >= 0:
            out = JITTER[int(p[ga.FN0 + t])](out, float(p[ga.F0 + t]))
    return F.normalize(F.to_tensor(out), ga.IMAGENET_DEFAULT_MEAN, ga.IMAGENET_DEFAULT_STD)


# ---- pixels, given the same parameters ----------------------------------------------------------
def test_resize_matches_pil_bicubic(photos):
    """Crops of photos and of noise, shrunk and enlarged, both PIL pass orders, one padded batch."""
    rng = np.random.default_rng(0)
    size = 48
    imgs = [photo_crop(photos, rng, 5, 400) for _ in range(24)]
    imgs += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((7, 90), (90, 7), (300, 60))]
    samples = [params_for(img, size) for img in imgs]
    order = ga.vertical_first(*np.stack([p for _, p in samples])[:, [ga.SRC_H, ga.SRC_W, ga.OUT_H, ga.OUT_W]].T)
    assert 0 < order.sum() < len(order)  # both groups are exercised
    out = levels(run_device(samples, size))
    for img, got in zip(imgs, out):
        want = F.pil_to_tensor(img.resize((size, size), Image.BICUBIC)).float()
        diff = (got - want).abs()
        assert diff.max() <= 1.0 + 1e-3 and diff.mean() < 0.02, (img.size, diff.max(), diff.mean())


def test_flip_grayscale_solarize_are_exact(photos):
    rng = np.random.default_rng(1)
    size = 40
    imgs = [photo_crop(photos, rng, size, size + 1) for _ in range(6)]  # already size x size: no resize
    ops = [dict(OP=ga.GRAY), dict(OP=ga.SOLARIZE), dict(FLIP=1), dict(OP=ga.GRAY, FLIP=1),
           dict(OP=ga.SOLARIZE, FLIP=1), dict()]
    samples = [params_for(img, size, **kw) for img, kw in zip(imgs, ops)]
    out = run_device(samples, size)
    for img, (_, p), got in zip(imgs, samples, out):
        assert torch.equal(got, replay_cpu(img, p.tolist(), size))


def test_color_jitter_is_torchvisions_on_pil_in_every_order(photos):
    rng = np.random.default_rng(2)
    size = 32
    samples, imgs = [], []
    for order in [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]:
        img = photo_crop(photos, rng, size, size + 1)
        factors = rng.uniform(0.7, 1.3, size=3)
        samples.append(params_for(img, size, FN0=order[0], FN1=order[1], FN2=order[2],
                                  F0=factors[0], F1=factors[1], F2=factors[2]))
        imgs.append(img)
    out = run_device(samples, size)
    for img, (_, p), got in zip(imgs, samples, out):
        assert torch.equal(got, replay_cpu(img, p.tolist(), size))


@pytest.mark.parametrize('radius', [0.1, 0.4, 0.9, 1.5, 2.0])
def test_blur_is_close_to_pils_gaussian_blur(photos, radius):
    """PIL blurs with six rounded box passes, the device with one linear map: a few levels apart."""
    rng = np.random.default_rng(3)
    size = 64
    imgs = [photo_crop(photos, rng, size, size + 1) for _ in range(3)]
    samples = [params_for(img, size, OP=ga.BLUR, RADIUS=radius) for img in imgs]
    out = levels(run_device(samples, size))
    for img, got in zip(imgs, out):
        want = F.pil_to_tensor(img.filter(ImageFilter.GaussianBlur(radius))).float()
        diff = (got - want).abs()
        assert diff.max() <= 4.01 and diff.mean() < 0.75, (diff.max(), diff.mean())
        if radius >= 0.9:  # and it does blur: closer to PIL's blur than to the sharp image
            assert diff.mean() < (got - F.pil_to_tensor(img).float()).abs().mean()


def test_box_blur_weights_are_pils():
    """The box radius and fixed-point weights of PIL's GaussianBlur (a blurred delta shows them)."""
    taps, ww, fw = ga.box_blur_weights(np.array([0.1, 1.0, 2.0]))
    assert taps.tolist() == [0, 0, 1]
    assert ((2 * taps + 1) * ww + 2 * fw <= 1 << 24).all() and ((2 * taps + 1) * ww + 2 * fw >= (1 << 24) - 2).all()
    line = np.zeros((1, 31), np.uint8)
    line[0, 15] = 255
    img = Image.fromarray(line).filter(ImageFilter.GaussianBlur((2.0, 0)))  # horizontal passes only
    kernel = ga.blur_matrix(np.array([2.0]), 31, 'cpu')[0, 15] * 255  # one output pixel's weights
    assert np.abs(np.asarray(img, np.float64)[0] - kernel.numpy()).max() <= 1.0


def test_whole_recipe_matches_the_cpu_path_given_its_parameters(photos):
    """ThreeAugmentDraw's crops and parameters through the device, against torchvision's ops on PIL
    replayed with the same parameters: exact up to the resize's one level, except blur (close)."""
    rng = np.random.default_rng(4)
    torch.manual_seed(0)
    size = 48
    draw = ga.ThreeAugmentDraw(size, color_jitter=0.3, reducing_gap=None)
    samples = [draw(photo_crop(photos, rng, 150, 420)) for _ in range(30)]
    out = run_device(samples, size)
    for (pixels, p), got in zip(samples, out):
        want = replay_cpu(Image.fromarray(pixels), p.tolist(), size)
        diff = (levels(got) - levels(want)).abs()
        if p[ga.OP] == ga.BLUR:  # a few levels, grown through the jitter's factors
            assert diff.max() <= 9.01 and diff.mean() < 1.0
        else:  # the resize's one level may grow through the jitter's factors (<= 1.3 each)
            assert diff.max() <= 3.01 and diff.mean() < 0.05


def test_src_crop_matches_resize_and_reflect_padded_random_crop(photos):
    """--src: Resize(S) then RandomCrop(S, padding=4, reflect), replayed on PIL at the drawn offsets."""
    rng = np.random.default_rng(5)
    torch.manual_seed(1)
    size = 32
    draw = ga.ThreeAugmentDraw(size, color_jitter=0.0, src=True, hflip=0.0, reducing_gap=None)
    imgs = [photo_crop(photos, rng, 30, 200) for _ in range(12)]
    samples = [draw(img) for img in imgs]
    for (_, p), img in zip(samples, imgs):
        p[ga.OP] = -1  # geometry only
        resized = F.resize(img, size, interpolation=transforms.InterpolationMode.BICUBIC)
        padded = F.pad(resized, 4, padding_mode='reflect')
        top, left = int(p[ga.TOP]) + 4, int(p[ga.LEFT]) + 4
        assert 0 <= top <= padded.height - size and 0 <= left <= padded.width - size
        want = F.pil_to_tensor(F.crop(padded, top, left, size, size)).float()
        got = levels(run_device([(np.asarray(img), p)], size))[0]
        assert (got - want).abs().max() <= 1.0 + 1e-3


@pytest.mark.parametrize('ratio', [0.875, 1.0])
def test_eval_resize_and_centre_crop_match_the_cpu_transform(photos, ratio):
    rng = np.random.default_rng(6)
    size = 64
    args = parse(['--input-size', size, '--eval-crop-ratio', ratio])
    cpu = build_transform(False, args)
    draw = ga.EvalResizeDraw(size, ratio, reducing_gap=None)  # the reduce of large images: next test
    imgs = [photo_crop(photos, rng, 40, 420) for _ in range(10)] + [photo_crop(photos, rng, 64, 65)]
    got = levels(run_device([draw(img) for img in imgs], size))
    for img, g in zip(imgs, got):
        assert (g - levels(cpu(img))).abs().max() <= 1.0 + 1e-3


def test_eval_of_small_inputs_is_not_resized():
    """At 32 px and less the CPU path only normalises; so does the device (a centre window)."""
    rng = np.random.default_rng(7)
    img = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    args = parse(['--input-size', 32])
    got = run_device([ga.worker_transform(False, args)(img)], 32)[0]
    assert torch.equal(got, build_transform(False, args)(img))


def test_worker_reduce_bounds_the_pixels_and_stays_close(photos):
    """A region much larger than the output is shrunk by an integer factor in the worker (Pillow's
    reducing_gap rule), so a batch is never padded to a huge photo; the result stays close."""
    big = Image.fromarray(np.concatenate([photos[0], photos[1]], axis=1))  # 427 x 1280
    size = 40
    draw = ga.EvalResizeDraw(size, 1.0, reducing_gap=3.0)  # resized to 40 x 119: 3x reduce keeps >= 3x that
    pixels, p = draw(big)
    assert (p[ga.RED_H], p[ga.RED_W]) == (3, 3) and pixels.shape == (143, 427, 3)
    exact = ga.EvalResizeDraw(size, 1.0, reducing_gap=None)(big)
    a, b = levels(run_device([(pixels, p), exact], size))
    assert (a - b).abs().mean() < 0.5 and (a - b).abs().max() <= 8


def test_compiled_pixelwise_steps_equal_eager():
    """--compile fuses grayscale, solarize, jitter and normalisation; the result stays the same."""
    torch.manual_seed(0)
    n = 6
    x = torch.randint(0, 256, (n, 3, 16, 16)).float()
    op = torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.float64)
    steps = torch.stack([torch.randperm(3) for _ in range(n)]).double()
    factors = torch.empty(n, 3).uniform_(0.7, 1.3)
    aug = ga.DeviceAugment(16, compile=True)
    args = (op, steps, factors, aug.mean, aug.std)
    want = ga.finish(x.clone(), *args, one_of=True, jitter=True)
    assert (aug.finish(x.clone(), *args, one_of=True, jitter=True) - want).abs().max() < 1e-5


# ---- the parameters follow the CPU path's laws ---------------------------------------------------
def test_crop_area_and_ratio_follow_random_resized_crop():
    """Area fraction and log aspect ratio against torchvision's sampler (two-sample KS tests), and
    their ranges [0.08, 1] and [ln 3/4, ln 4/3] (up to the rounding of the box to whole pixels)."""
    torch.manual_seed(0)
    draw = ga.ThreeAugmentDraw(16, color_jitter=0.0)
    sizes = [(120, 90), (90, 120), (100, 100), (64, 200)]
    ours, theirs = [], []
    for k in range(2400):
        h, w = sizes[k % len(sizes)]
        img = Image.new('RGB', (w, h))
        _, p = draw(img)
        ours.append((p[ga.SRC_H] * p[ga.SRC_W] / (h * w), math.log(p[ga.SRC_W] / p[ga.SRC_H])))
        i, j, ch, cw = transforms.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        theirs.append((ch * cw / (h * w), math.log(cw / ch)))
    ours, theirs = np.array(ours), np.array(theirs)
    for col in range(2):
        assert stats.ks_2samp(ours[:, col], theirs[:, col]).pvalue > 1e-3
    assert 0.07 < ours[:, 0].min() and ours[:, 0].max() <= 1.0
    slack = 0.05  # whole pixels
    assert math.log(3 / 4) - slack < ours[:, 1].min() and ours[:, 1].max() < math.log(4 / 3) + slack


def test_crop_falls_back_to_the_centre_like_torchvision():
    """No box of area >= 8% with ratio in [3/4, 4/3] fits a 1000 x 10 strip: after 10 tries,
    torchvision takes the centred box of the extreme ratio; so do the workers."""
    torch.manual_seed(0)
    _, p = ga.ThreeAugmentDraw(16)(Image.new('RGB', (1000, 10)))
    assert (p[ga.SRC_H], p[ga.SRC_W]) == (10, 13)  # h = 10, w = round(10 * 4 / 3)
    ramp = np.tile(np.arange(1000) % 256, (10, 1)).astype(np.uint8)  # column index
    pixels, _ = ga.ThreeAugmentDraw(16)(Image.fromarray(ramp).convert('RGB'))
    assert pixels[0, 0, 0] == (1000 - 13) // 2 % 256  # the crop starts at the centre


def test_flip_one_of_blur_and_jitter_draws():
    torch.manual_seed(0)
    n = 3000
    draw = ga.ThreeAugmentDraw(8, color_jitter=0.3)
    rows = np.stack([draw(Image.new('RGB', (12, 12)))[1] for _ in range(n)])
    flips = rows[:, ga.FLIP].sum()
    assert abs(flips - n / 2) < 4 * math.sqrt(n / 4)  # within 4 standard deviations
    counts = np.bincount(rows[:, ga.OP].astype(int), minlength=3)
    assert stats.chisquare(counts).pvalue > 1e-3 and len(counts) == 3  # uniform one-of choice
    radius = rows[rows[:, ga.OP] == ga.BLUR, ga.RADIUS]
    assert 0.1 <= radius.min() and radius.max() <= 2.0
    assert stats.kstest(radius, stats.uniform(0.1, 1.9).cdf).pvalue > 1e-3
    assert (rows[rows[:, ga.OP] != ga.BLUR, ga.RADIUS] == 0).all()
    factors = rows[:, ga.F0:ga.F2 + 1]
    assert 0.7 <= factors.min() and factors.max() <= 1.3
    steps = rows[:, ga.FN0:ga.FN2 + 1].astype(int)
    assert (np.sort(steps, axis=1) == [0, 1, 2]).all()  # each step once, hue never
    perms = np.unique(steps, axis=0, return_counts=True)[1]
    assert len(perms) == 6 and stats.chisquare(perms).pvalue > 1e-3  # random order, uniform
    by_kind = [factors[steps == k] for k in range(3)]  # brightness, contrast, saturation factors
    assert all(stats.kstest(f, stats.uniform(0.7, 0.6).cdf).pvalue > 1e-3 for f in by_kind)


def test_draws_come_from_torchs_seeded_generator():
    """Same seed, same parameters and crops: what makes a run (and --resume) reproducible."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    draw = ga.ThreeAugmentDraw(16)

    def run():
        torch.manual_seed(5)
        return [draw(img) for _ in range(5)]

    for (a, pa), (b, pb) in zip(run(), run()):
        assert np.array_equal(a, b) and np.array_equal(pa, pb)


# ---- the pieces around ---------------------------------------------------------------------------
def test_collate_stacks_the_rows_of_the_crops():
    samples = [(np.full((h, w, 3), v, np.uint8), np.array([float(h)])) for h, w, v in ((5, 9, 7), (8, 4, 9))]
    rows, params, targets = ga.collate([(s, t) for s, t in zip(samples, (3, 4))])
    assert rows.shape == (5 + 8 + 1, 9, 3) and rows.dtype == torch.uint8  # rows padded to the widest crop only
    assert rows[:5].eq(7).all() and rows[5:13, :4].eq(9).all() and rows[5:13, 4:].eq(0).all() and rows[13].eq(0).all()
    assert params.dtype == torch.float64 and params.tolist() == [[5.0], [8.0]] and targets.tolist() == [3, 4]


def test_worker_halves_pickle_for_dataloader_workers():
    args = parse(['--input-size', 16, '--ThreeAugment'])
    for is_train in (True, False):
        draw = pickle.loads(pickle.dumps(ga.worker_transform(is_train, args)))
        pixels, p = draw(Image.new('RGB', (20, 30)))
        assert pixels.dtype == np.uint8 and pixels.shape[2] == 3 and p.shape == (ga.NUM_PARAMS,)


def test_device_loader_yields_ready_batches_and_passes_the_loader_through():
    data = [(params_for(Image.new('RGB', (12, 10)), 8), k)
            for k in range(5)]
    sampler = torch.utils.data.SequentialSampler(data)
    inner = torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler, collate_fn=ga.collate)
    loader = ga.DeviceLoader(inner, ga.DeviceAugment(8), 'cpu')
    assert len(loader) == 3 and loader.batch_size == 2 and loader.sampler is sampler and loader.dataset is data
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)]
    assert [b[1].tolist() for b in batches] == [[0, 1], [2, 3], [4]]
    black = (0 - MEAN) / STD  # black pixels, normalised
    assert all(torch.allclose(b[0], black.expand_as(b[0])) for b in batches)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_device_loader_on_cuda_matches_cpu(photos):
    """The side-stream hand-over on CUDA gives the CPU result (up to float32 matmul rounding)."""
    rng = np.random.default_rng(8)
    torch.manual_seed(0)
    draw = ga.ThreeAugmentDraw(32)
    data = [(draw(photo_crop(photos, rng, 40, 300)), k) for k in range(16)]
    inner = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=ga.collate, pin_memory=True)
    cpu = list(ga.DeviceLoader(inner, ga.DeviceAugment(32), 'cpu'))
    cuda = list(ga.DeviceLoader(inner, ga.DeviceAugment(32), 'cuda'))
    for (a, ta), (b, tb) in zip(cpu, cuda):
        assert b.is_cuda and torch.equal(ta, tb.cpu())
        assert (levels(a) - levels(b.cpu())).abs().max() <= 2.01


# ---- main.py ---------------------------------------------------------------------------------------
def test_data_pipeline_choice():
    import main
    cpu, cuda = torch.device('cpu'), torch.device('cuda')  # a device object: no CUDA needed to ask
    assert main.data_pipeline(parse(['--ThreeAugment']), cuda) == 'gpu'  # auto: the pretraining recipe on CUDA
    assert main.data_pipeline(parse(['--ThreeAugment']), cpu) == 'cpu'
    assert main.data_pipeline(parse([]), cuda) == 'cpu'  # RandAugment fine-tuning
    assert main.data_pipeline(parse(['--ThreeAugment', '--data-pipeline', 'cpu']), cuda) == 'cpu'
    assert main.data_pipeline(parse(['--eval', '--data-pipeline', 'gpu']), cpu) == 'gpu'
    with pytest.raises(main.ConfigError, match='--ThreeAugment'):
        main.data_pipeline(parse(['--data-pipeline', 'gpu']), cpu)


def test_gpu_pipeline_without_threeaugment_is_a_one_line_error(tmp_path, capsys):
    import main
    from tinyrun import TINY, make_image_folder
    rc = main.cli([str(a) for a in TINY + ['--data-path', make_image_folder(tmp_path), '--data-pipeline', 'gpu']])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith('error: ') and err.count('\n') == 1 and '--ThreeAugment' in err


@pytest.mark.parametrize('kind', ['digits', 'photos'])
def test_eval_top1_is_the_cpu_paths(kind, tmp_path):
    """main.py's val loaders, cpu and gpu, under one model: the same top-1 on real images (digits
    upscaled to 64 px PNGs at 48; photo crops of 200..500 px, JPEG / grayscale / CMYK / PNG, at 64)."""
    import sys

    import main
    from engine import evaluate
    from tinyrun import REPO, one_thread
    sys.path.insert(0, str(REPO / 'scripts'))
    import make_photo_folder
    import prepare_digits
    root = tmp_path / kind
    if kind == 'digits':
        prepare_digits.main(['--out', str(root), '--size', '64'])
        size, classes = 48, 10
    else:
        make_photo_folder.main(['--out', str(root), '--train', '4', '--val', '60', '--odd', '0.2'])
        size, classes = 64, 4
    torch.manual_seed(0)
    # a random convolution sees every pixel (an untrained ViT's class token barely depends on the image)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.GELU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * (size // 4) ** 2, classes)).eval()
    cpu = torch.device('cpu')
    results = {}
    with one_thread(), torch.no_grad():
        for pipeline in ('cpu', 'gpu'):
            args = parse(['--data-set', 'FOLDER', '--data-path', root, '--input-size', size, '--eval',
                          '--num_workers', 0, '--batch-size', 32, '--device', 'cpu', '--data-pipeline', pipeline])
            _, loader, n, _ = main.build_loaders(args, cpu)
            logits = torch.cat([model(x) for x, _ in loader])
            results[pipeline] = logits, evaluate(loader, model, cpu)
    (a, stats_a), (b, stats_b) = results['cpu'], results['gpu']
    assert len(a.argmax(1).unique()) > 1  # the model tells images apart
    assert stats_a['n'] == stats_b['n'] == n and stats_a['acc1'] == stats_b['acc1']
    assert (a.argmax(1) == b.argmax(1)).all() and (a - b).abs().max() < 0.05
