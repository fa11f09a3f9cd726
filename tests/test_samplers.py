import math
from collections import Counter

import pytest

from samplers import RASampler


def _ranks(n, world, **kw):
    samplers = [RASampler(range(n), num_replicas=world, rank=r, **kw) for r in range(world)]
    return [list(s) for s in samplers], samplers


@pytest.mark.parametrize('n, world, expected', [(1000, 1, 768), (1000, 2, 384), (1000, 8, 96), (256, 3, 85), (600, 2, 256)])
def test_released_epoch_length(n, world, expected):
    assert expected == n // 256 * 256 // world  # the recipe's formula
    per_rank, samplers = _ranks(n, world)
    for idx, s in zip(per_rank, samplers):
        assert len(s) == len(idx) == expected
        assert all(0 <= i < n for i in idx)


def test_repeats_land_on_different_ranks():
    # 1000 images, 3 ranks: 768 draws = 256 images x 3 copies, one copy per rank
    per_rank, _ = _ranks(1000, 3)
    assert all(len(idx) == len(set(idx)) == 256 for idx in per_rank)
    assert set(per_rank[0]) == set(per_rank[1]) == set(per_rank[2])


def test_repeat_count_across_ranks():
    per_rank, _ = _ranks(1000, 2)  # 768 draws: 256 distinct images, each 3 times
    counts = Counter(i for idx in per_rank for i in idx)
    assert len(counts) == 256 and set(counts.values()) == {3}


@pytest.mark.parametrize('n, world', [(10, 1), (10, 2), (10, 3), (255, 4), (1, 8), (300, 512)])
def test_small_data_set_is_never_empty_and_fully_covered(n, world):
    per_rank, samplers = _ranks(n, world)
    expected = math.ceil(n * 3 / world)  # each rank's whole share of the repeated list
    assert all(len(s) == len(idx) == expected > 0 for idx, s in zip(per_rank, samplers))
    counts = Counter(i for idx in per_rank for i in idx)
    assert set(counts) == set(range(n))  # every image is seen ...
    assert min(counts.values()) >= 3  # ... at least num_repeats times (more only by padding)
    assert sum(counts.values()) - 3 * n < world


def test_num_repeats_one_is_a_plain_distributed_sampler():
    per_rank, _ = _ranks(10, 3, num_repeats=1)
    counts = Counter(i for idx in per_rank for i in idx)
    assert set(counts) == set(range(10)) and sum(counts.values()) == 12  # 2 padded


def test_deterministic_from_seed_and_epoch():
    a = RASampler(range(1000), num_replicas=2, rank=1, seed=5)
    b = RASampler(range(1000), num_replicas=2, rank=1, seed=5)
    c = RASampler(range(1000), num_replicas=2, rank=1, seed=6)
    assert list(a) == list(b) != list(c)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    a.set_epoch(0)
    assert list(a) == first


def test_single_process_without_distributed():
    s = RASampler(range(20), shuffle=False)
    assert (s.num_replicas, s.rank) == (1, 0)
    assert list(s)[:7] == [0, 0, 0, 1, 1, 1, 2]
    assert len(s) == 60


def test_takes_world_from_initialised_process_group(monkeypatch):
    import torch.distributed as dist
    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist, 'get_world_size', lambda: 4)
    monkeypatch.setattr(dist, 'get_rank', lambda: 2)
    s = RASampler(range(1000))
    assert (s.num_replicas, s.rank, len(s)) == (4, 2, 192)


def test_bad_arguments():
    with pytest.raises(ValueError, match='rank'):
        RASampler(range(10), num_replicas=2, rank=2)
    with pytest.raises(ValueError, match='non-empty'):
        RASampler([], num_replicas=1, rank=0)
