"""wds_data.py: WebDataset shards as training and evaluation streams (each sample once per epoch across
ranks x workers, equal steps per rank, repeated augmentation across ranks, mid-epoch addressing), the
Hub's layout, every kind of bad shard, and main.py --data-set WDS end to end (the pretraining recipe,
exact resume, top-1 equal to the folder's in one process and under torchrun x2)."""
import collections
import json
import random
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import main
import wds_data
from datasets import DataError
from shardsets import folder_ids, hub_shards, pixels_id, write_tar
from tinyrun import (REPO, TINY, TORCHRUN, one_thread, parse, read_log, resume_and_compare, run_cli,
                     run_keeping_checkpoints, run_main)

sys.path.insert(0, str(REPO / 'scripts'))
import make_shards  # noqa: E402
import prepare_digits  # noqa: E402


def batches(stream, workers, batch):
    """[(ids, labels)] per batch of a DataLoader over `stream`, built as main.py builds it."""
    loader = DataLoader(stream, batch_size=batch, num_workers=workers, drop_last=stream.train)
    out = [(ids, labels.tolist()) for ids, labels in loader]
    assert len(out) == len(loader)  # the length the training loop plans with is the one it gets
    return out


def id_and_draw(img):
    """The image's identity and one draw from torch's generator, as an augmentation would draw."""
    return f'{pixels_id(img)}:{torch.rand(()).item():.8f}'


# ---- training streams ---------------------------------------------------------------------------
@pytest.mark.parametrize('batch, seen', [(3, 66), (4, 64)])
def test_each_train_sample_once_per_epoch_across_2_ranks_x_2_workers(photo_set, batch, seen):
    """66 images in shards of unequal length: with 33 per rank, batches of 3 see every image exactly once;
    batches of 4 see 64 once (2 sit out: the end of the epoch's shard order, other ones each epoch)."""
    photos, shards = photo_set
    truth = folder_ids(photos / 'train')
    split = wds_data.open_split(str(shards), True, pixels_id)
    assert len(split) == len(truth) == 66 and len(set(split.lengths)) > 1
    epochs = {}
    for epoch in (0, 1, 0):
        ranks = []
        for rank in (0, 1):
            stream = split.train_stream(batch, workers=2, world=2, rank=rank, seed=5)
            stream.set_epoch(epoch)
            ranks.append(batches(stream, 2, batch))
        assert len(ranks[0]) == len(ranks[1]) == 33 // batch  # the same steps on every rank (DDP lockstep)
        pairs = [(i, label) for rank in ranks for ids, labels in rank for i, label in zip(ids, labels)]
        assert len({i for i, _ in pairs}) == len(pairs) == seen  # no image twice
        assert all(truth[i] == label for i, label in pairs)  # with its folder's label
        if epoch in epochs:
            assert pairs == epochs[epoch]  # a function of (seed, epoch)
        epochs[epoch] = pairs
    assert [i for i, _ in epochs[0]] != [i for i, _ in epochs[1]]
    if seen < 66:
        assert {i for i, _ in epochs[0]} != {i for i, _ in epochs[1]}


def test_repeated_aug_copies_go_to_three_ranks_at_the_same_step(photo_set):
    """3 ranks x 2 workers: each image 3 times, once per rank, at the same step (or the next, at a batch
    boundary), each copy with its own draws; the draws do not depend on the worker count."""
    _, shards = photo_set
    split = wds_data.open_split(str(shards), True, id_and_draw)
    where = collections.defaultdict(list)  # image -> [(rank, step, draw)]
    draws = {}
    for workers in (2, 1):
        where.clear()
        for rank in range(3):
            stream = split.train_stream(6, workers=workers, world=3, rank=rank, seed=1, repeats=3)
            stream.set_epoch(2)
            for step, (ids, _) in enumerate(batches(stream, workers, 6)):
                for i in ids:
                    image, draw = i.split(':')
                    where[image].append((rank, step, draw))
        assert len(where) == 66
        for copies in where.values():
            ranks, steps, copy_draws = zip(*copies)
            assert sorted(ranks) == [0, 1, 2] and max(steps) - min(steps) <= 1 and len(set(copy_draws)) == 3
        draws[workers] = {image: sorted(d for _, _, d in copies) for image, copies in where.items()}
    assert draws[2] == draws[1]


def test_in_this_process_the_draws_leave_the_training_rngs_alone(photo_set):
    """Without loader workers the stream decodes in the training process: same draws as in workers, and
    the process's own generators (mixup, dropout) are where they were."""
    _, shards = photo_set
    split = wds_data.open_split(str(shards), True, id_and_draw)
    stream = split.train_stream(6, workers=0, seed=1, repeats=3)  # 198 copies: 3 of each image
    stream.set_epoch(1)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    before = random.random(), np.random.rand(), torch.rand(())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    here = [i for i, _ in stream]
    assert (random.random(), np.random.rand(), torch.rand(())) == before
    assert here == [i for ids, _ in batches(stream, 0, 6) for i in ids]
    in_workers = split.train_stream(6, workers=2, seed=1, repeats=3)  # 102 + 96 copies: 3 of each image
    in_workers.set_epoch(1)
    assert sorted(here) == sorted(i for ids, _ in batches(in_workers, 2, 6) for i in ids)


@pytest.mark.parametrize('repeats', [1, 3])
def test_mid_epoch_start_gives_the_rest_of_the_epoch(photo_set, repeats):
    """set_epoch(e, start_batch=k): the epoch's batches k.. exactly, images and draws (k odd: the
    DataLoader then starts at the worker that held batch k)."""
    _, shards = photo_set
    split = wds_data.open_split(str(shards), True, id_and_draw)
    stream = split.train_stream(4, workers=2, world=2, rank=1, seed=2, repeats=repeats)
    stream.set_epoch(3)
    full = batches(stream, 2, 4)
    stream.set_epoch(3, start_batch=5)
    assert batches(stream, 2, 4) == full[5:]
    with pytest.raises(ValueError, match='start_batch'):
        stream.set_epoch(3, start_batch=len(full) + 1)


# ---- evaluation streams -------------------------------------------------------------------------
@pytest.mark.parametrize('world', [1, 2, 3])
def test_eval_reads_each_sample_once_with_any_ranks_and_workers(photo_set, world):
    photos, shards = photo_set
    truth = folder_ids(photos / 'val')
    split = wds_data.open_split(str(shards), False, pixels_id)
    assert len(split) == len(truth) == 21 and len(split.lengths) > 1
    for workers in (0, 2):
        pairs = []
        for rank in range(world):
            stream = split.eval_stream(4, workers, world, rank)
            rank_pairs = [(i, label) for ids, labels in batches(stream, workers, 4) for i, label in zip(ids, labels)]
            assert len(rank_pairs) == len(stream) in (21 // world, 21 // world + 1)
            pairs += rank_pairs
        assert sorted(pairs) == sorted(truth.items())


# ---- the Hub's layout, and shards behind a command -----------------------------------------------
def test_hub_layout_and_pipe_commands(photo_set, tmp_path):
    """Shards named and laid out as timm/imagenet-1k-wds (written here with tarfile, not by make_shards),
    read from the folder and through a `pipe:` command with {} for the file name."""
    photos, _ = photo_set
    truth = hub_shards(tmp_path / 'hub', photos)
    with pytest.raises(DataError, match='pass --nb-classes'):  # the Hub's _info.json has no class count
        wds_data.open_split(str(tmp_path / 'hub'), True, pixels_id)
    for root in (str(tmp_path / 'hub'), f'pipe:cat {tmp_path / "hub"}/{{}}'):
        train = wds_data.open_split(root, True, pixels_id, nb_classes=4)
        assert train.names == ['imagenet1k-train-0000.tar', 'imagenet1k-train-0001.tar', 'imagenet1k-train-0002.tar']
        stream = train.train_stream(3, workers=0, seed=0)
        assert sorted((i, label) for ids, labels in batches(stream, 0, 3) for i, label in zip(ids, labels)) == \
            sorted(truth['train'].items())
        val = wds_data.open_split(root, False, pixels_id, nb_classes=4)
        assert val.names[-1] == 'imagenet1k-validation-01.tar'
        assert sorted(val.eval_stream(4, 0)) == sorted(truth['validation'].items())
    with pytest.raises(DataError, match='needs {}'):
        wds_data.open_split(f'pipe:cat {tmp_path / "hub"}', True, pixels_id, nb_classes=4)


# ---- bad shards: an error naming the shard and the sample, never a wrong label ----------------------
def good_members(photos, n=3):
    files = sorted((photos / 'val').rglob('*.jpg'))[:n]
    return [[(f'k{i}.cls', b'1'), (f'k{i}.jpg', f.read_bytes())] for i, f in enumerate(files)]


DEFECTS = {  # name -> (change to the samples' members, shard_lengths change, expected message part)
    'no .cls': (lambda s: s[1].pop(0), 0, 'sample k1: no .cls'),
    'no image': (lambda s: s[2].pop(1), 0, 'sample k2: no image'),
    '.cls out of range': (lambda s: s[1].__setitem__(0, ('k1.cls', b'4')), 0, 'sample k1: class 4 is outside 0..3'),
    '.cls not a number': (lambda s: s[0].__setitem__(0, ('k0.cls', b'cat')), 0, "sample k0: .cls holds b'cat'"),
    'broken image': (lambda s: s[1].__setitem__(1, ('k1.jpg', b'\xff\xd8\xff' + b'\0' * 50)), 0,
                     'cannot read image shard'),
    'fewer samples than listed': (lambda s: None, 1, 'ends after 3 samples (the last k2) where _info.json lists 4'),
    'more samples than listed': (lambda s: None, -1, 'holds more than the 2 samples _info.json lists (from k2)'),
}


@pytest.mark.parametrize('defect', sorted(DEFECTS))
def test_bad_sample_is_an_error_naming_shard_and_key(photo_set, tmp_path, defect):
    photos, _ = photo_set
    change, extra, message = DEFECTS[defect]
    samples = good_members(photos)
    change(samples)
    write_tar(tmp_path / 'set-validation-0.tar', [m for s in samples for m in s])
    info = {'splits': {'validation': {'filenames': ['set-validation-0.tar'], 'shard_lengths': [3 + extra]}},
            'num_classes': 4}
    (tmp_path / '_info.json').write_text(json.dumps(info))
    with pytest.raises(DataError) as err:
        list(wds_data.open_split(str(tmp_path), False, pixels_id).eval_stream(4, 0))
    assert message in str(err.value) and str(tmp_path / 'set-validation-0.tar') in str(err.value), str(err.value)


def test_truncated_shard_and_missing_info(photo_set, tmp_path):
    photos, shards = photo_set
    with pytest.raises(DataError, match=r'no _info.json in .*make_shards.py --write-info'):
        wds_data.open_split(str(photos), True, pixels_id)
    cut = tmp_path / 'cut'
    cut.mkdir()
    (cut / '_info.json').write_text((shards / '_info.json').read_text())
    first = json.loads((shards / '_info.json').read_text())['splits']['validation']['filenames'][0]
    data = (shards / first).read_bytes()
    (cut / first).write_bytes(data[:len(data) // 2 + 100])  # inside a member
    with pytest.raises(DataError, match=rf'cannot read shard {cut / first} after sample .*: unexpected end of data'):
        list(wds_data.open_split(str(cut), False, pixels_id).eval_stream(64, 0))


# ---- main.py --data-set WDS ---------------------------------------------------------------------
# the pretraining recipe's data, loss and optimizer flags (ThreeAugment, mixup/cutmix, BCE, repeated
# augmentation, LAMB), at a tiny scale; a lower EMA decay, so the EMA visibly differs from the model
RECIPE = ['--epochs', 3, '--lr', 4e-3, '--unscale-lr', '--opt', 'fusedlamb', '--weight-decay', 0.05, '--ThreeAugment',
          '--color-jitter', 0.3, '--mixup', .8, '--cutmix', 1.0, '--bce-loss', '--smoothing', 0.0, '--reprob', 0.0,
          '--drop-path', 0.05, '--repeated-aug', '--eval-crop-ratio', 1.0, '--dist-eval', '--model-ema-decay', 0.9]


def test_main_builds_the_streams_and_sets_their_epoch(photo_set):
    _, shards = photo_set
    argv = TINY + ['--data-set', 'WDS', '--data-path', shards, '--input-size', 48, '--batch', 4, '--num_workers', 2,
                   '--shuffle-buffer', 50]
    train, val, n_val, nb_classes = main.build_loaders(parse(argv), torch.device('cpu'))
    stream = train.dataset
    assert (n_val, nb_classes, len(val.dataset), val.dataset.train) == (21, 4, 21, False)
    assert (stream.train, stream.repeats, stream.buffer, stream.workers, stream.batches) == (True, 3, 50, 2, 49)
    main.set_epoch(train, 7)
    assert stream.epoch == 7
    train, *_ = main.build_loaders(parse(argv + ['--no-repeated-aug']), torch.device('cpu'))
    assert (train.dataset.repeats, len(train)) == (1, 16)


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """(digits folder, its shards)."""
    root = tmp_path_factory.mktemp('digits')
    prepare_digits.main(['--out', str(root / 'folder')])
    make_shards.main(['--src', str(root / 'folder'), '--out', str(root / 'shards'), '--shard-size', '0.2',
                      '--workers', '2'])
    return root / 'folder', root / 'shards'


@pytest.fixture(scope='module')
def pretrain(digits, tmp_path_factory):
    """The pretraining recipe (ThreeAugment, mixup/cutmix, BCE, repeated augmentation), 3 epochs from the
    digits' shards, a loader worker, a checkpoint every 7 optimizer steps (mid-epoch)."""
    out = tmp_path_factory.mktemp('pretrain')
    argv = TINY + ['--data-set', 'WDS', '--data-path', digits[1], '--output_dir', out] + RECIPE + [
        '--batch', 64, '--num_workers', 1, '--save-interval', 7]
    return out, argv, run_keeping_checkpoints(argv)


def test_pretraining_recipe_from_shards_resumes_exactly(pretrain, tmp_path):
    out, argv, stdout = pretrain
    log = read_log(out)
    assert [e['epoch'] for e in log] == [0, 1, 2] and log[2]['train_loss'] < log[0]['train_loss']
    assert 'Epoch: [0] [19/20]' in stdout  # 1437 digits: 1280 per epoch with repeated augmentation
    resume_and_compare(argv, out, 1, tmp_path)
    resume_and_compare(argv, out, 1, tmp_path, batch=8)  # the run's 28th step: mid-epoch, the stream skips 8 batches


def test_eval_top1_on_shards_equals_the_folders(pretrain, digits):
    ckpt = pretrain[0] / 'checkpoint.pth'
    folder = run_main(TINY + ['--data-path', digits[0], '--eval', '--resume', ckpt, '--batch', 64])[0]
    for pipeline in ('cpu', 'gpu'):
        shards = run_main(TINY + ['--data-set', 'WDS', '--data-path', digits[1], '--eval', '--resume', ckpt,
                                  '--batch', 64, '--data-pipeline', pipeline])[0]
        assert shards['n'] == folder['n'] == 360 and shards['acc1'] == folder['acc1']
        # the same images with the same labels: any other pairing would move the mean loss far more
        assert shards['loss'] == pytest.approx(folder['loss'], rel=1e-6)  # summed in another order


def test_device_pipeline_from_shards_resumes_exactly(photo_set, tmp_path):
    """--data-pipeline gpu (on the CPU here), on the photos: the workers' draws come from the per-image
    seeds too."""
    out = tmp_path / 'run'
    argv = TINY + ['--data-set', 'WDS', '--data-path', photo_set[1], '--output_dir', out] + RECIPE + [
        '--input-size', 48, '--batch', 16, '--epochs', 2, '--data-pipeline', 'gpu', '--num_workers', 1,
        '--save-interval', 2]
    run_keeping_checkpoints(argv)
    resume_and_compare(argv, out, 0, tmp_path)
    resume_and_compare(argv, out, 0, tmp_path, batch=2)


def cli_error(argv, capsys):
    capsys.readouterr()
    with one_thread():
        rc = main.cli([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith('error: ') and '\n' not in err and 'Traceback' not in err, err
    return err


def test_bad_shard_sets_end_main_with_one_line(photo_set, tmp_path, capsys):
    photos, shards = photo_set
    wds = TINY + ['--data-set', 'WDS', '--input-size', 48, '--batch', 4, '--epochs', 1]
    assert 'no _info.json' in cli_error(wds + ['--data-path', photos], capsys)
    assert 'needs --data-path' in cli_error(wds, capsys)
    hub_shards(tmp_path / 'hub', photos)
    assert 'pass --nb-classes' in cli_error(wds + ['--data-path', f'{tmp_path}/hub/{{}}'], capsys)
    # a label out of range, met in a loader worker: the one line still names the shard and the key
    broken = tmp_path / 'broken'
    broken.mkdir()
    info = json.loads((shards / '_info.json').read_text())
    info['num_classes'] = 3  # the photo set has 4
    (broken / '_info.json').write_text(json.dumps(info))
    for name in info['splits']['train']['filenames'] + info['splits']['validation']['filenames']:
        (broken / name).symlink_to(shards / name)
    err = cli_error(wds + ['--data-path', broken, '--num_workers', 1, '--no-repeated-aug'], capsys)
    assert 'class 3 is outside 0..2' in err and f'shard {broken}/photos-' in err and ', sample ' in err


def test_torchrun_x2_trains_from_shards_and_evaluates_as_the_folder(photo_set, tmp_path):
    """2 ranks x 2 loader workers on photo shards of unequal length (ranks in lockstep, or DDP would hang),
    repeated augmentation. Top-1 on the shards equals the folder's in one process, whether rank 0 evaluates
    the whole set alone (the training run) or both ranks evaluate their share (--dist-eval: 21 images in
    3 shards over 2 ranks)."""
    photos, shards = photo_set
    out = tmp_path / 'out'
    common = TINY + ['--input-size', 48, '--batch', 4]
    wds = common + ['--data-set', 'WDS', '--data-path', shards]
    # rank 0 alone evaluates: the default where --dist-eval is a switch, --no-dist-eval where it is on by default
    alone = [f for f in ('--no-dist-eval',) if f in main.get_args_parser()._option_string_actions]
    proc = run_cli(wds + ['--output_dir', out, '--epochs', 1, '--num_workers', 2, '--repeated-aug', '--ThreeAugment',
                          '--lr', 5e-3, '--unscale-lr'] + alone, launcher=TORCHRUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Epoch: [0] [23/24]' in proc.stdout  # 66 images x 3 copies: 24 steps of 4 per rank
    [entry] = read_log(out)
    ckpt = out / 'checkpoint.pth'
    dist = run_cli(wds + ['--eval', '--resume', ckpt, '--dist-eval'], launcher=TORCHRUN)
    assert dist.returncode == 0, dist.stderr[-3000:]
    folder, _ = run_main(common + ['--data-path', photos, '--eval', '--resume', ckpt])
    one, _ = run_main(wds + ['--eval', '--resume', ckpt])
    assert folder['n'] == one['n'] == 21 and entry['test_acc1'] == folder['acc1'] == one['acc1']
    assert f'Acc@1 {folder["acc1"]:.3f} ' in dist.stdout and f'loss {folder["loss"]:.3f}' in dist.stdout
    assert entry['test_loss'] == pytest.approx(folder['loss'], rel=1e-6) == one['loss']
