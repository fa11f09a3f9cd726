"""Shard sets for the WDS tests: a photo ImageFolder written as shards by scripts/make_shards.py, and a
shard set written by hand in the Hub's naming (timm/imagenet-1k-wds), which nothing of ours wrote."""
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

from tinyrun import REPO

sys.path.insert(0, str(REPO / 'scripts'))
import make_photo_folder  # noqa: E402
import make_shards  # noqa: E402


def photo_shards(root, train=66, val=21, shard_mb=0.015, classes=4):
    """root/photos (an ImageFolder of small JPEG photos, a quarter CMYK JPEGs or RGBA PNGs) and root/shards,
    its shard set (with .json members): several shards per split, of unequal lengths."""
    photos, shards = Path(root) / 'photos', Path(root) / 'shards'
    make_photo_folder.main(['--out', str(photos), '--train', str(train), '--val', str(val), '--classes', str(classes),
                            '--min-side', '40', '--max-side', '80', '--odd', '0.25'])
    make_shards.main(['--src', str(photos), '--out', str(shards), '--shard-size', str(shard_mb), '--workers', '2',
                      '--json'])
    return photos, shards


def pixels_id(img) -> str:
    """An image's identity: the hash of its decoded pixels (a module-level function: workers pickle it)."""
    return hashlib.md5(img.tobytes()).hexdigest()


def folder_ids(folder):
    """{pixels_id: class index} of an ImageFolder split, read as main.py reads it (class indices of train/)."""
    from datasets import ImageFolderDataset, load_image
    from torchvision.datasets.folder import find_classes
    names = find_classes(str(Path(folder).parent / 'train'))[0]
    dataset = ImageFolderDataset(str(folder), class_names=names)
    return {pixels_id(load_image(path)): label for path, label in dataset.samples}


def write_tar(path, members):
    """A tar file of (name, bytes) members, written with the standard library (not through our code)."""
    with tarfile.open(path, 'w') as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def hub_shards(root, photos, per_shard=(5, 4, 6), val_per_shard=(3, 4)):
    """root/ in the naming of timm/imagenet-1k-wds: imagenet1k-train-0000.tar .., imagenet1k-validation-00.tar ..,
    samples <wnid>_<n>.jpg / .cls / .json, an _info.json with splits only (no class count), from the
    photo folder's images (train/ then val/). Returns {pixels_id: class index} per split."""
    from datasets import ImageFolderDataset, load_image
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    train = ImageFolderDataset(str(Path(photos) / 'train'))
    val = ImageFolderDataset(str(Path(photos) / 'val'), class_names=train.classes)
    info, ids = {'name': 'imagenet-1k', 'splits': {}}, {}
    for split, dataset, counts, digits in (('train', train, per_shard, 4), ('validation', val, val_per_shard, 2)):
        samples, start, names, ids[split] = dataset.samples, 0, [], {}
        for i, n in enumerate(counts):
            members = []
            for path, label in samples[start:start + n]:
                key = f'n{label:08d}_{start}'
                members += [(f'{key}.cls', str(label).encode()), (f'{key}.jpg', Path(path).read_bytes()),
                            (f'{key}.json', json.dumps({'filename': f'{key}.JPEG', 'label': label}).encode())]
                ids[split][pixels_id(load_image(path))] = label
                start += 1
            names.append(f'imagenet1k-{split}-{i:0{digits}d}.tar')
            write_tar(root / names[-1], members)
        info['splits'][split] = {'name': split, 'num_samples': sum(counts), 'filenames': names,
                                 'shard_lengths': list(counts)}
    (root / '_info.json').write_text(json.dumps(info))
    return ids
