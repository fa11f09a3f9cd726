"""scripts/benchmark.py on tiny inputs: the table, the JSON fields, the recipe step, and its errors."""
import json
import sys

import pytest
import torch

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
    assert cfg['modes'] == ['step', 'train', 'infer'] and '--opt fusedlamb' in cfg['recipe']
    for name, m in res['models'].items():
        assert m['params_m'] > 1 and m['gflops_per_img'] > 0 and m['sdpa_kernel'] == 'flash (CPU)'
        for mode in ('step', 'train', 'infer'):
            assert len(m[f'{mode}_img_s_rounds']) == 2 and m[f'{mode}_img_s'] > 0
            assert m[f'{mode}_peak_mem_mb'] >= 0 and 0 < m[f'{mode}_mfu'] < 1
    first = res['models'][MODELS[0]]
    assert first['train_ratio'] == first['infer_ratio'] == 1.0
    second = res['models'][MODELS[1]]
    per_round = [b / a for a, b in zip(first['train_img_s_rounds'], second['train_img_s_rounds'])]
    assert second['train_ratio'] == pytest.approx(sum(per_round) / 2)  # median of two rounds
    # a 32 px DeiT-S forward: 4 patches + cls, 12 blocks of 384-wide matmuls, ~0.2 GFLOPs
    assert 0.1 < second['gflops_per_img'] < 0.4


TINY = ['--model-kwargs', 'depth=2', 'embed_dim=48', 'num_heads=2', '--img-size', 32, '--batch-size', 4,
        '--steps', 1, '--warmup', 1, '--rounds', 1]


def bench_args(argv):
    return benchmark.get_args_parser().parse_args([str(a) for a in argv])


def test_step_entries_run_mains_optimizer_ema_and_compile(capsys):
    """Entries of one model with other main.py flags, compiled (capture only: aot_eager), plus the
    optimizer and EMA alone."""
    args = bench_args(['--models', 'vit5_tiny', *TINY, '--mode', 'step', 'opt', 'ema', '--compile-mode', 'default',
                       '--compile-backend', 'aot_eager'])
    entries = [benchmark.Entry('vit5_tiny'), benchmark.Entry('vit5_tiny', 'adamw fused', ['--opt', 'adamw', '--opt-fused'])]
    compiled = []
    real_compile = torch.compile
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, 'compile', lambda m, **kw: compiled.append(kw) or real_compile(m, **kw))
        out = benchmark.benchmark(args, entries)
    assert compiled == [{'backend': 'aot_eager'}] * 2
    lamb, adamw = out['models']['vit5_tiny'], out['models']['adamw fused']
    assert adamw['main_args'] == '--opt adamw --opt-fused' and adamw['model'] == 'vit5_tiny'
    for m in (lamb, adamw):
        assert m['step_img_s'] > 0 and m['opt_ms'] > 0 and m['ema_ms'] > 0 and 'train_img_s' not in m
    assert out['config']['compile_mode'] == 'default' and out['config']['compile_backend'] == 'aot_eager'
    assert "timm's LAMB" in capsys.readouterr().err  # main.py's notice, kept off stdout


def test_step_parts_are_what_main_builds():
    args = bench_args(['--models', 'vit5_tiny', *TINY])
    benchmark.resolve(args)
    recipe = benchmark.Runner(benchmark.Entry('vit5_tiny'), args, torch.device('cpu'), torch.float32)
    parts = recipe.recipe_parts()
    assert type(parts['optimizer']).__name__ == 'Lamb' and parts['ema'].decay == 0.99996
    assert parts['mixup_fn'].mixup_alpha == 0.8 and parts['mixup_fn'].cutmix_alpha == 1.0
    assert type(parts['criterion'].base_criterion).__name__ == 'BinaryTargetBCE'
    assert recipe.eager.blocks[0].drop_path.drop_prob == 0.05
    fused = benchmark.Runner(benchmark.Entry('vit5_tiny', 'f', ['--opt', 'adamw', '--opt-fused']), args,
                             torch.device('cpu'), torch.float32)
    assert fused.recipe_parts()['optimizer'].defaults['fused']


def test_sdpa_backend_is_named_and_can_be_forced():
    args = bench_args(['--models', 'vit5_tiny', *TINY, '--mode', 'infer'])
    benchmark.resolve(args)
    assert benchmark.Runner(benchmark.Entry('vit5_tiny'), args, torch.device('cpu'), torch.float32).sdpa_kernel() \
        == 'flash (CPU)'
    forced = benchmark.Runner(benchmark.Entry('vit5_tiny', sdpa_backend='math'), args, torch.device('cpu'),
                              torch.float32)
    assert forced.sdpa_kernel() == 'math'


@pytest.mark.parametrize('argv, message', [
    (['--models', 'vit5_tiny', 'no_such_model'], 'no_such_model'),
    (['--models', 'vit5_tiny', '--mode', 'step', '--batch-size', 3], 'even --batch-size'),
])
def test_benchmark_errors_are_one_line(argv, message):
    with pytest.raises(SystemExit) as exc:
        benchmark.main([str(a) for a in argv])
    msg = str(exc.value.code)
    assert message in msg and '\n' not in msg


def test_benchmark_help_lists_every_flag_with_a_description():
    parser = benchmark.get_args_parser()
    text = parser.format_help()
    for flag in ('--models', '--device', '--amp-dtype', '--batch-size', '--img-size', '--compile', '--steps',
                 '--warmup', '--rounds', '--mode', '--peak-tflops', '--json', '--compile-mode', '--main-args',
                 '--sdpa-backend', '--ddp', '--model-kwargs'):
        assert flag in text
    for action in parser._actions:  # every option the parser has, not only those above
        assert action.help and all(s in text for s in action.option_strings), action.option_strings
