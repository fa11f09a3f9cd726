"""Fixtures shared by several test modules."""
import pytest

from shardsets import photo_shards


@pytest.fixture(scope='session')
def photo_set(tmp_path_factory):
    """(photo folder, its shards): 66 train images in shards of unequal length, 21 val images (read-only:
    tests that change them work on a copy)."""
    return photo_shards(tmp_path_factory.mktemp('photo_set'))
