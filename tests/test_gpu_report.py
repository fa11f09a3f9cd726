"""scripts/gpu_report.py: the whole report at its tiny CPU settings, the time budget, and the goal table."""
import json
import re
import sys
from types import SimpleNamespace

from tinyrun import REPO, run_cli

sys.path.insert(0, str(REPO / 'scripts'))
import gpu_report  # noqa: E402


# The report starts no section once its budget is spent (at tiny settings a section needs ~1 s to start), and
# a tiny section takes well under a minute, so the run ends long before the test's timeout; the test asserts
# the exact status of every section that ran, and that only the budget left any out.
BUDGET_S = 240
EXPECTED = dict(env='info', correctness='pass', sync='info', cuda_paths='info', table_eager='info', main_nccl='pass', optimizer='info',
                table_compiled='pass', knobs='info', cudagraphs='skipped')


def test_every_section_runs_on_cpu(tmp_path):
    proc = run_cli(['--out', tmp_path, '--budget-s', BUDGET_S], timeout=2 * BUDGET_S, script='scripts/gpu_report.py')
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / 'gpu_report.json').read_text())
    sections = report['sections']
    status = {name: s['status'] for name, s in sections.items()}
    assert list(status) == [name for name, _, _ in gpu_report.SECTIONS] == list(EXPECTED)
    ran = [name for name in status if 'were left' not in sections[name]['md']]
    assert ran == list(status)[:len(ran)] and ran, status  # the budget leaves out the tail, never the first
    for name in status:
        if name not in ran:  # started too late: under a second of the budget was left
            left = float(re.search(r'needs ~1 s, (-?[\d.]+) s were left', sections[name]['md']).group(1))
            assert left < 1 and report['config']['elapsed_s'] >= BUDGET_S - 1, name
    assert {name: status[name] for name in ran} == {name: EXPECTED[name] for name in ran}
    assert report['config']['tiny'] and report['goals'] == []  # goals are judged at full GPU settings only
    if 'correctness' in ran:
        checks = sections['correctness']['details']['checks']
        assert set(checks) == {'bf16 autocast vs float32 (SDPA)', 'SDPA vs explicit softmax, float32',
                               'SDPA vs explicit softmax, bf16'} and all(c['ok'] for c in checks.values())
    if 'sync' in ran:
        assert sections['sync']['details']['ok'] and sections['sync']['details']['ddp']['ok']
    if 'cuda_paths' in ran:
        paths = sections['cuda_paths']['details']  # the sync count itself needs CUDA
        assert all(c['ok'] for c in paths.values()) and paths['loader']['syncs'] is None
        assert paths['rope_cache_ddp']['cache_entries'] == dict(model=1, ema=1)
        assert paths['rope_cache_ddp']['broadcast_buffers'] is False
    if 'table_eager' in ran:
        table = sections['table_eager']['details']['tables']['vit5_small@32']['models']
        assert set(table) == {'vit_small_patch16_224', 'vit5_small'}
        assert all(m['step_img_s'] > 0 and m['train_img_s'] > 0 and 'step_mfu' in m for m in table.values())
    if 'table_compiled' in ran:
        assert sections['table_compiled']['details']['sync']['ok']
        compiled = sections['table_compiled']['details']['tables']['vit5_small@32']['config']
        assert (compiled['compile_mode'], compiled['compile_backend']) == ('default', 'aot_eager')
    if 'main_nccl' in ran:
        assert 'gloo process group of one' in sections['main_nccl']['md']
        assert sections['main_nccl']['details']['log'][0]['train_loss'] > 0
    if 'optimizer' in ran:
        assert len(sections['optimizer']['details']['vit5_small@32']) == 6
    if 'knobs' in ran:
        knobs = sections['knobs']['details']
        assert set(knobs) == {'TF32', 'SDPA backend', 'fused AdamW (--opt adamw)', 'DDP, 1 process'}
        assert knobs['SDPA backend']['models']['math']['sdpa_kernel'] == 'math'
    md = (tmp_path / 'gpu_report.md').read_text()
    assert all(f'## {name}: ' in md for name in status)


def test_sections_that_do_not_fit_the_budget_are_named_with_their_command(tmp_path):
    proc = run_cli(['--out', tmp_path / 'r', '--budget-s', 0, '--sections', 'env', 'knobs'], timeout=120,
                   launcher=('bash',), script='scripts/gpu_report.sh', env={'PYTHON': sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    sections = json.loads((tmp_path / 'r' / 'gpu_report.json').read_text())['sections']
    assert list(sections) == ['env', 'knobs'] and {s['status'] for s in sections.values()} == {'skipped'}
    assert f'--sections knobs --out {tmp_path / "r"}_knobs' in sections['knobs']['md']


def step_table(ours_img_s, timm_img_s, ours_mem, timm_mem, mfu):
    row = lambda img_s, mem: dict(step_img_s=img_s, step_peak_mem_mb=mem, step_mfu=mfu)  # noqa: E731
    return lambda ours, timm_name: dict(models={ours: dict(row(ours_img_s, ours_mem), step_ratio=ours_img_s / timm_img_s),
                                                timm_name: row(timm_img_s, timm_mem)})


def test_goals_compare_the_measured_step_with_the_issue():
    small, base = gpu_report.FULL.pairs
    eager = step_table(3600, 3700, 1050, 1000, 0.2)
    compiled = step_table(9000, 9100, 1200, 1000, 0.5)
    report = SimpleNamespace(scale=gpu_report.FULL, args=SimpleNamespace(compile_mode='default'), sections=dict(
        table_eager=dict(details=dict(tables={'vit5_small@224': eager('vit5_small', small[0])})),
        table_compiled=dict(details=dict(tables={'vit5_base@192': compiled('vit5_base', base[0])},
                                         sync=dict(ok=True))),
        sync=dict(details=dict(ok=False))))
    rows = {g['goal']: (round(g['value'], 3), g['target'], g['ok']) for g in gpu_report.goals(report)}
    assert rows == {
        'vit5_small@224 eager: speed / timm': (0.973, 0.95, True),
        'vit5_small@224 eager: peak memory / timm': (1.05, 1.1, True),
        'vit5_small@224 eager: img/s': (3600, 3500, True),
        'vit5_base@192 compiled (default): speed / timm': (0.989, 0.95, True),
        'vit5_base@192 compiled (default): peak memory / timm': (1.2, 1.1, False),
        'vit5_base@192 compiled (default): MFU': (0.5, 0.45, True),
        'sync: no sync between log steps': (0.0, 1.0, False),
        'table_compiled: no sync between log steps': (1.0, 1.0, True),
    }
