"""Fixtures shared by several test modules."""
import pytest

from shardsets import photo_shards
from tinyrun import make_image_folder


@pytest.fixture(scope='session')
def photo_set(tmp_path_factory):
    """(photo folder, its shards): 66 train images in shards of unequal length, 21 val images (read-only:
    tests that change them work on a copy)."""
    return photo_shards(tmp_path_factory.mktemp('photo_set'))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """tinyrun's image folder (3 classes of 4 train and 3 val images), one per test module that asks for it."""
    return make_image_folder(tmp_path_factory.mktemp('data'))
