"""scripts/benchmark_data.py on a tiny photo folder: every measurement, its JSON, and its errors."""
import json
import sys

import pytest

from tinyrun import REPO, run_cli

sys.path.insert(0, str(REPO / 'scripts'))
import benchmark_data  # noqa: E402
import make_photo_folder  # noqa: E402
import make_shards  # noqa: E402


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    out = tmp_path_factory.mktemp('photos')
    make_photo_folder.main(['--out', str(out), '--train', '12', '--val', '4', '--min-side', '40', '--max-side', '80',
                            '--odd', '0.25'])
    make_shards.main(['--src', str(out), '--out', str(out / 'shards'), '--shard-size', '0.01', '--workers', '1'])
    return out


def test_all_measurements_as_a_command(photos, tmp_path):
    out = tmp_path / 'data.json'
    proc = run_cli(['--data', photos, '--input-size', 32, '--batch-size', 4, '--workers', 0, 1, '--images', 4,
                    '--rounds', 1, '--batches', 2, '--warmup', 1, '--model', 'vit5_tiny', '--json', out,
                    '--shards', photos / 'shards', '--open-delay', 1], timeout=300, script='scripts/benchmark_data.py')
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == res  # the same blob on stdout
    cfg = res['config']
    assert (cfg['images'], cfg['input_size'], cfg['batch_size'], cfg['device']) == (12, 32, 4, 'cpu')
    assert set(res['per_core']) == {'decode', 'cpu_recipe', 'cpu_eval', 'gpu_worker', 'gpu_worker_eval',
                                    'device_stage', 'gpu_worker_vs_cpu_recipe', 'gpu_worker_eval_vs_cpu_recipe'}
    assert all(v > 0 for v in res['per_core'].values())
    cost = res['batch_cost']
    assert cost['cpu_kb_per_img'] == 12.0 and 0 < cost['gpu_kb_per_img'] < 30 and cost['device_gflop_per_img'] > 0
    assert {p: set(r) for p, r in res['loaders'].items()} == dict.fromkeys(('cpu', 'gpu_workers', 'gpu'), {'0', '1'})
    assert all(v > 0 for r in res['loaders'].values() for v in r.values())
    train = res['training']
    assert train['workers'] == 1 and train['synthetic'] > 0
    assert train['cpu_ratio'] == pytest.approx(train['cpu'] / train['synthetic'])
    assert train['gpu_ratio'] == pytest.approx(train['gpu'] / train['synthetic'])
    storage = res['storage']  # folder vs shards, per worker, without and with the open latency
    assert set(storage) == {f'{p}, {d} ms, {w} workers' for p in ('read', 'cpu', 'gpu_workers') for d in (0, 1)
                            for w in (1,)}  # worker processes' CPU time: no entry for 0 workers
    assert all(r['folder'] > 0 and r['shards_vs_folder'] == pytest.approx(r['shards'] / r['folder'])
               for r in storage.values())
    assert 'per core  cpu_recipe' in proc.stdout and 'training  synthetic' in proc.stdout  # the table
    assert 'storage   read, 1 ms, 1 workers' in proc.stdout


def test_loader_batches_are_ready_for_the_model(photos):
    """What the loader measurement iterates: normalised batches of the recipe, on either pipeline."""
    args = benchmark_data.parse_args(['--data', str(photos), '--input-size', '32', '--batch-size', '4', '--seed', '1'])
    import torch
    from utils import seed_everything
    for pipeline in ('cpu', 'gpu'):
        # 4 small crops can be all dark or all bright (5 of 80 unseeded draws were): a fixed draw that spans 0
        # (the images and the device half's draws from the global seed, each image's crop from --seed)
        seed_everything(1)
        images, targets = next(iter(benchmark_data.make_loader(args, pipeline, 0, torch.device('cpu'), 1)))
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and targets.shape == (4,)
        assert -2.2 < images.min() < 0 < images.max() < 2.7  # ImageNet-normalised pixels


def test_folder_loader_seeds_each_image_as_main_py(photos):
    """The folder side of the storage comparison is main.py's loader: a seeded order, and per-image seeds for
    the draws (the shard stream pays for its seeds too), so an epoch is the same whatever the global RNG."""
    import torch
    args = benchmark_data.parse_args(['--data', str(photos), '--input-size', '32', '--batch-size', '4'])
    batches = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        pixels, params, targets = next(iter(benchmark_data.make_loader(args, 'gpu_workers', 0, torch.device('cpu'))))
        batches.append((pixels, params, targets))
    assert all(torch.equal(a, b) for a, b in zip(*batches))


@pytest.mark.parametrize('argv, message', [
    (['--data', 'nowhere'], 'no train/ folder'),
    (['--workers', '-1'], '--workers'),
    (['--device', 'nonsense'], '--device'),
    (['--skip', 'per_core', 'loaders', '--model', 'no_such_model'], 'no_such_model'),
    (['--shards', 'nowhere'], 'has no _info.json'),
    (['--open-delay', '-1'], '--open-delay'),
])
def test_errors_are_one_line(argv, message, photos, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark_data.main(['--data', str(photos), *argv])
    err = capsys.readouterr().err + (exc.value.code if isinstance(exc.value.code, str) else '')
    assert exc.value.code != 0 and len(err.strip().splitlines()) == 1 and message in err, err


def test_help_lists_every_flag_with_a_description():
    parser = benchmark_data.get_args_parser()
    text = parser.format_help()
    for flag in ('--data', '--input-size', '--batch-size', '--workers', '--device', '--images', '--rounds',
                 '--batches', '--warmup', '--skip', '--model', '--compile', '--json'):
        assert flag in text
    for action in parser._actions:  # every option the parser has, not only those above
        assert action.help and all(s in text for s in action.option_strings), action.option_strings
