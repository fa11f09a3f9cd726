"""A user's run is never lost or silently changed: a resume continues the run in the checkpoint (its settings
unless given, one line naming what the user changed), a fine-tune takes the model the file holds, and no
training command writes over another run's files."""
import hashlib
import math
import shutil
import types

import pytest
import torch

import checkpoint
import main
from tinyrun import (TINY, assert_same_run_state, make_image_folder, one_thread, read_log, run_cli,
                     run_keeping_checkpoints, run_main)

# the machine's flags: what a user types on every command (TINY less its model and recipe)
MACHINE = ['--device', 'cpu', '--num_workers', 0]
# a recipe far from main.py's defaults (batch 64, mixup/cutmix, 300 epochs, lr 5e-4, seed 42, ...)
RECIPE = TINY + ['--epochs', 3, '--lr', 2e-3, '--mixup', 0, '--cutmix', 0, '--smoothing', 0.05, '--reprob', 0,
                 '--aa', 'none', '--seed', 7, '--model-ema-decay', 0.9, '--weight-decay', 0.01]


@pytest.fixture(scope='module')
def run(data, tmp_path_factory):
    """The recipe's 3 epochs, with a copy of each epoch's checkpoint (checkpoint.pth.epochN)."""
    out = tmp_path_factory.mktemp('run')
    argv = RECIPE + ['--data-path', data, '--output_dir', out]
    run_keeping_checkpoints(argv)
    return types.SimpleNamespace(out=out, argv=argv)


def digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def cli(argv, capsys):
    """main.py's command line in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with one_thread():
        code = main.cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_resume_given_only_the_checkpoint_continues_the_same_run_exactly(run, tmp_path):
    """`main.py --resume CKPT` with the machine's flags alone: model, recipe, data, seed and output folder come
    from the checkpoint, and the run ends bit-identical to the one that never stopped."""
    out = tmp_path / 'continued'
    out.mkdir()
    shutil.copy(run.out / 'checkpoint.pth.epoch0', out / 'checkpoint.pth')
    _, stdout = run_main(['--resume', out / 'checkpoint.pth', *MACHINE])
    assert (f'Resuming {out / "checkpoint.pth"} with the settings it was trained with, writing to {out}; '
            f'no setting changed') in stdout
    assert 'Training for 3 epochs from epoch 1' in stdout
    assert_same_run_state(run.out / 'checkpoint.pth', out / 'checkpoint.pth')
    assert read_log(out) == read_log(run.out)[1:]


def test_a_finished_run_is_never_overwritten_by_a_resume_missing_its_flags(run, data):
    """The issue's command: the training flags left out. It used to train main.py's defaults for 300 epochs
    over the finished run's files; now it says there is nothing left to train, and touches nothing."""
    before = digest(run.out)
    proc = run_cli(['--resume', run.out / 'checkpoint.pth', '--data-set', 'FOLDER', '--data-path', data,
                    '--output_dir', run.out, *MACHINE])
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr == (f'error: nothing left to train: {run.out / "checkpoint.pth"} already finished epoch 2, '
                           f'the last of --epochs 3; raise --epochs to train further, or evaluate it with --eval '
                           f'--resume {run.out / "checkpoint.pth"}\n')
    assert digest(run.out) == before


def test_a_resume_lists_what_the_user_changed_and_follows_it(run, tmp_path):
    """Given flags win and are named in one line: a longer run (--epochs) rebuilds the lr schedule for 5
    epochs, a new --weight-decay is the optimizer's; everything not given stays the checkpoint's."""
    out = tmp_path / 'longer'
    out.mkdir()
    shutil.copy(run.out / 'checkpoint.pth', out / 'checkpoint.pth')
    _, stdout = run_main(['--resume', out / 'checkpoint.pth', *MACHINE, '--epochs', 5, '--weight-decay', 0.02,
                          '--batch', 8])  # the same batch: not a change
    assert (f'Resuming {out / "checkpoint.pth"} with the settings it was trained with, writing to {out}; changed: '
            f'--weight-decay 0.01 -> 0.02, --epochs 3 -> 5 (the lr schedule is rebuilt for them)') in stdout
    saved = checkpoint.load_checkpoint(str(out / 'checkpoint.pth'))
    first = checkpoint.load_checkpoint(str(run.out / 'checkpoint.pth'))['args']
    args = saved['args']
    for key in main.RUN_SETTINGS:
        if key not in ('epochs', 'weight_decay', 'lr'):
            assert getattr(args, key) == getattr(first, key), key
    assert args.lr == pytest.approx(first.lr)  # the same --lr through the batch-size rule again
    assert [e['epoch'] for e in read_log(out)] == [3, 4]
    groups = saved['optimizer']['param_groups']
    assert {g['weight_decay'] for g in groups} == {0.0, 0.02}  # (no decay on norms and biases)
    # epoch 4 trained at the 5-epoch cosine's value (3 epochs' schedule would have ended at --min-lr)
    lr, low, warm = first.lr, first.min_lr, first.warmup_epochs
    cosine = low + 0.5 * (lr - low) * (1 + math.cos(math.pi * 4 / 5))
    assert read_log(out)[-1]['train_lr'] == pytest.approx(cosine) and warm == 1


def test_no_training_command_writes_over_another_run(run, data, capsys):
    """A new run, a fine-tune, or a resume of an older checkpoint into a folder holding a run: one line, exit 2,
    the run's files untouched."""
    before = digest(run.out)
    last = run.out / 'checkpoint.pth'
    for argv, what in (
            (RECIPE + ['--data-path', data, '--output_dir', run.out], 'a new run'),
            (['--finetune', last, '--data-set', 'FOLDER', '--data-path', data, '--output_dir', run.out, *MACHINE],
             'a new run'),
            (['--resume', run.out / 'checkpoint.pth.epoch0', *MACHINE], f'resuming {run.out}/checkpoint.pth.epoch0')):
        code, _, err = cli(argv, capsys)
        assert code == 2 and err == (
            f'error: --output_dir {run.out} holds a run (checkpoint.pth, previous_checkpoint.pth, '
            f'best_checkpoint.pth, log.txt) that {what} would overwrite: continue that run with --resume {last} '
            f'(or --auto-resume), or write to another --output_dir\n'), err
    assert digest(run.out) == before


def test_finetune_from_a_file_takes_the_model_it_holds(run, tmp_path, capsys):
    """`--finetune FILE` without model flags builds the file's model (it used to build vit5_base and fail with
    'does not fit'), says so, and trains on new data with a new head."""
    data4 = make_image_folder(tmp_path / 'data4', train_per_class=(4,) * 4, val_per_class=(2,) * 4, seed=1)
    ckpt = run.out / 'checkpoint.pth'
    code, out, err = cli(['--finetune', ckpt, '--data-set', 'FOLDER', '--data-path', data4, '--output_dir',
                          tmp_path / 'ft', '--epochs', 1, '--warmup-epochs', 0, '--batch', 8, '--mixup', 0, '--cutmix', 0, *MACHINE],
                         capsys)
    assert code == 0, err
    assert (f'Model settings from {ckpt}: --model vit5_tiny --model-kwargs depth=2 embed_dim=48 num_heads=2 '
            f'--input-size 32 (give a flag to override)') in out
    assert (f'Fine-tuning from {ckpt} (model weights): loaded 36 of 38 tensors; dropped head.weight, head.bias '
            f'(3 classes in the file, 4 in the model)') in out
    tuned = checkpoint.load_checkpoint(str(tmp_path / 'ft' / 'checkpoint.pth'))
    source = checkpoint.load_checkpoint(str(ckpt))['model']
    assert tuned['model']['head.weight'].shape == (4, 48) and not torch.equal(tuned['model']['blocks.0.attn.qkv.weight'],
                                                                              source['blocks.0.attn.qkv.weight'])


def test_a_resume_of_weights_alone_says_to_fine_tune_before_taking_any_setting(run, tmp_path, capsys):
    """A released-style file (weights and the args of a run on another machine, no optimizer): resuming it is one
    line pointing at --finetune, not an error about the data path its args name."""
    saved = checkpoint.load_checkpoint(str(run.out / 'checkpoint.pth'))
    saved['args'].data_path = '/datasets01/imagenet_full_size/061417/'
    weights = tmp_path / 'released.pth'
    torch.save(dict(model=saved['model'], args=saved['args']), weights)
    code, _, err = cli(['--resume', weights, *MACHINE], capsys)
    assert (code, err) == (2, f"error: {weights} has no 'optimizer' to resume from (use --finetune to start from "
                              f"its weights)\n")


def test_a_model_this_code_does_not_define_is_named_and_its_model_settings_left(capsys):
    """A checkpoint of another codebase's model: one line names it; a resume takes the recipe but none of the model
    settings, an evaluation does not take the name."""
    saved = main.parse_args(['--epochs', '7', '--model-kwargs', 'depth=2'])
    saved.model = 'deit_small_patch16_224'
    ckpt = dict(args=saved, optimizer={}, lr_scheduler={}, epoch=0)
    line = 'old.pth was trained with --model deit_small_patch16_224, which this code does not define\n'
    args = main.parse_args(['--input-size', '48'])
    checkpoint.take_run_settings(args, ckpt, 'old.pth', main.RUN_SETTINGS)
    assert capsys.readouterr().out.startswith(line)
    assert (args.model, args.model_kwargs, args.input_size, args.epochs) == ('vit5_base', {}, 48, 7)
    args = main.parse_args(['--eval', '--resume', 'old.pth'])
    checkpoint.take_model_settings(args, ckpt, 'old.pth')
    assert capsys.readouterr().out.startswith(line) and args.model == 'vit5_base'
