"""WebDataset shards as main.py's data (--data-set WDS --data-path ROOT), in the layout of the Hugging
Face Hub's timm/imagenet-1k-wds, which scripts/make_shards.py also writes:

    ROOT/_info.json                      {"splits": {"train": {"filenames": [...], "shard_lengths": [...],
                                          "num_samples": N, ...}, "validation": {...}}, "num_classes": C (optional)}
    ROOT/<prefix>-train-0000.tar ...     samples: <key>.jpg (or .png, .webp, ...), <key>.cls (the class
    ROOT/<prefix>-validation-00.tar ...  index as text), optionally <key>.json (not read)

ROOT is a folder, a URL prefix that webdataset opens (https://...), or a command with {} where a
file's name goes ('pipe:aws s3 cp s3://bucket/imagenet-1k-wds/{} -'). webdataset opens the streams
and groups tar members into samples; this module decides which samples each process and loader
worker reads, and in which order.

An epoch's order is a function of (seed, epoch) and the run's shape (the shard lengths, processes,
loader workers, batch size), nothing else:

1. The shards are permuted by a generator seeded with seed + epoch (as DistributedSampler does) and
   read as one sequence of N samples.
2. Every process runs the same number of batches, which DDP's lockstep needs: floor(N / world) //
   batch, or with repeated augmentation RASampler's count (samplers.samples_per_rank). A process's
   batch t comes from its loader worker t % K, the order a DataLoader collects batches in, and each
   worker reads one contiguous run of the sequence (its stream). A stream starts and ends at any
   sample, inside a shard if need be (that shard's samples before the start are read and dropped,
   undecoded), which is how the share is equal when shard counts or lengths do not divide.
3. Each stream passes a shuffle buffer seeded by (seed, epoch, stream).
4. Each image's augmentation draws come from generators seeded by (seed, epoch, shard file name, key,
   copy): they do not depend on which worker or process decodes it, on what it decoded before, on the
   worker count, or on where the shards are stored.

So no sample is read twice in an epoch, and the N - world * batches * batch samples that would not
fill a batch on every process (fewer than world * (batch + 1)) sit out: the end of the permuted
sequence, another set each epoch. The order depends on K (the streams are cut per worker);
resuming with another --num_workers keeps every property but gives another order.

Repeated augmentation (--repeated-aug, R = 3 copies): the streams are cut for R times fewer images
and process r reads the streams of processes r, r - 1, ..., r - R + 1 (modulo the world size),
interleaved sample by sample: the copies of an image land on R different processes (with fewer
processes than copies, on as many as there are, as in RASampler), each at the same step of the epoch
or the next (the next when the copy falls at a batch boundary), with a different augmentation each.
RASampler picks each epoch's third of the images at random from the whole set; here it is the
permuted shard sequence's first third. When a worker's sample count is not a multiple of R, the
last image of each of its streams is seen fewer than R times.

Evaluation reads the shards in their listed order, split into one contiguous run per process (with
--dist-eval; runs of sizes differing by at most one) and per worker, each sample once, no padding.

Mid-epoch: set_epoch(epoch, start_batch=k) makes a stream yield the epoch's batches from k on, the
same images with the same augmentations; the k * batch samples before are read but not decoded.

Bad data ends the run (main.py: one line, exit code 2) naming the shard and the sample's key: a
missing _info.json, a truncated or unreadable tar, a shard holding another count than _info.json
says, a sample without an image or without .cls, a .cls that is no class index or is out of range,
an image PIL cannot read. Skipping a sample instead would leave one process a sample short, and
its last batch, or DDP's lockstep, would break.
"""
import io
import itertools
import json
import os
import random
import tarfile
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import webdataset as wds
from torchvision.datasets.folder import IMG_EXTENSIONS
from webdataset.gopen import set_options
from webdataset.tariterators import group_by_keys, tar_file_expander

from datasets import DataError, load_image
import seeding
from samplers import samples_per_rank

SPLIT_NAMES = {True: ('train',), False: ('validation', 'val')}  # the Hub's names first
IMAGE_KEYS = tuple(e.lstrip('.') for e in IMG_EXTENSIONS)  # what the folder reader takes; the first present wins
INFO = '_info.json'


def file_url(root: str, name: str) -> str:
    """Where the file `name` of a shard set lives: ROOT with {} replaced by it, else ROOT/name."""
    if '{}' in root:
        return root.replace('{}', name)
    if root.startswith('pipe:'):
        raise DataError(f'--data-path {root!r}: a pipe: command needs {{}} where the file name goes, e.g. '
                        f"'pipe:aws s3 cp s3://bucket/imagenet-1k-wds/{{}} -'")
    return root.rstrip('/') + '/' + name if '://' in root else os.path.join(root, name)


def is_local(root: str) -> bool:
    return '{}' not in root and '://' not in root and not root.startswith('pipe:')


def reason(err: Exception) -> str:
    """An error's message without what webdataset appends to its args (the stream object, the URL)."""
    return str(err.args[0]).split(' @ ')[0] if err.args else type(err).__name__


def read_info(root: str) -> dict:
    """ROOT's _info.json as a dict."""
    if not root:
        raise DataError('--data-set WDS needs --data-path: the folder, URL prefix or pipe: command of the shards')
    url = file_url(root, INFO)
    if is_local(root) and not os.path.isfile(url):
        kind = 'folder' if os.path.isdir(root) else 'path'
        raise DataError(f'--data-set WDS: no {INFO} in {root} (missing {kind}?); it lists the shards and their '
                        f'sample counts: write it with python scripts/make_shards.py --write-info {root}')
    try:
        with wds.gopen(url) as f:
            info = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f'cannot read {url}: {reason(err)}') from None
    if not isinstance(info, dict) or not isinstance(info.get('splits'), dict):
        raise DataError(f'{url} has no "splits" (the Hub layout: {{"splits": {{"train": {{"filenames": [...], '
                        f'"shard_lengths": [...], "num_samples": N}}, ...}}}})')
    return info


@dataclass
class Shards:
    """One split of a shard set, what build_dataset returns for --data-set WDS: its shards (file names as
    _info.json lists them, and URLs), their sample counts, the classifier size labels are checked against,
    and the transform of the PIL images. main.py reads it through train_stream / eval_stream."""
    names: List[str]
    urls: List[str]
    lengths: List[int]
    nb_classes: int
    transform: Callable

    def __len__(self):
        return sum(self.lengths)

    def train_stream(self, batch_size: int, workers: int, world: int = 1, rank: int = 0, seed: int = 0,
                     repeats: int = 1, buffer: int = 1000) -> 'ShardStream':
        return ShardStream(self, batch_size, workers, world, rank, train=True, seed=seed, repeats=repeats,
                           buffer=buffer)

    def eval_stream(self, batch_size: int, workers: int, world: int = 1, rank: int = 0) -> 'ShardStream':
        return ShardStream(self, batch_size, workers, world, rank)


def open_split(root: str, is_train: bool, transform: Callable, nb_classes: Optional[int] = None) -> Shards:
    """The train (or validation) split of the shard set at ROOT. `nb_classes` (--nb-classes) is needed
    where _info.json has no num_classes (the Hub's has none), and may not be below it."""
    info = read_info(root)
    url, splits = file_url(root, INFO), info['splits']
    name = next((n for n in SPLIT_NAMES[is_train] if n in splits), None)
    if name is None:
        raise DataError(f'{url} has no {SPLIT_NAMES[is_train][0]!r} split (it lists {sorted(splits)})')
    split = splits[name]
    files, lengths = split.get('filenames'), split.get('shard_lengths')
    if not (isinstance(files, list) and isinstance(lengths, list) and len(files) == len(lengths) > 0
            and all(isinstance(f, str) for f in files)
            and all(isinstance(n, int) and n >= 0 for n in lengths)):
        raise DataError(f'{url}, split {name!r}: "filenames" and "shard_lengths" must be lists of equal, '
                        f'non-zero length (shard file names and their sample counts)')
    total = sum(lengths)
    if total == 0 or split.get('num_samples', total) != total:
        raise DataError(f'{url}, split {name!r}: num_samples {split.get("num_samples")} while the shard_lengths '
                        f'add up to {total}')
    listed = info.get('num_classes')
    if nb_classes is None and listed is None:
        raise DataError(f'{url} does not say how many classes there are: pass --nb-classes (1000 for ImageNet-1k)')
    if nb_classes is not None and listed is not None and nb_classes < listed:
        raise DataError(f'--nb-classes {nb_classes} is fewer than the {listed} classes of {url}')
    return Shards(files, [file_url(root, f) for f in files], lengths, nb_classes or listed, transform)


# ---- reading --------------------------------------------------------------------------------------
def tar_samples(url: str, stream):
    """The samples of one opened tar stream: dicts of member bytes by extension, with __key__ and __url__."""
    return group_by_keys(tar_file_expander([dict(url=url, stream=stream)]))


def read_shard(url: str, length: Optional[int], start: int = 0, stop: Optional[int] = None, opener=wds.gopen):
    """Samples start..stop-1 (undecoded) of the shard at `url`, which _info.json says holds `length`
    (None: unknown, read it all). Read to its end, a shard must hold exactly `length` samples."""
    stop = length if stop is None else stop
    stream, key, count, complete = opener(url), None, 0, False
    try:
        for sample in tar_samples(url, stream):
            if count == length:
                raise DataError(f'shard {url} holds more than the {length} samples {INFO} lists (from {sample["__key__"]})')
            key, count = sample['__key__'], count + 1
            if count > start:
                yield sample
            if length is not None and count == stop < length:
                return
        if length is not None and count < length:
            raise DataError(f'shard {url} ends after {count} samples (the last {key}) where {INFO} lists {length}: '
                            f'truncated, or {INFO} is not this shard set\'s')
        complete = True
    except (tarfile.TarError, OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f'cannot read shard {url} after sample {key}: {reason(err)}') from None
    finally:
        if not complete:  # stopped early on purpose: a pipe's command may fail on the closed pipe
            set_options(stream, ignore_errors=True)
        stream.close()


def count_samples(url: str) -> int:
    """Samples in the shard at `url`, each checked for an image and a .cls (for a written-after _info.json)."""
    n = 0
    for sample in read_shard(url, length=None):
        check_members(sample)
        n += 1
    return n


def where(sample: dict) -> str:
    return f'shard {sample["__url__"]}, sample {sample["__key__"]}'


def check_members(sample: dict) -> str:
    """The extension of the sample's image; a sample without an image or a .cls is an error."""
    ext = next((e for e in IMAGE_KEYS if e in sample), None)
    members = sorted(k for k in sample if not k.startswith('__'))
    if ext is None:
        raise DataError(f'{where(sample)}: no image (.{", .".join(IMAGE_KEYS[:4])}, ...) among its members {members}')
    if 'cls' not in sample:
        raise DataError(f'{where(sample)}: no .cls member (the class index) among {members}')
    return ext


def decode(sample: dict, nb_classes: int, image_loader=load_image):
    """A raw sample -> (RGB PIL image, class index), or DataError naming the shard and the key."""
    ext = check_members(sample)
    try:
        label = int(sample['cls'])
    except ValueError:
        raise DataError(f'{where(sample)}: .cls holds {sample["cls"][:20]!r}, not a class index') from None
    if not 0 <= label < nb_classes:
        raise DataError(f'{where(sample)}: class {label} is outside 0..{nb_classes - 1} (--nb-classes {nb_classes})')
    return image_loader(io.BytesIO(sample[ext]), f'{where(sample)}.{ext}'), label


# ---- the epoch's plan -----------------------------------------------------------------------------
def worker_counts(count: int, batch: int, workers: int) -> List[int]:
    """Samples of each loader worker when `count` samples in batches of `batch` (the last may be short)
    are dealt round robin, batch t to worker t % workers."""
    batches = -(-count // batch)
    counts = [len(range(q, batches, workers)) * batch for q in range(workers)]
    if batches:
        counts[(batches - 1) % workers] -= batches * batch - count
    return counts


def cut(lengths, order, offset: int, count: int):
    """[(shard, first, stop)]: samples offset..offset + count - 1 of the shards read in `order`."""
    pieces = []
    for shard in order:
        if count <= 0:
            break
        n = lengths[shard]
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, count)
        pieces.append((shard, offset, offset + take))
        offset, count = 0, count - take
    return pieces


class ShardStream(torch.utils.data.IterableDataset):
    """(transformed image, class index) of one process's share of the epoch, for a DataLoader with
    `workers` workers and `batch_size`, run as the module docstring says. set_epoch before each epoch.

    Training (`train`): `repeats` copies per image (3: repeated augmentation), a shuffle buffer of
    `buffer` samples per worker, every process `batches` batches. Evaluation: each sample once.
    """

    def __init__(self, shards: Shards, batch_size: int, workers: int, world: int = 1, rank: int = 0,
                 train: bool = False, seed: int = 0, repeats: int = 1, buffer: int = 1000):
        if not 0 <= rank < world:
            raise ValueError(f'rank {rank} is outside [0, {world})')
        self.shards, self.batch_size, self.workers = shards, batch_size, max(workers, 1)
        self.world, self.rank, self.train, self.seed = world, rank, train, seed
        self.repeats, self.buffer = repeats if train else 1, buffer
        self.epoch, self.start_batch = 0, 0
        # how a shard is opened and an image's bytes read, as an ImageFolder's `loader` (the data benchmark
        # delays the one and keeps the bytes undecoded with the other)
        self.opener, self.image_loader = wds.gopen, load_image
        self.name_of = dict(zip(shards.urls, shards.names))
        n = len(shards)
        if train:
            self.per_rank = n // world if self.repeats == 1 else samples_per_rank(n, world, self.repeats)
            self.batches = self.per_rank // batch_size
            while world * sum(self._stream_lengths()) > n:  # tiny sets: the copies may ask for more images
                self.batches -= 1
            self.counts = worker_counts(self.batches * batch_size, batch_size, self.workers)
        else:
            self.per_rank = n // world + (rank < n % world)
            self.batches = -(-self.per_rank // batch_size)
            self.counts = worker_counts(self.per_rank, batch_size, self.workers)

    def _stream_lengths(self) -> List[int]:
        """Images in each worker's stream (one per process and worker)."""
        counts = worker_counts(self.batches * self.batch_size, self.batch_size, self.workers)
        return [-(-c // self.repeats) for c in counts]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch to read, from its batch `start_batch` on (a mid-epoch resume)."""
        if not 0 <= start_batch <= self.batches:
            raise ValueError(f'start_batch {start_batch} is outside [0, {self.batches}]')
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        if self.train:
            return (self.batches - self.start_batch) * self.batch_size
        return self.per_rank

    def _order(self):
        if not self.train:
            return range(len(self.shards.lengths))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.shards.lengths), generator=g).tolist()

    def _span(self, rank: int, worker: int):
        """(first sample, count) of the stream of process `rank` and `worker` in the epoch's sequence."""
        if self.train:
            lengths = self._stream_lengths()  # the same for every process
            return rank * sum(lengths) + sum(lengths[:worker]), lengths[worker]
        n, world = len(self.shards), self.world
        return rank * (n // world) + min(rank, n % world) + sum(self.counts[:worker]), self.counts[worker]

    def _stream(self, rank: int, worker: int, order):
        """The raw samples of the stream of process `rank` and `worker`, in the order they are used."""
        lengths, urls = self.shards.lengths, self.shards.urls
        samples = itertools.chain.from_iterable(read_shard(urls[s], lengths[s], start, stop, self.opener)
                                                for s, start, stop in cut(lengths, order, *self._span(rank, worker)))
        if not self.train:
            return samples
        # the worker's buffer is shared by the streams it reads (repeated augmentation: up to R)
        size = max(1, self.buffer // min(self.repeats, self.world))
        rng = random.Random(f'{self.seed}:{self.epoch}:{rank}:{worker}')
        return wds.shuffle(size, size, rng=rng)(samples)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.workers:
            raise RuntimeError(f'this stream was cut for {self.workers} loader workers, not {workers}')
        # the DataLoader asks its worker 0 first: from start_batch on, worker w plays the role of
        # worker (w + start_batch) % K of the whole epoch
        role = (worker + self.start_batch) % workers
        skip = len(range(role, self.start_batch, workers)) * self.batch_size
        order = self._order()
        if not self.train:
            for raw in self._stream(self.rank, role, order):
                img, label = decode(raw, self.shards.nb_classes, self.image_loader)
                yield self.shards.transform(img), label
            return
        # copy c of an image comes from the stream of process rank - c, the R copies read in turn
        sources = [(self.rank - c) % self.world for c in range(self.repeats)]
        readers = {}
        for source in dict.fromkeys(sources):
            copies = [c for c, s in enumerate(sources) if s == source]
            readers.update(zip(copies, itertools.tee(self._stream(source, role, order), len(copies))))
        for t in range(self.counts[role]):
            copy = t % self.repeats
            raw = next(readers[copy])
            if t < skip:
                continue
            img, label = decode(raw, self.shards.nb_classes, self.image_loader)
            # in this process (no workers) sample_seeded puts the training's generators back afterwards
            with seeding.sample_seeded(seeding.name_seed(self.seed, self.epoch, self.name_of[raw['__url__']],
                                                         raw['__key__'], copy)):
                sample = self.shards.transform(img)
            yield sample, label
