"""main.py's recipe against its formulas, through the command line's flags: the EMA (on the CPU too),
label smoothing with and without mixup/cutmix and BCE, float16 with its gradient scaler, the lr scaling
rule, distillation and cosub. Tiny ViT-5 runs in this process on real photo crops at 48 px.

The criterion main.py builds and the optimizer it steps are wrapped to record what they saw (their
code runs unchanged); the test then recomputes the loss or the EMA from the recorded inputs."""
import math
import sys
import types

import pytest
import timm
import torch
import torch.nn.functional as F

import main
import checkpoint
from tinyrun import REPO, TINY, read_log, resume_and_compare, run_keeping_checkpoints, run_main

sys.path.insert(0, str(REPO / 'scripts'))
import make_photo_folder  # noqa: E402

CLASSES = 4
# 16 photos of 4 classes, 48 px: a short epoch of 2 batches without repeated augmentation
PHOTO_RUN = TINY + ['--input-size', 48, '--epochs', 1, '--no-repeated-aug', '--no-model-ema']


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp('photos')
    make_photo_folder.main(['--out', str(root), '--train', '16', '--val', '6', '--classes', str(CLASSES),
                            '--min-side', '40', '--max-side', '80'])
    return root


class RecordingCriterion:
    """The criterion main.py built, called unchanged; keeps a copy of what each call saw and returned."""

    def __init__(self, criterion):
        self.criterion, self.calls = criterion, []

    def __call__(self, inputs, outputs, targets):
        loss = self.criterion(inputs, outputs, targets)
        self.calls.append(types.SimpleNamespace(inputs=inputs.detach().clone(), outputs=outputs.detach().float(),
                                                targets=targets.detach().clone(), loss=loss.detach().double()))
        return loss


def run_recording_criterion(argv, monkeypatch):
    """main.main(argv) in this process; returns the criterion's calls."""
    built, real = [], main.build_criterion
    monkeypatch.setattr(main, 'build_criterion', lambda *a, **kw: built.append(RecordingCriterion(real(*a, **kw)))
                        or built[-1])
    run_main(argv)
    [criterion] = built
    assert criterion.calls
    return criterion.calls


def close(value, expected):
    return value.item() == pytest.approx(expected.double().item(), rel=1e-5)


def soft_ce(logits, targets):
    return (-targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


# ---- label smoothing, mixup / cutmix, BCE: the targets and the loss the criterion sees ---------------------
@pytest.mark.parametrize('smoothing', [0.1, 0.0])
def test_smoothing_without_mixup_is_label_smoothed_cross_entropy(photos, smoothing, monkeypatch):
    calls = run_recording_criterion(PHOTO_RUN + ['--data-path', photos, '--mixup', 0, '--cutmix', 0,
                                                 '--smoothing', smoothing], monkeypatch)
    for c in calls:
        assert c.targets.shape == (8,)  # class indices
        assert close(c.loss, F.cross_entropy(c.outputs, c.targets, label_smoothing=smoothing))


@pytest.mark.parametrize('mixing', [['--mixup', 0.8, '--cutmix', 1.0], ['--mixup', 0, '--cutmix', 1.0],
                                    ['--mixup', 0.8, '--cutmix', 0]])
def test_smoothing_reaches_the_mixed_targets(photos, mixing, monkeypatch):
    """Mixup/cutmix with --smoothing 0.1: every class outside an image's pair gets 0.1 / classes, every
    row sums to 1, and the loss is the soft-target cross-entropy of those targets."""
    calls = run_recording_criterion(PHOTO_RUN + ['--data-path', photos, '--smoothing', 0.1] + mixing, monkeypatch)
    for c in calls:
        assert c.targets.shape == (8, CLASSES)
        torch.testing.assert_close(c.targets.sum(-1), torch.ones(8))
        # the two largest entries of a row are the image's classes; the rest get the smoothing's share
        rest = c.targets.sort(-1).values[:, :CLASSES - 2]
        torch.testing.assert_close(rest, torch.full_like(rest, 0.1 / CLASSES))
        assert close(c.loss, soft_ce(c.outputs, c.targets))


def test_bce_loss_sees_binarised_unsmoothed_targets(photos, monkeypatch):
    """--bce-loss (the pretraining recipe, --smoothing 0): BCE against 1 for each class mixed into the
    image, 0 elsewhere."""
    calls = run_recording_criterion(PHOTO_RUN + ['--data-path', photos, '--bce-loss', '--smoothing', 0,
                                                 '--mixup', 0.8, '--cutmix', 1.0], monkeypatch)
    for c in calls:
        rest = c.targets.sort(-1).values[:, :CLASSES - 2]
        assert rest.eq(0).all()  # no smoothing
        positives = (c.targets > 0).float()
        assert positives.sum(-1).le(2).all() and positives.sum(-1).ge(1).all()
        assert close(c.loss, F.binary_cross_entropy_with_logits(c.outputs, positives))


# ---- distillation and cosub ------------------------------------------------------------------------------
def teacher_file(path, seed):
    torch.manual_seed(seed)
    teacher = timm.create_model('test_resnet', num_classes=CLASSES)
    torch.save({'model': teacher.state_dict()}, path)
    return teacher.eval()


@pytest.mark.parametrize('kind', ['soft', 'hard'])
def test_distillation_loss_is_its_formula_with_the_teachers_weights(photos, tmp_path, kind, monkeypatch):
    """The loss of each step equals (1 - alpha) * smoothed CE + alpha * the distillation term computed from
    the teacher file's model (soft: tau^2 * KL of tau-softened outputs; hard: CE against its top-1);
    another teacher's logits give another loss."""
    teacher = teacher_file(tmp_path / 'teacher.pth', seed=1)
    other = teacher_file(tmp_path / 'other.pth', seed=2)
    alpha, tau = 0.3, 2.0
    calls = run_recording_criterion(PHOTO_RUN + [
        '--data-path', photos, '--mixup', 0, '--cutmix', 0, '--smoothing', 0.1, '--distillation-type', kind,
        '--teacher-model', 'test_resnet', '--teacher-path', tmp_path / 'teacher.pth',
        '--distillation-alpha', alpha, '--distillation-tau', tau], monkeypatch)

    def formula(c, teacher_model):
        with torch.no_grad():
            t = teacher_model(c.inputs)
        if kind == 'soft':
            p_t = F.softmax(t / tau, -1)
            distill = (p_t * (p_t.log() - F.log_softmax(c.outputs / tau, -1))).sum(-1).mean() * tau ** 2
        else:
            distill = F.cross_entropy(c.outputs, t.argmax(-1))
        return (1 - alpha) * F.cross_entropy(c.outputs, c.targets, label_smoothing=0.1) + alpha * distill

    for c in calls:
        assert close(c.loss, formula(c, teacher))
        assert not close(c.loss, formula(c, other))


def test_cosub_trains_two_draws_of_one_batch(photos, monkeypatch):
    """--cosub: the batch goes through the model twice in one forward; stochastic depth gives the two
    halves different outputs, and the loss is the four BCE terms, each half against the targets and
    against the other half's detached prediction."""
    calls = run_recording_criterion(PHOTO_RUN + ['--data-path', photos, '--cosub', '--bce-loss', '--smoothing', 0,
                                                 '--drop-path', 0.5], monkeypatch)
    bce = F.binary_cross_entropy_with_logits
    for c in calls:
        first, second = c.inputs.chunk(2)
        assert torch.equal(first, second)
        a, b = c.outputs.chunk(2)
        assert not torch.equal(a, b)  # two sub-networks, not one output twice
        t = (c.targets > 0).float()
        expected = 0.25 * (bce(a, t) + bce(b, t) + bce(a, b.sigmoid()) + bce(b, a.sigmoid()))
        assert close(c.loss, expected)


# ---- the lr scaling rule -----------------------------------------------------------------------------------
def test_lr_is_scaled_by_batch_and_accumulation(photos):
    """Without --unscale-lr the peak lr is lr * batch * accum_iter * world size / 512 (world size 2:
    tests/test_distributed.py); with it, --lr as given."""
    argv = PHOTO_RUN + ['--data-path', photos, '--lr', 1e-3, '--warmup-epochs', 0, '--accum_iter', 2,
                        '--mixup', 0, '--cutmix', 0]
    stats, _ = run_main(argv)
    assert stats['train_lr'] == pytest.approx(1e-3 * 8 * 2 / 512, rel=1e-12)
    stats, _ = run_main(argv + ['--unscale-lr'])
    assert stats['train_lr'] == pytest.approx(1e-3, rel=1e-12)


# ---- the EMA and float16 through main.py -------------------------------------------------------------------
@pytest.fixture(scope='module')
def fp16_run(photos, tmp_path_factory):
    """2 epochs of the default (fine-tuning style) recipe on photos under float16 autocast with its
    gradient scaler and clipping, the EMA kept on the CPU with decay 0.5; records the model's weights
    before training and after every optimizer step."""
    out = tmp_path_factory.mktemp('fp16')
    argv = TINY + ['--input-size', 48, '--data-path', photos, '--output_dir', out, '--epochs', 2,
                   '--warmup-epochs', 0, '--lr', 5e-3, '--unscale-lr', '--amp-dtype', 'float16', '--clip-grad', 1.0,
                   '--model-ema-decay', 0.5, '--model-ema-force-cpu']
    states, real = [], main.build_optimizer

    def recording_optimizer(args, model, device):
        def snapshot(*_):
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})

        optimizer = real(args, model, device)
        snapshot()
        optimizer.register_step_post_hook(snapshot)
        return optimizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(main, 'build_optimizer', recording_optimizer)
        run_keeping_checkpoints(argv)
    return types.SimpleNamespace(out=out, argv=argv, states=states)


def steps_taken(ckpt, batches: int) -> int:
    """Optimizer steps float16's scaler let through in `batches`: each skip halved its scale (from 2^16;
    it grows only after 2000 steps in a row without one)."""
    return batches - round(math.log2(2.0 ** 16 / ckpt['scaler']['scale']))


def test_ema_through_main_is_the_formula_over_every_step(fp16_run):
    """The EMA in each epoch's checkpoint is e <- 0.5 e + 0.5 w over the weights after every optimizer step
    taken so far (6 batches per epoch: 16 images repeated 3 times, batch 8; a step the scaler skips moves
    neither), starting from the initial weights."""
    states = fp16_run.states

    def ema_after(n_steps):
        ema = {k: v.double() for k, v in states[0].items()}
        for state in states[1:1 + n_steps]:
            ema = {k: 0.5 * e + 0.5 * state[k].double() for k, e in ema.items()}
        return ema

    for epoch, batches in ((0, 6), (1, 12)):
        ckpt = checkpoint.load_checkpoint(str(fp16_run.out / f'checkpoint.pth.epoch{epoch}'))
        steps = steps_taken(ckpt, batches)
        assert len(states) >= 1 + steps
        for k, expected in ema_after(steps).items():
            torch.testing.assert_close(ckpt['model_ema'][k].double(), expected, rtol=1e-6, atol=1e-7, msg=k)
    assert len(states) == 1 + steps


def test_cpu_ema_is_evaluated_every_epoch(fp16_run, photos):
    """--model-ema-force-cpu on a CPU run: the EMA lives where the model does and is evaluated each epoch;
    the logged numbers are those of evaluating the saved EMA weights."""
    log = read_log(fp16_run.out)
    assert [e['epoch'] for e in log] == [0, 1] and all('test_acc1_ema' in e for e in log)
    stats, _ = run_main(TINY + ['--input-size', 48, '--data-path', photos, '--eval', '--load_ema',
                                '--amp-dtype', 'float16', '--resume', fp16_run.out / 'checkpoint.pth'])
    assert stats['loss'] == pytest.approx(log[-1]['test_loss_ema'], rel=1e-6)
    assert stats['acc1'] == log[-1]['test_acc1_ema']


def test_float16_run_resumes_exactly_with_its_scaler_state(fp16_run, tmp_path):
    """Stopped after epoch 0 and resumed: weights, EMA, optimizer and the scaler's state (scale and growth
    count) end equal to the uninterrupted run's."""
    scaler = checkpoint.load_checkpoint(str(fp16_run.out / 'checkpoint.pth'))['scaler']
    assert scaler['_growth_tracker'] > 0  # the count of steps since the last skip: a resume must carry it on
    resume_and_compare(fp16_run.argv, fp16_run.out, 0, tmp_path)
