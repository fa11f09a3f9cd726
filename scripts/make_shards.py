"""Write an ImageFolder (train/ and val/ inside, as ImageNet's) as WebDataset shards in the layout of the
Hugging Face Hub's timm/imagenet-1k-wds, which main.py reads with --data-set WDS.

    OUT/<prefix>-train-0000.tar ...      each sample: <key>.jpg (or .png, .webp, ...: the file's bytes,
    OUT/<prefix>-validation-00.tar ...   never re-encoded), <key>.cls (class index as text), and with
                                         --json <key>.json (file name and class name)
    OUT/_info.json                       per split: filenames, shard_lengths, num_samples; num_classes, classes

Class indices are main.py's for the same folder (sorted train/ class folders; val/ classes mapped onto
them). The train split is shuffled (--seed) before it is cut, so every shard is a random sample of the
set (the reader's shuffle buffer then only mixes within a few shards); validation keeps the folder's
order. A sample's key is its path below the split folder without the extension (dots made '_'),
e.g. n01440764/n01440764_10026. Shards hold near-equal sample counts, as many as make about
--shard-size MB each; --workers processes write them, each to a temporary name renamed when whole,
and _info.json comes last, so an interrupted run leaves no shard set that reads as complete.

    python scripts/make_shards.py --src /datasets/imagenet --out /datasets/imagenet-wds --prefix imagenet1k
    python scripts/make_shards.py --write-info /datasets/imagenet-1k-wds   # count shards that lack _info.json
"""
import argparse
import json
import multiprocessing
import os
import re
import sys
from pathlib import Path

from common import Parser, fail

SPLITS = (('train', 'train'), ('val', 'validation'))  # folder -> split name in the shard set
SHARD_NAME = re.compile(r'^(?P<prefix>.+)-(?P<split>train|validation)-(?P<index>\d+)\.tar$')


def parse_args(argv=None):
    p = Parser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--src', help='the ImageFolder: SRC/train/<class>/<image> (and SRC/val/...)')
    p.add_argument('--out', help='folder for the shards and _info.json (created if missing)')
    p.add_argument('--prefix', default=None, help="shard names' prefix (default: the --src folder's name)")
    p.add_argument('--shard-size', type=float, default=128, help='target shard size in MB (default 128)')
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1),
                   help='parallel writer processes (default: up to 8)')
    p.add_argument('--seed', type=int, default=0, help='seed of the train split shuffle (default 0)')
    p.add_argument('--json', action='store_true',
                   help='also store each image\'s file name and class name (<key>.json; the reader skips it, and '
                        'each tar member costs it some 30%% of the unpacking work)')
    p.add_argument('--overwrite', action='store_true', help="replace OUT's shards and _info.json")
    p.add_argument('--write-info', metavar='DIR', default=None,
                   help='instead: count the samples of the <prefix>-{train,validation}-N.tar shards in DIR and '
                        'write DIR/_info.json')
    args = p.parse_args(argv)
    if args.write_info is None and not (args.src and args.out):
        p.error('give --src and --out (or --write-info DIR)')
    if args.write_info is not None and (args.src or args.out):
        p.error('--write-info takes the shards folder alone, without --src / --out')
    if args.shard_size <= 0 or args.workers < 1:
        p.error(f'--shard-size must be > 0 and --workers >= 1, got {args.shard_size} and {args.workers}')
    return args


def sample_key(relpath: str) -> str:
    """'n01440764/n01440764_10026.JPEG' -> 'n01440764/n01440764_10026' (webdataset splits a key from its
    extensions at the file name's first dot, so the name keeps none)."""
    folder, name = os.path.split(relpath)
    return os.path.join(folder, os.path.splitext(name)[0].replace('.', '_'))


def image_ext(path: str) -> str:
    """The member's extension: 'jpg' for any JPEG name (the Hub's), else the file's own, lowercased."""
    ext = os.path.splitext(path)[1].lower().lstrip('.')
    return 'jpg' if ext in ('jpeg', 'jpe') else ext


def list_split(src: Path, folder: str, class_names):
    """(samples [(path, class index)], class names) of SRC/folder, read as main.py reads it."""
    from datasets import DataError, ImageFolderDataset
    try:
        dataset = ImageFolderDataset(str(src / folder), class_names=class_names)
    except (DataError, FileNotFoundError) as err:
        fail(f'{src / folder}: {err}')
    return dataset.samples, dataset.classes


def write_shard(job):
    """(path, split folder, [(image path, label)], class names, with .json) -> (file name, samples, bytes): one
    shard, written under a temporary name and renamed when whole."""
    import webdataset as wds
    path, root, samples, classes, with_json = job
    tmp = path.with_name(f'.{path.name}.tmp')
    with wds.TarWriter(str(tmp), encoder=False, mtime=0) as sink:  # mtime fixed: the same input, the same bytes
        for file, label in samples:
            rel = os.path.relpath(file, root)
            sample = {'__key__': sample_key(rel), image_ext(file): Path(file).read_bytes(), 'cls': str(label).encode()}
            if with_json:
                sample['json'] = json.dumps(dict(filename=rel, class_name=classes[label])).encode()
            sink.write(sample)
    os.replace(tmp, path)
    return path.name, len(samples), path.stat().st_size


def plan_split(out: Path, prefix: str, split: str, samples, target_bytes: float):
    """[(shard path, samples)]: near-equal counts, as many shards as make about target_bytes each."""
    total = sum(os.path.getsize(f) for f, _ in samples)
    n = max(1, min(len(samples), round(total / target_bytes)))
    digits = max(2, len(str(n - 1)))  # the Hub's: train-0000..1023, validation-00..63
    bounds = [len(samples) * i // n for i in range(n + 1)]
    return [(out / f'{prefix}-{split}-{i:0{digits}d}.tar', samples[bounds[i]:bounds[i + 1]]) for i in range(n)]


def check_out(out: Path, overwrite: bool, *patterns: str):
    """Files of OUT that a new shard set would replace: an error, or removed with --overwrite."""
    existing = sorted({path for pattern in patterns for path in out.glob(pattern)})
    if existing and not overwrite:
        fail(f'{existing[0]} already exists; pass --overwrite to replace the shard set in {out}')
    for path in existing:
        path.unlink()


def write_info(out: Path, info: dict):
    tmp = out / '._info.json.tmp'
    tmp.write_text(json.dumps(info, indent=1) + '\n')
    os.replace(tmp, out / '_info.json')


def progress(total: int, unit: str):
    from tqdm import tqdm  # a dependency of timm's huggingface_hub
    return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def make_shards(args):
    import numpy as np
    src, out = Path(args.src), Path(args.out)
    if not (src / 'train').is_dir():
        fail(f'{src} has no train/ folder (an ImageFolder: train/<class>/<image>, and val/)')
    prefix = args.prefix or src.resolve().name
    if not re.fullmatch(r'[A-Za-z0-9_.]+(-?[A-Za-z0-9_.]+)*', prefix):
        fail(f'--prefix {prefix!r}: use letters, digits, _ . and -')
    train, classes = list_split(src, 'train', None)
    rng = np.random.default_rng(args.seed)
    splits = {'train': (src / 'train', [train[i] for i in rng.permutation(len(train))])}
    if (src / 'val').is_dir():
        splits['validation'] = (src / 'val', list_split(src, 'val', classes)[0])
    for name, (root, samples) in splits.items():
        keys = [sample_key(os.path.relpath(f, root)) for f, _ in samples]
        if len(set(keys)) < len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            fail(f'{root}: two images share the sample key {dup!r} (names differing only in dots or extension)')
    out.mkdir(parents=True, exist_ok=True)
    check_out(out, args.overwrite, f'{prefix}-*.tar', '_info.json')
    info = dict(name=prefix, num_classes=len(classes), classes=list(classes), splits={})
    total = sum(len(s) for _, s in splits.values())
    with multiprocessing.Pool(args.workers) as pool, progress(total, 'img') as bar:
        for name, (root, samples) in splits.items():
            plan = plan_split(out, prefix, name, samples, args.shard_size * 1e6)
            written = {}
            jobs = [(p, root, s, classes, args.json) for p, s in plan]
            for file, count, size in pool.imap_unordered(write_shard, jobs):
                written[file] = count
                bar.update(count)
            files = [p.name for p, _ in plan]
            info['splits'][name] = dict(name=name, num_samples=len(samples), filenames=files,
                                        shard_lengths=[written[f] for f in files])
    write_info(out, info)
    counts = ', '.join(f'{s["num_samples"]} {n} images in {len(s["filenames"])} shards' for n, s in info['splits'].items())
    print(f'wrote {counts} ({len(classes)} classes) to {out}')


def count_shard(url: str) -> int:
    import wds_data
    from datasets import DataError
    try:
        return wds_data.count_samples(url)
    except DataError as err:
        return str(err)


def index_shards(args):
    """--write-info: _info.json for shards in the Hub's naming, by reading every shard once."""
    out = Path(args.write_info)
    if not out.is_dir():
        fail(f'--write-info {out}: not a folder')
    found = {}  # (prefix, split) -> [(index, file name)]
    for path in out.glob('*.tar'):
        m = SHARD_NAME.match(path.name)
        if m:
            found.setdefault((m['prefix'], m['split']), []).append((int(m['index']), path.name))
    if not found:
        fail(f'{out} holds no <prefix>-train-N.tar or <prefix>-validation-N.tar shards')
    prefixes = sorted({p for p, _ in found})
    if len(prefixes) > 1:
        fail(f'{out} holds shards of several sets ({", ".join(prefixes)}); give each its own folder')
    check_out(out, args.overwrite, '_info.json')
    info = dict(name=prefixes[0], splits={})
    files = {split: [name for _, name in sorted(shards)] for (_, split), shards in sorted(found.items())}
    with multiprocessing.Pool(args.workers) as pool, progress(sum(map(len, files.values())), 'shard') as bar:
        for split, names in files.items():
            counts = []
            for count in pool.imap(count_shard, [str(out / n) for n in names]):
                if isinstance(count, str):
                    fail(count)
                counts.append(count)
                bar.update(1)
            info['splits'][split] = dict(name=split, num_samples=sum(counts), filenames=names, shard_lengths=counts)
    write_info(out, info)
    print(f'wrote {out / "_info.json"}: ' + ', '.join(
        f'{s["num_samples"]} {n} samples in {len(s["filenames"])} shards' for n, s in info['splits'].items()))


def main(argv=None):
    args = parse_args(argv)
    index_shards(args) if args.write_info is not None else make_shards(args)


if __name__ == '__main__':
    main()
