"""scripts/benchmark.py on tiny inputs: the table, the JSON fields, and its errors."""
import json
import sys

import pytest

from tinyrun import REPO, run_cli

sys.path.insert(0, str(REPO / 'scripts'))
import benchmark  # noqa: E402

MODELS = ['vit5_tiny', 'deit3_small_patch16_224']  # one of ours, one of timm's


def test_benchmark_reports_throughput_memory_flops_and_ratios(tmp_path):
    out = tmp_path / 'bench.json'
    proc = run_cli(['--models', *MODELS, '--img-size', 32, '--batch-size', 2, '--steps', 1, '--warmup', 1,
                    '--rounds', 2, '--peak-tflops', 1, '--json', out], timeout=120, script='scripts/benchmark.py')
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in MODELS)  # the table
    res = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == res  # the same blob on stdout
    cfg = res['config']
    assert (cfg['device'], cfg['amp_dtype'], cfg['batch_size'], cfg['img_size'], cfg['rounds']) == \
        ('cpu', 'float32', 2, 32, 2)
    assert list(res['models']) == MODELS
    for name, m in res['models'].items():
        assert m['params_m'] > 1 and m['gflops_per_img'] > 0
        for mode in ('train', 'infer'):
            assert len(m[f'{mode}_img_s_rounds']) == 2 and m[f'{mode}_img_s'] > 0
            assert m[f'{mode}_peak_mem_mb'] >= 0 and 0 < m[f'{mode}_mfu'] < 1
    first = res['models'][MODELS[0]]
    assert first['train_ratio'] == first['infer_ratio'] == 1.0
    second = res['models'][MODELS[1]]
    per_round = [b / a for a, b in zip(first['train_img_s_rounds'], second['train_img_s_rounds'])]
    assert second['train_ratio'] == pytest.approx(sum(per_round) / 2)  # median of two rounds
    # a 32 px DeiT-S forward: 4 patches + cls, 12 blocks of 384-wide matmuls, ~0.2 GFLOPs
    assert 0.1 < second['gflops_per_img'] < 0.4


def test_benchmark_unknown_model_is_a_one_line_error():
    with pytest.raises(SystemExit) as exc:
        benchmark.main(['--models', 'vit5_tiny', 'no_such_model'])
    msg = str(exc.value.code)
    assert 'no_such_model' in msg and 'vit5_tiny' not in msg and '\n' not in msg


def test_benchmark_help_lists_every_flag():
    text = benchmark.get_args_parser().format_help()
    for flag in ('--models', '--device', '--amp-dtype', '--batch-size', '--img-size', '--compile', '--steps',
                 '--warmup', '--rounds', '--mode', '--peak-tflops', '--json'):
        assert flag in text
