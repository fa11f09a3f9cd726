"""Random draws a resumed run replays exactly: each is a function of (seed, epoch, position), never of
how long a process has lived, how many DataLoader workers it has or which of them got a sample.

Two kinds of code draw during training, both from the global generators of Python, numpy and torch:

- the training step, in the main process: timm's Mixup / CutMix (numpy), drop-path masks (torch; on
  CUDA the device's generator). `seed_step` reseeds those generators before every batch from
  (seed, epoch, rank, batch index).
- each sample's augmentation, in a DataLoader worker: torchvision's transforms and the device
  pipeline's parameter draws (torch), timm's RandAugment and random erasing (Python's random and
  numpy). `SeededSampler` pairs each index of an epoch's order with a seed made from (seed, epoch,
  rank, position in that order), and `SeededDataset` seeds the generators with it before the
  transform runs. The three copies of an image that repeated augmentation deals out sit at three
  positions, so they still get three different augmentations. A reader that orders its samples
  itself (the shard stream of wds_data.py) draws inside `sample_seeded` too, with seeds from
  `name_seed` (seed, epoch, shard, sample key, copy).

A run resumed at batch k of an epoch therefore skips the first k batches without loading them and
draws exactly what the uninterrupted run drew from there on.
"""
import contextlib
import hashlib
import random

import numpy as np
import torch

STEP, SAMPLE = 0, 1  # the two streams, so that no step's seed is also a sample's
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment


def derive_seed(*keys: int) -> int:
    """A 64-bit seed from non-negative integer keys (numpy's SeedSequence: nearby keys give unrelated seeds)."""
    high, low = np.random.SeedSequence([int(k) for k in keys]).generate_state(2)
    return (int(high) << 32) | int(low)


def seed_sequence(key: int, start: int, count: int) -> np.ndarray:
    """Seeds (uint64) number start .. start + count - 1 of the sequence `key` names: splitmix64's outputs,
    vectorised (a few ns each, where a SeedSequence per sample would cost the main process some 20 us)."""
    with np.errstate(over='ignore'):  # the arithmetic is modulo 2**64 on purpose
        x = np.uint64(key) + (np.arange(start + 1, start + count + 1, dtype=np.uint64) * GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, rank: int, start: int, count: int = 1) -> list:
    """The seeds of positions start .. start + count - 1 in `rank`'s order of `epoch`: what SeededSampler pairs
    those positions with, for readers that order samples themselves (a shard stream)."""
    return seed_sequence(derive_seed(seed, SAMPLE, epoch, rank), start, count).tolist()


def name_seed(*parts) -> int:
    """A 64-bit seed from names and numbers (e.g. a shard file's name and a sample's key, for a reader whose
    samples are known by name, not position): SHA-256 of their text, the same on every machine and Python."""
    digest = hashlib.sha256(':'.join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], 'little')


def seed_globals(seed: int, device_type: str = 'cpu') -> None:
    """Seed Python's, numpy's and torch's global generators, and those of the training device's type
    (CUDA: every device's; a host-side setting, no device sync). torch.manual_seed would do all at
    once, but it asks every backend whether it is there, some 200 us a call on a CPU machine."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)  # numpy's legacy seeding takes 32 bits
    torch.default_generator.manual_seed(seed)
    if device_type == 'cuda':
        torch.cuda.manual_seed_all(seed)
    elif device_type == 'mps':
        torch.mps.manual_seed(seed)


def seed_step(seed: int, epoch: int, rank: int, batch: int, device_type: str = 'cpu') -> None:
    """Before a training batch: the generators its mixup and drop-path draw from, seeded from where it is."""
    seed_globals(derive_seed(seed, STEP, epoch, rank, batch), device_type)


@contextlib.contextmanager
def sample_seeded(seed: int):
    """Seed the CPU generators for one sample's transform. In the main process (num_workers 0) their state
    is put back afterwards, so loading data leaves the training's generators alone; a worker needs no such care."""
    if torch.utils.data.get_worker_info() is not None:
        seed_globals(seed)
        yield
        return
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed_globals(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class SeededSampler(torch.utils.data.Sampler):
    """Wraps a sampler with set_epoch (RASampler, DistributedSampler): yields (index, seed) pairs, the seed
    a function of (seed, epoch, rank, position in the epoch's order).

    `set_epoch(epoch, skip=k)` starts that epoch's order at position k (a mid-epoch resume: the skipped
    samples are neither loaded nor decoded); the positions, and so the seeds, stay those of the full order.
    """

    def __init__(self, sampler, seed: int, rank: int = 0):
        self.sampler, self.seed, self.rank = sampler, seed, rank
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if not 0 <= skip <= len(self.sampler):
            raise ValueError(f'cannot skip {skip} of an epoch of {len(self.sampler)} samples')
        self.epoch, self.skip = epoch, skip
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        indices = list(self.sampler)[self.skip:]
        return iter(zip(indices, sample_seeds(self.seed, self.epoch, self.rank, self.skip, len(indices))))

    def __len__(self):
        return len(self.sampler) - self.skip


class SeededDataset(torch.utils.data.Dataset):
    """A map-style data set read with (index, seed) pairs from SeededSampler: the sample's transform draws
    from generators seeded with its seed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, item):
        index, seed = item
        with sample_seeded(seed):
            return self.dataset[index]

    def __len__(self):
        return len(self.dataset)
