"""seeding.py: every draw a resume replays is a function of (seed, epoch, position), not of the process."""
import random

import numpy as np
import pytest
import torch

import seeding
from samplers import RASampler


def test_derived_seeds_differ_in_every_key_and_repeat_exactly():
    keys = [(42, seeding.STEP, 0, 0, 0), (42, seeding.STEP, 0, 0, 1), (42, seeding.STEP, 0, 1, 0),
            (42, seeding.STEP, 1, 0, 0), (43, seeding.STEP, 0, 0, 0), (42, seeding.SAMPLE, 0, 0, 0)]
    seeds = [seeding.derive_seed(*k) for k in keys]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2 ** 64 for s in seeds)
    assert seeds == [seeding.derive_seed(*k) for k in keys]
    many = seeding.seed_sequence(seeds[0], 0, 10_000)
    assert many.dtype == np.uint64 and len(np.unique(many)) == 10_000
    assert np.array_equal(many[:10], seeding.seed_sequence(seeds[0], 0, 10))  # a prefix does not depend on the count
    assert np.array_equal(many[4000:4010], seeding.seed_sequence(seeds[0], 4000, 10))  # nor a stretch on its start


def draws():
    return random.random(), float(np.random.rand()), torch.rand(2).tolist()


def test_a_step_draws_the_same_wherever_the_process_has_been():
    seeding.seed_step(42, 3, 1, 17)
    expected = draws()
    draws()  # the process moves on
    torch.randn(100)
    seeding.seed_step(42, 3, 1, 17)
    assert draws() == expected
    seeding.seed_step(42, 3, 1, 18)
    assert draws() != expected


def test_sampler_pairs_positions_with_seeds_and_a_resume_skips_to_the_same_pairs():
    sampler = seeding.SeededSampler(RASampler(range(10), num_replicas=2, rank=1, seed=7), seed=42, rank=1)
    sampler.set_epoch(3)
    full = list(sampler)
    assert len(full) == len(sampler) == 15  # 10 images x 3 repeats over 2 ranks
    indices, seeds = zip(*full)
    assert len(set(seeds)) == len(seeds)  # every position its own seed...
    assert len(set(indices)) < len(indices)  # ... also where repeated augmentation deals an image twice
    sampler.set_epoch(3, skip=4)
    assert list(sampler) == full[4:] and len(sampler) == 11
    assert seeding.sample_seeds(42, 3, 1, 6, 2) == list(seeds[6:8])  # the same seeds, for a reader that orders itself
    sampler.set_epoch(4)
    other = list(sampler)
    assert len(other) == 15 and not set(s for _, s in other) & set(seeds)  # another epoch, other draws
    rank0 = seeding.SeededSampler(RASampler(range(10), num_replicas=2, rank=0, seed=7), seed=42, rank=0)
    rank0.set_epoch(3)
    assert not set(s for _, s in rank0) & set(seeds)  # another rank, other draws
    with pytest.raises(ValueError, match='cannot skip 16'):
        sampler.set_epoch(3, skip=16)


class RandomImages(torch.utils.data.Dataset):
    """What a transform draws, from all three generators the recipes use."""

    def __len__(self):
        return 6

    def __getitem__(self, index):
        return torch.tensor([index, random.random(), np.random.rand(), torch.rand(()).item()], dtype=torch.float64)


def batches(workers: int, skip: int = 0):
    sampler = seeding.SeededSampler(RASampler(RandomImages(), seed=1), seed=42)
    sampler.set_epoch(0, skip=skip)
    loader = torch.utils.data.DataLoader(seeding.SeededDataset(RandomImages()), sampler=sampler, batch_size=3,
                                         num_workers=workers, generator=torch.Generator())  # as main.py's
    return torch.cat(list(loader))


def test_sample_draws_do_not_depend_on_workers_or_resume_and_leave_the_main_process_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    inline = batches(0)
    assert torch.equal(torch.get_rng_state(), before)  # loading in this process left its generator as it was
    assert torch.equal(batches(2), inline)  # two workers, each taking every other batch
    assert torch.equal(batches(0, skip=9), inline[9:])  # a resume after 3 batches
    copies = inline[inline[:, 0] == inline[0, 0]]
    assert len(copies) == 3 and len(set(copies[:, 1].tolist())) == 3  # three copies of an image, three draws
