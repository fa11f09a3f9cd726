"""Two CPU processes under torchrun (gloo): training, exact distributed evaluation, joint stops."""
import json
import sys

import pytest
import torch.distributed as dist

from tinyrun import TINY, make_image_folder, read_log, run_cli, run_main

TORCHRUN = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2')

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason='needs torch.distributed with gloo')


def test_torchrun_train_and_dist_eval_equals_single_process(tmp_path):
    # 7 validation images: no split over 2 ranks is even, so padding would show
    data = make_image_folder(tmp_path / 'data', train_per_class=(6, 5, 5), val_per_class=(3, 2, 2))
    out = tmp_path / 'out'
    proc = run_cli(TINY + ['--data-path', data, '--output_dir', out, '--epochs', 1, '--accum_iter', 2,
                           '--repeated-aug', '--dist-eval', '--lr', 5e-3, '--unscale-lr'], launcher=TORCHRUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('Accuracy of the network on the 7 test images') == 1  # rank 0 alone prints
    [entry] = read_log(out)  # one writer: one line per epoch
    single, _ = run_main(TINY + ['--data-path', data, '--eval', '--resume', out / 'checkpoint.pth'])
    assert entry['test_acc1'] == single['acc1'] and single['n'] == 7
    assert entry['test_loss'] == pytest.approx(single['loss'], rel=1e-6)
    assert entry['test_loss_ema'] == pytest.approx(run_main(
        TINY + ['--data-path', data, '--eval', '--resume', out / 'checkpoint.pth', '--load_ema'])[0]['loss'], rel=1e-6)


def test_rank0_only_eval_and_nonfinite_loss_stops_all_ranks(tmp_path):
    proc = run_cli([], launcher=TORCHRUN, script='tests/dist_worker.py', env={'RESULT_DIR': str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1))
    assert r0['eval_forwards'] == 4 and r1['eval_forwards'] == 0 and r0['acc1'] == r1['acc1']
    # NaN on rank 1 only, yet both stop together, at the epoch's last (log) step, naming where it appeared
    assert r0['stopped'] == r1['stopped'] and 'epoch 0, step 2 (rank 1)' in r0['stopped']
    assert 'stopped on every rank at step 3' in r0['stopped']
