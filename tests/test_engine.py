"""engine.train_one_epoch and engine.evaluate on toy models whose updates can be computed by hand,
and the recipe's real step on a tiny ViT-5."""
import math
from collections import Counter

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

import models_vit5  # noqa: F401  (registers vit5_*)
from engine import evaluate, train_one_epoch
from losses import DistillationLoss, build_criterion
from utils import NonFiniteLossError


class Loader(list):
    """A list of (samples, targets) batches with the batch_size attribute of a DataLoader."""
    batch_size = 2


def batches(n, seed=0, dim=3, classes=2):
    g = torch.Generator().manual_seed(seed)
    return Loader((torch.randn(2, dim, generator=g), torch.randint(0, classes, (2,), generator=g)) for _ in range(n))


def run_epoch(model, loader, accum_iter=1, max_norm=None, model_ema=None, criterion=None, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    steps = []
    opt.register_step_post_hook(lambda *_: steps.append(1))
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    criterion = criterion or DistillationLoss(nn.CrossEntropyLoss())
    stats = train_one_epoch(model, criterion, loader, opt, torch.device('cpu'), 0, scaler,
                            max_norm=max_norm, model_ema=model_ema, accum_iter=accum_iter, print_freq=10)
    return stats, len(steps)


def by_hand(model, loader, windows, max_norm=None, lr=0.1):
    """SGD over the given windows of batch indices, each step on the window's mean loss."""
    w = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for window in windows:
        loss = sum(F.cross_entropy(F.linear(loader[i][0], *w), loader[i][1]) for i in window) / len(window)
        grads = torch.autograd.grad(loss, w)
        if max_norm:
            scale = min(1.0, max_norm / (torch.sqrt(sum(g.pow(2).sum() for g in grads)) + 1e-6))
            grads = [g * scale for g in grads]
        w = [(p - lr * g).detach().requires_grad_() for p, g in zip(w, grads)]
    return w


@pytest.mark.parametrize('accum_iter, windows', [(1, [[0], [1], [2], [3], [4]]),
                                                 (2, [[0, 1], [2, 3], [4]]),  # last window short, still stepped
                                                 (3, [[0, 1, 2], [3, 4]])])
def test_accumulation_windows_and_final_partial_window(accum_iter, windows):
    torch.manual_seed(0)
    model, loader = nn.Linear(3, 2), batches(5)
    expected = by_hand(model, loader, windows)
    _, steps = run_epoch(model, loader, accum_iter=accum_iter)
    assert steps == len(windows)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


def test_clipping_acts_on_the_accumulated_gradient():
    torch.manual_seed(0)
    model, loader = nn.Linear(3, 2), batches(4)
    expected = by_hand(model, loader, [[0, 1], [2, 3]], max_norm=0.05)
    run_epoch(model, loader, accum_iter=2, max_norm=0.05)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


def test_ema_updates_once_per_optimizer_step():
    class CountingEma:
        updates = 0

        def update(self, model):
            assert isinstance(model, nn.Linear)
            self.updates += 1

    ema = CountingEma()
    _, steps = run_epoch(nn.Linear(3, 2), batches(5), accum_iter=2, model_ema=ema)
    assert ema.updates == steps == 3


def nan_at(bad_step, calls):
    """A cross-entropy criterion whose loss is NaN at one step (calls counts the steps run)."""
    def criterion(inputs, outputs, targets):
        calls.append(1)
        loss = F.cross_entropy(outputs, targets)
        return loss * float('nan') if len(calls) == bad_step + 1 else loss
    return criterion


def test_nonfinite_loss_raises_naming_its_step():
    calls = []
    with pytest.raises(NonFiniteLossError, match=r'epoch 0, step 1 \(rank 0\); training stopped on every rank at '
                                                 r'step 3, nothing saved'):
        run_epoch(nn.Linear(3, 2), batches(4), accum_iter=2, criterion=nan_at(1, calls))
    assert len(calls) == 4  # found where the epoch's last progress line is due


def test_nonfinite_loss_stops_at_the_next_log_step():
    """The loss is read where a progress line is due (steps 0, 10, 20, 24 here): a NaN at step 12
    stops the epoch at step 20, not later."""
    calls = []
    with pytest.raises(NonFiniteLossError, match=r'step 12 .*at step 20'):
        run_epoch(nn.Linear(3, 2), batches(25), criterion=nan_at(12, calls))
    assert len(calls) == 21


@pytest.fixture
def stop_signals():
    """main.py's SIGTERM / SIGUSR1 handling in this process for the test, then the handlers from before."""
    import utils
    with utils.stop_signals_noted():
        yield


def test_checkpoints_every_n_optimizer_steps_and_stops_where_all_ranks_meet(stop_signals):
    """save(batches done, progress) after every 3rd optimizer step of the run (epoch 1 goes on counting from
    epoch 0's 13 steps), never the epoch's last. SIGTERM during batch 12 is seen at the progress line of batch
    20; the epoch ends with that optimizer step (batches 20 and 21), saved."""
    import os
    import signal
    calls, saves = [], []

    def criterion(inputs, outputs, targets):
        calls.append(1)
        if len(calls) == 13:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler only takes note
        return F.cross_entropy(outputs, targets)

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(model, criterion, batches(25), opt, torch.device('cpu'), 1,
                            torch.amp.GradScaler('cpu', enabled=False), accum_iter=2, print_freq=10,
                            save_interval=3, save=lambda done, progress: saves.append((done, progress)))
    assert stats == {'stopped_at': 22} and len(calls) == 22
    assert [done for done, _ in saves] == [4, 10, 16, 22]
    progress = saves[-1][1]
    assert progress['loss']['steps'] == 22 and progress['loss']['read_steps'] == 21  # read at batch 20
    assert progress['meters']['loss']['count'] == 21 and progress['meters']['lr']['window'] == [0.1]


def test_returns_epoch_averages_of_loss_and_lr():
    losses = []
    criterion = lambda inputs, outputs, targets: losses.append(F.cross_entropy(outputs, targets)) or losses[-1]  # noqa: E731
    stats, _ = run_epoch(nn.Linear(3, 2), batches(13), lr=0.25, criterion=criterion)
    assert stats['lr'] == 0.25
    assert stats['loss'] == pytest.approx(torch.stack(losses).double().mean().item(), rel=1e-12)


# Tensor methods that copy a value to the host: each is a host-device sync when the tensor is on a GPU
HOST_READS = ('item', 'tolist', 'cpu', 'numpy', '__array__', '__bool__', '__float__', '__int__', '__index__',
              '__complex__')


def test_steady_steps_never_read_the_device(monkeypatch):
    """The released pretraining step (tiny ViT-5 with drop path, timm's LAMB, EMA, mixup/cutmix, BCE,
    clipping) reads the device only where a progress line is due, once there."""
    torch.manual_seed(0)
    model = timm.create_model('vit5_tiny', depth=2, embed_dim=48, num_heads=2, img_size=32, num_classes=10,
                              drop_path_rate=0.1)
    optimizer = create_optimizer_v2(model, opt='lamb', lr=4e-3, weight_decay=0.05)
    ema = ModelEmaV3(model, decay=0.9)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10)
    current, reads = [None], []

    class Batches(Loader):
        def __iter__(self):
            for i, batch in enumerate(super().__iter__()):
                current[0] = i
                yield batch

    def host_step_counters():  # timm's LAMB keeps its step count on the CPU on every device: no sync
        return {id(g['step']) for g in optimizer.param_groups if 'step' in g}

    def counted(name, method):
        def wrapper(self, *args, **kwargs):
            if id(self) not in host_step_counters():
                reads.append((current[0], name))
            return method(self, *args, **kwargs)
        return wrapper

    loader = Batches((torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(25))
    np.random.seed(0)  # timm's Mixup draws from numpy
    with monkeypatch.context() as mp:
        for name in HOST_READS:
            mp.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        stats = train_one_epoch(model, build_criterion(True, 0.0, True, False), loader, optimizer,
                                torch.device('cpu'), 0, torch.amp.GradScaler('cpu', enabled=False),
                                max_norm=1.0, model_ema=ema, mixup_fn=mixup, print_freq=10)
    assert Counter(step for step, _ in reads) == {0: 1, 10: 1, 20: 1, 24: 1}, reads
    assert stats['loss'] > 0 and optimizer.param_groups[0]['step'] == 25


def test_cosub_doubles_the_batch_through_the_model():
    seen = []
    model = nn.Linear(3, 2)
    model.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    criterion = lambda inputs, outputs, targets: outputs.sum() * 0  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, criterion, batches(2), opt, torch.device('cpu'), 0,
                    torch.amp.GradScaler('cpu', enabled=False), cosub=True)
    assert seen == [4, 4]


class FixedLogits(nn.Module):
    """Returns the logits stored for each sample (samples carry their index in column 0)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits[x[:, 0].long()]


def test_evaluate_counts_top1_top5_and_loss():
    logits = torch.tensor([[9., 1, 2, 3, 4, 5, 6],    # target 0: top-1 hit
                           [1., 9, 2, 3, 4, 5, 6],    # target 6: in the top 5, not top 1
                           [9., 8, 7, 6, 5, 4, 3],    # target 6: missed
                           [0., 0, 0, 0, 0, 0, 9]])   # target 6: top-1 hit
    targets = torch.tensor([0, 6, 6, 6])
    index = torch.arange(4, dtype=torch.float32)[:, None].expand(4, 3)
    loader = [(index[:3], targets[:3]), (index[3:], targets[3:])]  # uneven batches
    stats = evaluate(loader, FixedLogits(logits), torch.device('cpu'))
    assert stats['acc1'] == 50.0 and stats['acc5'] == 75.0 and stats['n'] == 4
    assert stats['loss'] == pytest.approx(F.cross_entropy(logits, targets).item())


def test_evaluate_with_fewer_than_five_classes_prints_summary(capsys):
    logits = torch.tensor([[2., 1], [2., 1], [0., 1]])
    loader = [(torch.arange(3.)[:, None], torch.tensor([0, 1, 1]))]
    stats = evaluate(loader, FixedLogits(logits), torch.device('cpu'))
    assert stats['acc1'] == pytest.approx(200 / 3) and stats['acc5'] == 100.0
    assert '* Acc@1 66.667 Acc@5 100.000 loss' in capsys.readouterr().out


def test_evaluate_on_a_class_subset_and_on_label_sets():
    logits = torch.tensor([[9., 1, 5, 0, 4, 0],     # best of all: 0; of the subset [2, 4]: 2
                           [9., 1, 3, 0, 4, 0],     # of the subset: 4
                           [0., 9, 1, 8, 2, 7]])
    index = torch.arange(3.)[:, None]
    subset = torch.tensor([2, 4])
    targets = torch.tensor([0, 0, 1])  # positions in the subset: classes 2, 2, 4
    stats = evaluate([(index, targets)], FixedLogits(logits), torch.device('cpu'), classes=subset)
    assert stats['acc1'] == pytest.approx(200 / 3) and stats['acc5'] == 100.0
    assert stats['loss'] == pytest.approx(F.cross_entropy(logits[:, subset], targets).item())
    # a (B, classes) mask of right answers: a prediction in the set is a hit, the loss spreads over the set
    right = torch.tensor([[0, 0, 1, 0, 0, 0],      # top-1 (0) misses, 2 is in the top 5
                          [1, 0, 0, 0, 1, 0],      # top-1 hit
                          [1, 0, 0, 0, 0, 0]], dtype=torch.bool)  # 0 is the last: not in the top 5
    stats = evaluate([(index[:2], right[:2]), (index[2:], right[2:])], FixedLogits(logits), torch.device('cpu'))
    assert stats['acc1'] == pytest.approx(100 / 3) and stats['acc5'] == pytest.approx(200 / 3)
    spread = right.float() / right.sum(-1, keepdim=True)
    assert stats['loss'] == pytest.approx(F.cross_entropy(logits, spread).item())


def test_autocast_follows_the_requested_dtype():
    dtypes = []
    model = nn.Linear(3, 2)
    model.register_forward_hook(lambda m, inp, out: dtypes.append(out.dtype))
    loader = [(torch.zeros(2, 3), torch.tensor([0, 1]))]
    evaluate(loader, model, torch.device('cpu'), amp_dtype=torch.bfloat16)
    evaluate(loader, model, torch.device('cpu'), amp_dtype=torch.float32)
    assert dtypes == [torch.bfloat16, torch.float32]


# ---- the EMA, the gradient scaler and clipping inside the step ------------------------------------
def train_recording(model, loader, scaler, model_ema=None, accum_iter=1, max_norm=None, amp_dtype=torch.float32,
                    lr=0.1):
    """train_one_epoch with SGD; returns the weights after each optimizer step that was taken."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    after = []
    opt.register_step_post_hook(lambda *_: after.append([p.detach().clone() for p in model.parameters()]))
    train_one_epoch(model, DistillationLoss(nn.CrossEntropyLoss()), loader, opt, torch.device('cpu'), 0, scaler,
                    amp_dtype, max_norm=max_norm, model_ema=model_ema, accum_iter=accum_iter)
    return after


def ema_formula(start, steps, decay):
    """EMA of the weights after each step, in float64: e <- decay * e + (1 - decay) * w."""
    ema = [p.double() for p in start]
    for weights in steps:
        ema = [decay * e + (1 - decay) * w.double() for e, w in zip(ema, weights)]
    return ema


def test_ema_is_the_formula_over_the_weights_after_each_step():
    """timm's ModelEmaV3 (as main.build_ema makes it) follows the weights each optimizer step leaves, not
    the ones before it: 3 steps of 2-batch windows, decay 0.5."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    ema = ModelEmaV3(model, decay=0.5, foreach=True)
    after = train_recording(model, batches(6), torch.amp.GradScaler('cpu', enabled=False), ema, accum_iter=2)
    assert len(after) == 3
    for e, expected in zip(ema.module.parameters(), ema_formula(start, after, 0.5)):
        torch.testing.assert_close(e.detach().double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('amp_dtype, tol', [(torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_scaled_gradients_are_unscaled_before_clipping(amp_dtype, tol):
    """A gradient scaler (2^10) with clipping: the clipped gradient is the true accumulated one, so the
    steps equal unscaled SGD with clipping by hand (exactly in float32; within float16 rounding under
    float16 autocast on the CPU, torch's own GradScaler and autocast)."""
    torch.manual_seed(0)
    model, loader = nn.Linear(3, 2), batches(4)
    expected = by_hand(model, loader, [[0, 1], [2, 3]], max_norm=0.05)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 10)
    train_recording(model, loader, scaler, accum_iter=2, max_norm=0.05, amp_dtype=amp_dtype)
    assert scaler.get_scale() == 2.0 ** 10  # no step was skipped
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=tol, atol=tol)


def test_a_skipped_step_leaves_weights_and_ema_unchanged():
    """An infinite gradient (finite loss) at the second of three steps: float16's scaler skips that step
    and halves its scale; the weights and the EMA are those of the two steps taken."""
    torch.manual_seed(0)
    model, loader = nn.Linear(3, 2), batches(3)
    start = [p.detach().clone() for p in model.parameters()]
    expected = by_hand(model, loader, [[0], [2]])
    backward = []

    def inf_at_step_1(grad):
        backward.append(1)
        return torch.full_like(grad, math.inf) if len(backward) == 2 else grad

    model.weight.register_hook(inf_at_step_1)
    ema = ModelEmaV3(model, decay=0.5, foreach=True)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 4)
    after = train_recording(model, loader, scaler, ema)
    assert len(after) == 2 and scaler.get_scale() == 2.0 ** 3
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
    for e, formula in zip(ema.module.parameters(), ema_formula(start, after, 0.5)):
        torch.testing.assert_close(e.detach().double(), formula, rtol=1e-6, atol=1e-7)
