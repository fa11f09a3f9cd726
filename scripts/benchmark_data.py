"""Images per second of the data pipelines: per CPU core, through DataLoaders, and feeding a training step.

    python scripts/make_photo_folder.py --out runs/photos --train 5000 --val 500
    python scripts/benchmark_data.py --data runs/photos --workers 1 2 4 8 --json data.json
    python scripts/benchmark_data.py --data runs/photos --workers 14 --model vit5_small --compile   # on a GPU
    python scripts/make_shards.py --src runs/photos --out runs/photo-shards
    python scripts/benchmark_data.py --data runs/photos --shards runs/photo-shards --workers 1 --skip per_core loaders

Four measurements, each optional:
  per core  one process, one thread, the stages of one image: decode alone (PIL, as the loaders
            read), decode + the CPU path's ThreeAugment recipe, decode + its eval transform, decode +
            the gpu pipeline's worker half (draw, crop, uint8 pixels; train and eval), and the gpu
            pipeline's device half on --device (per image, whole batches); also the KB per image a
            batch carries from the workers on each path and the device half's matmul GFLOPs per image.
  loaders   the training loader alone at each --workers count, batches of --batch-size drawn at
            random (with replacement) from DATA/train: the CPU path; the gpu path's workers alone
            (batches of crop pixels as they reach the main process); the gpu path end to end
            (batches ready, normalised, on --device).
  storage   with --shards (the same images as shards, from make_shards.py): the training loader at
            each --workers count (>= 1) reading one epoch of the folder, then of the shards (main.py's
            --data-set WDS stream), each image once: the bytes alone (a loader whose images are decoded elsewhere, e.g. on the GPU),
            the CPU path, the gpu path's workers; without, then with every file open taking
            --open-delay ms of its worker's time, as a network filesystem's round trip would (a
            folder opens each image, a shard stream each shard). Rates are images per CPU second of
            the worker processes (img/s per core on an otherwise idle machine; the delay is a spin
            on the worker's CPU clock, so it counts in full whatever else the machine runs).
            --rounds rounds, folder and shards alternating; medians of rates and per-round ratios.
  training  with --model: training steps (bf16 autocast on CUDA, mixup/cutmix, BCE, LAMB) fed by
            one synthetic batch kept on the device, then by each loader; img/s and the ratio to synthetic.
Files are read through the page cache (warmed first): the numbers are CPU and device costs, plus the
simulated latency.
"""
import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from common import Parser, fail

def get_args_parser():
    p = Parser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', required=True, help='an ImageFolder with train/ (and val/), e.g. from make_photo_folder.py')
    p.add_argument('--input-size', type=int, default=224, help='image side the pipelines produce (default 224)')
    p.add_argument('--batch-size', type=int, default=128, help='per loader batch (default 128)')
    p.add_argument('--workers', type=int, nargs='+', default=[1, 2], help='DataLoader worker counts to measure')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help="where the gpu pipeline's augmentation and the training steps run (default: cuda when present)")
    p.add_argument('--images', type=int, default=200, help='images per stage and round in the per-core measurement')
    p.add_argument('--rounds', type=int, default=3, help='per-core rounds, stages alternating; medians are reported')
    p.add_argument('--batches', type=int, default=10, help='timed batches per loader (and training) measurement')
    p.add_argument('--warmup', type=int, default=2, help='untimed batches first (worker start-up, compilation)')
    p.add_argument('--skip', nargs='*', default=[], choices=('per_core', 'loaders', 'storage'),
                   help='measurements to leave out')
    p.add_argument('--shards', default=None, help='the same images as WebDataset shards (make_shards.py --src DATA): '
                                                  'measure folder against shards')
    p.add_argument('--open-delay', type=float, default=2.0, help='simulated latency per file open in ms (default 2)')
    p.add_argument('--model', default=None, help='also time training steps of this timm model (e.g. vit5_small)')
    p.add_argument('--compile', action='store_true',
                   help="torch.compile the gpu pipeline's pixel-wise steps (as main.py --compile does) and the model")
    p.add_argument('--seed', type=int, default=0, help='seed of the random crops and parameters')
    p.add_argument('--json', default=None, help='also write the results to this file')
    return p


def parse_args(argv=None):
    p = get_args_parser()
    args = p.parse_args(argv)
    if min(args.workers) < 0 or args.input_size < 8 or args.batch_size < 2 or min(args.images, args.batches,
                                                                                     args.rounds) < 1:
        p.error('--workers must be >= 0, --input-size >= 8, --batch-size >= 2, --images, --batches and '
                '--rounds >= 1')
    if args.open_delay < 0:
        p.error(f'--open-delay must be >= 0, got {args.open_delay}')
    return args


def recipe_args(args):
    """main.py's settings for the released pretraining recipe at --input-size (the same transforms)."""
    import main
    return main.get_args_parser().parse_args(['--input-size', str(args.input_size), '--ThreeAugment',
                                              '--data-set', 'FOLDER', '--data-path', args.data,
                                              '--eval-crop-ratio', '1.0'])


def per_core(args, files, device):
    """img/s of each stage on one thread of this process (each stage decodes too), and its speed
    relative to the CPU path's recipe. Stages alternate within a round, so load from other processes
    hits them alike; medians over rounds (of the rates, and of the per-round ratios) are reported."""
    import gpu_augment
    from datasets import build_transform, load_image
    settings = recipe_args(args)
    stages = dict(decode=lambda img: img, cpu_recipe=build_transform(True, settings),
                  cpu_eval=build_transform(False, settings), gpu_worker=gpu_augment.worker_transform(True, settings),
                  gpu_worker_eval=gpu_augment.worker_transform(False, settings))
    files = files[:args.images]
    for f in files:  # warm the page cache: what follows is CPU time
        Path(f).read_bytes()
    draw = stages['gpu_worker']
    batch = gpu_augment.collate([(draw(load_image(f)), 0) for f in files[:args.batch_size]])
    pixels, params = batch[0].to(device), batch[1]
    augment = gpu_augment.DeviceAugment(args.input_size, compile=args.compile)
    augment(pixels, params)  # warm-up (and compilation)
    rounds = {name: [] for name in (*stages, 'device_stage')}
    for _ in range(args.rounds):
        for name, fn in stages.items():
            start = time.perf_counter()
            for f in files:
                fn(load_image(f))
            rounds[name].append(len(files) / (time.perf_counter() - start))
        synchronize(device)
        start = time.perf_counter()
        augment(pixels, params)
        synchronize(device)
        rounds['device_stage'].append(len(params) / (time.perf_counter() - start))
    # what a batch costs besides time: bytes per image from the workers, matmul GFLOPs per image on the device
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        augment(pixels, params)
    cost = dict(cpu_kb_per_img=3 * args.input_size ** 2 * 4 / 1024,  # float32 (3, S, S)
                gpu_kb_per_img=batch[0].numel() / len(params) / 1024,
                device_gflop_per_img=counter.get_total_flops() / len(params) / 1e9)
    rates = {name: statistics.median(r) for name, r in rounds.items()}
    rates.update({f'{name}_vs_cpu_recipe': statistics.median(a / b for a, b in zip(rounds[name], rounds['cpu_recipe']))
                  for name in ('gpu_worker', 'gpu_worker_eval')})
    return rates, cost


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def read_file(path: str) -> bytes:
    """The 'read' stage's folder loader: the file's bytes, undecoded."""
    with open(path, 'rb') as f:
        return f.read()


def keep_bytes(fp, name) -> bytes:
    """The 'read' stage's image loader for shards: the member's bytes, undecoded."""
    return fp.getvalue()


class OpenDelay:
    """`open_fn` (a folder's image loader, a shard stream's opener) after `seconds` of waiting: the round
    trip a network filesystem adds to every file open, during which the worker's core does nothing else.
    The wait spins on this thread's CPU clock, so it is charged to the worker in full however loaded the
    machine is (a sleep would vanish from its CPU time). A class, so loader workers can pickle it."""

    def __init__(self, open_fn, seconds: float):
        self.open_fn, self.seconds = open_fn, seconds

    def __call__(self, *args):
        end = time.thread_time() + self.seconds
        while time.thread_time() < end:
            pass
        return self.open_fn(*args)


def make_loader(args, pipeline: str, workers: int, device, batches=None, shards=None, open_delay: float = 0.0):
    """The training loader of main.py's `pipeline` over DATA/train, drawing batches * batch_size images at
    random (batches None: one epoch, each image once), each image's draws seeded as main.py seeds them, or
    over the --shards stream (one epoch); 'gpu_workers':
    the gpu pipeline's DataLoader without the device half; 'read': the images' bytes, undecoded (their
    sizes are the batch). `open_delay`: seconds added to every file open."""
    import gpu_augment
    from datasets import ImageFolderDataset, build_transform
    from seeding import SeededDataset, SeededSampler
    settings = recipe_args(args)
    gpu = pipeline in ('gpu', 'gpu_workers')
    transform = gpu_augment.worker_transform(True, settings) if gpu else build_transform(True, settings)
    transform = len if pipeline == 'read' else transform
    if shards is None:
        dataset = ImageFolderDataset(str(Path(args.data) / 'train'), transform)
        dataset.loader = read_file if pipeline == 'read' else dataset.loader
        dataset.loader = OpenDelay(dataset.loader, open_delay) if open_delay else dataset.loader
        if batches is None:  # one epoch, in the order main.py's sampler gives one process
            sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True,
                                                          seed=args.seed)
        else:
            sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=batches * args.batch_size)
        # each image's draws seeded from its place in the order, as main.py's loader (and the shard stream) does
        dataset, sampler = SeededDataset(dataset), SeededSampler(sampler, args.seed)
    else:
        import wds_data
        dataset = wds_data.open_split(shards, True, transform).train_stream(args.batch_size, workers, seed=args.seed)
        dataset.image_loader = keep_bytes if pipeline == 'read' else dataset.image_loader
        dataset.opener = OpenDelay(dataset.opener, open_delay) if open_delay else dataset.opener
        sampler = None
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                                         pin_memory=device.type == 'cuda', drop_last=True,
                                         collate_fn=gpu_augment.collate if gpu else None)
    if pipeline == 'gpu':
        return gpu_augment.DeviceLoader(loader, gpu_augment.DeviceAugment(args.input_size, compile=args.compile), device)
    return loader


def time_loader(loader, warmup: int, device, step=None) -> float:
    """img/s over the batches after the first `warmup` (each given to `step` if any)."""
    n, start = 0, None
    for i, (images, *_, targets) in enumerate(loader):  # gpu_workers: (rows, params, targets)
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        if step is not None:
            step(images, targets)
        if i >= warmup:
            n += len(targets)
    synchronize(device)
    return n / (time.perf_counter() - start)


def loaders(args, device) -> dict:
    out = {}
    for pipeline in ('cpu', 'gpu_workers', 'gpu'):
        out[pipeline] = {}
        for workers in args.workers:
            loader = make_loader(args, pipeline, workers, device, args.warmup + args.batches)
            out[pipeline][str(workers)] = time_loader(loader, args.warmup, device)
            print(f'[loader] {pipeline} pipeline, {workers} workers: {out[pipeline][str(workers)]:.1f} img/s',
                  file=sys.stderr, flush=True)
    return out


def worker_cpu_rate(loader) -> float:
    """Images per CPU second of the loader's worker processes, over a whole pass (the DataLoader joins its
    workers at the end, and only then does their CPU time count among this process's children)."""
    start, images = resource.getrusage(resource.RUSAGE_CHILDREN), 0
    for *_, targets in loader:
        images += len(targets)
    end = resource.getrusage(resource.RUSAGE_CHILDREN)
    return images / (end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime)


def storage(args, device) -> dict:
    """img/s per core (per CPU second of the loader workers) of the training loader from the folder and from
    the shards (bytes alone, CPU path, gpu path's workers) at each --workers count, without and with the
    --open-delay latency, and the shards' speed relative to the folder's: medians over --rounds alternating
    rounds."""
    for path in [*Path(args.data, 'train').rglob('*'), *Path(args.shards).glob('*.tar')]:
        if path.is_file():
            path.read_bytes()  # warm the page cache: what follows is CPU time and the simulated latency
    out = {}
    for pipeline in ('read', 'cpu', 'gpu_workers'):
        for delay in (0.0, args.open_delay):
            for workers in [w for w in args.workers if w > 0]:
                rounds = dict(folder=[], shards=[])
                for _ in range(args.rounds):
                    for source, shards in (('folder', None), ('shards', args.shards)):
                        loader = make_loader(args, pipeline, workers, device, None, shards, delay / 1000)
                        rounds[source].append(worker_cpu_rate(loader))  # one epoch: the same images either way
                key = f'{pipeline}, {delay:g} ms, {workers} workers'
                out[key] = {source: statistics.median(r) for source, r in rounds.items()}
                out[key]['shards_vs_folder'] = statistics.median(s / f for s, f in zip(rounds['shards'], rounds['folder']))
                print(f'[storage] {key}: folder {out[key]["folder"]:.1f}, shards {out[key]["shards"]:.1f} img/s per '
                      f'core ({out[key]["shards_vs_folder"]:.2f}x)', file=sys.stderr, flush=True)
    return out


def training(args, device, classes: int) -> dict:
    """Training steps fed by a synthetic batch and by each pipeline's loader (the largest --workers)."""
    import timm
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2

    import models_vit5  # noqa: F401  registers vit5_*
    if not timm.is_model(args.model):
        fail(f'unknown model {args.model!r}')
    model = timm.create_model(args.model, img_size=args.input_size, num_classes=classes).to(device).train()
    run = torch.compile(model) if args.compile else model
    optimizer = create_optimizer_v2(model, opt='lamb', lr=1e-4, weight_decay=0.05)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=classes)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')

    def step(images, targets):  # as engine.train_one_epoch does it
        images, targets = mixup(images.to(device, non_blocking=True), targets.to(device, non_blocking=True))
        with torch.autocast(**amp):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(run(images).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    batches = args.warmup + args.batches
    synthetic = [(torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device),
                  torch.randint(0, classes, (args.batch_size,), device=device))] * batches
    out = dict(workers=max(args.workers), synthetic=time_loader(synthetic, args.warmup, device, step))
    for pipeline in ('cpu', 'gpu'):
        loader = make_loader(args, pipeline, max(args.workers), device, batches)
        out[pipeline] = time_loader(loader, args.warmup, device, step)
        out[f'{pipeline}_ratio'] = out[pipeline] / out['synthetic']
    return out


def main(argv=None):
    args = parse_args(argv)
    import timm
    import torchvision
    from torchvision.datasets.folder import IMG_EXTENSIONS
    train = Path(args.data) / 'train'
    if not train.is_dir():
        fail(f'{args.data} has no train/ folder (make one with scripts/make_photo_folder.py)')
    files = sorted(str(f) for f in train.glob('*/*') if f.suffix.lower() in IMG_EXTENSIONS)
    classes = len([d for d in train.iterdir() if d.is_dir()])
    if not files:
        fail(f'no images in {train}')
    if args.shards and not Path(args.shards, '_info.json').is_file():
        fail(f'--shards {args.shards} has no _info.json (write the shards with scripts/make_shards.py --src {args.data})')
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        fail(f'--device {args.device}: {err}')
    if device.type == 'cuda' and not torch.cuda.is_available():
        fail('--device cuda asked for, but CUDA is not available')
    threads = torch.get_num_threads()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # per core; DataLoader workers run one thread each anyway
    result = dict(config=dict(data=args.data, images=len(files), input_size=args.input_size,
                              batch_size=args.batch_size, device=str(device), torch=torch.__version__,
                              torchvision=torchvision.__version__, timm=timm.__version__, cpu_threads=threads,
                              model=args.model, compile=args.compile, shards=args.shards,
                              open_delay_ms=args.open_delay))
    if 'per_core' not in args.skip:
        result['per_core'], result['batch_cost'] = per_core(args, files, device)
    if 'loaders' not in args.skip:
        result['loaders'] = loaders(args, device)
    if args.shards and 'storage' not in args.skip:
        result['storage'] = storage(args, device)
    if args.model:
        result['training'] = training(args, device, classes)
    print_table(result)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def print_table(result: dict):
    cfg = result['config']
    print(f"{cfg['images']} images in {cfg['data']}, {cfg['input_size']} px, batch {cfg['batch_size']}, "
          f"device {cfg['device']}, torch {cfg['torch']}")
    for name, rate in result.get('per_core', {}).items():
        print(f'  per core  {name:<16} {rate:10.1f} img/s' if 'vs' not in name else f'  per core  {name:<28} {rate:.2f}x')
    for name, value in result.get('batch_cost', {}).items():
        print(f'  batch     {name:<22} {value:8.2f}')
    for pipeline, rates in result.get('loaders', {}).items():
        print(f'  loader    {pipeline:<16} ' + '  '.join(f'{w} workers: {r:.1f}' for w, r in rates.items()) + ' img/s')
    for key, rates in result.get('storage', {}).items():
        print(f'  storage   {key:<28} folder {rates["folder"]:8.1f}  shards {rates["shards"]:8.1f} img/s per core'
              f'  ({rates["shards_vs_folder"]:.2f}x)')
    train = result.get('training')
    if train:
        print(f"  training  synthetic {train['synthetic']:.1f} img/s; cpu {train['cpu']:.1f} "
              f"({train['cpu_ratio']:.2f}x); gpu {train['gpu']:.1f} ({train['gpu_ratio']:.2f}x), "
              f"{train['workers']} workers")


if __name__ == '__main__':
    main()
