"""Repeated-augmentation sampler: each image is drawn num_repeats times per epoch, the copies
landing on different processes, so a global batch holds several augmentations of it."""
import math

import torch
import torch.distributed as dist


def samples_per_rank(n: int, world: int, num_repeats: int) -> int:
    """Samples each rank takes per epoch under repeated augmentation: the released count, whole blocks of
    256 images across all ranks (floor(n / 256) * 256 / world), or, where that is 0, each rank's whole share
    of the n * num_repeats copies. (The shard streams of wds_data.py take the same count.)"""
    return n // 256 * 256 // world or math.ceil(n * num_repeats / world)


class RASampler(torch.utils.data.Sampler):
    """Distributed sampler with repeated augmentation (the DeiT recipe).

    Per epoch: shuffle the indices with seed + epoch, repeat each one num_repeats times in a row
    ([a, a, a, b, b, b, ...]), pad to a multiple of the world size, and deal the list out round
    robin, so the copies of one index go to neighbouring ranks. Each rank then keeps only its
    first floor(len / 256) * 256 / world samples: an epoch is as long as one without repeats.

    Unlike the released sampler, a data set too small for that count (0 per rank) is not an
    empty epoch: each rank keeps its whole share, so every sample is seen num_repeats times.
    Without torch.distributed initialised it runs as a single process (world 1, rank 0).
    """

    def __init__(self, dataset, num_replicas=None, rank=None, shuffle=True, num_repeats=3, seed=0):
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is outside [0, {num_replicas})')
        if num_repeats < 1:
            raise ValueError(f'num_repeats must be >= 1, got {num_repeats}')
        if len(dataset) == 0:
            raise ValueError('RASampler needs a non-empty data set')
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.shuffle, self.num_repeats, self.seed = shuffle, num_repeats, seed
        self.epoch = 0
        # each rank's share of the repeated, padded list
        self.num_samples = math.ceil(len(dataset) * num_repeats / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.num_selected = samples_per_rank(len(dataset), num_replicas, num_repeats)

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        indices = torch.repeat_interleave(order, self.num_repeats).tolist()  # (n * num_repeats,)
        # pad by wrapping around so every rank gets num_samples (more than one lap if world > n * repeats)
        indices = (indices * math.ceil(self.total_size / len(indices)))[:self.total_size]
        mine = indices[self.rank:self.total_size:self.num_replicas]  # round robin over ranks
        return iter(mine[:self.num_selected])

    def __len__(self):
        return self.num_selected

    def set_epoch(self, epoch: int):
        self.epoch = epoch
