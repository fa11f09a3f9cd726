"""The training losses against direct formulas."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from losses import BinaryTargetBCE, CosubLoss, DistillationLoss, binarize_targets, build_criterion


def test_bce_binarises_mixed_targets():
    torch.manual_seed(0)
    np.random.seed(0)  # timm's Mixup draws lam and the cutmix box from numpy; some draws leave a zero-area box
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=5)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    _, soft = mixup(x, y)
    assert ((soft > 0) & (soft < 1)).any()  # mixed, not yet binary
    hard = binarize_targets(soft, 5)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hard.bool(), soft > 0) and (hard.sum(1) == 2).all()  # each image: its class and its partner's
    logits = torch.randn(4, 5)
    assert BinaryTargetBCE()(logits, soft) == pytest.approx(F.binary_cross_entropy_with_logits(logits, hard).item())


def test_bce_accepts_class_indices():
    logits, y = torch.randn(3, 4), torch.tensor([0, 3, 1])
    expected = F.binary_cross_entropy_with_logits(logits, F.one_hot(y, 4).float())
    assert BinaryTargetBCE()(logits, y).item() == pytest.approx(expected.item())


class Teacher(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits, self.seen = logits, []

    def forward(self, x):
        self.seen.append(x)
        return self.logits


def test_soft_distillation_is_tau_scaled_kl_mixed_by_alpha():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    inputs = torch.randn(4, 3)
    teacher = Teacher(t)
    tau, alpha = 2.0, 0.3
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'soft', alpha, tau)(inputs, s, y)
    p_t = F.softmax(t / tau, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / tau, -1))).sum(-1).mean() * tau ** 2
    assert loss.item() == pytest.approx(((1 - alpha) * F.cross_entropy(s, y) + alpha * kl).item(), rel=1e-5)
    assert teacher.seen[0] is inputs


def test_hard_distillation_uses_teacher_argmax_and_second_head():
    s_cls, s_dist, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6), torch.tensor([5, 4, 3, 2])
    loss = DistillationLoss(nn.CrossEntropyLoss(), Teacher(t), 'hard', 0.5)(None, (s_cls, s_dist), y)
    expected = 0.5 * F.cross_entropy(s_cls, y) + 0.5 * F.cross_entropy(s_dist, t.argmax(-1))
    assert loss.item() == pytest.approx(expected.item())


def test_no_distillation_is_the_base_loss_and_teacher_is_required():
    s, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    assert DistillationLoss(nn.CrossEntropyLoss())(None, s, y).item() == pytest.approx(F.cross_entropy(s, y).item())
    with pytest.raises(ValueError, match='teacher'):
        DistillationLoss(nn.CrossEntropyLoss(), None, 'soft')


def test_distillation_does_not_train_the_teacher():
    t = nn.Linear(3, 6)
    s = torch.randn(4, 6, requires_grad=True)
    DistillationLoss(nn.CrossEntropyLoss(), t, 'soft')(torch.randn(4, 3), s, torch.tensor([0, 1, 2, 3])).backward()
    assert t.weight.grad is None and s.grad is not None


@pytest.mark.parametrize('binarize', [False, True])
def test_cosub_loss_terms(binarize):
    torch.manual_seed(0)
    out = torch.randn(8, 5, requires_grad=True)
    soft = torch.softmax(torch.randn(4, 5), -1)
    loss = CosubLoss(binarize)(None, out, soft)
    a, b = out.detach()[:4], out.detach()[4:]
    t = (soft > 0).float() if binarize else soft
    bce = F.binary_cross_entropy_with_logits
    expected = 0.25 * (bce(a, t) + bce(b, t) + bce(a, b.sigmoid()) + bce(b, a.sigmoid()))
    assert loss.item() == pytest.approx(expected.item())
    # the partner's prediction is a target, not a path for gradients: d/da of bce(b, sigmoid(a)) is absent
    loss.backward()
    a_only = out.detach()[:4].clone().requires_grad_()
    (0.25 * (bce(a_only, t) + bce(a_only, b.sigmoid()))).backward()
    torch.testing.assert_close(out.grad[:4], a_only.grad)


def test_build_criterion_picks_the_loss_the_flags_ask_for():
    def base(**kw):
        c = build_criterion(**{**dict(mixup_active=False, smoothing=0.0, bce_loss=False, cosub=False), **kw})
        return c.base_criterion if isinstance(c, DistillationLoss) else c

    assert isinstance(base(mixup_active=True, smoothing=0.1), SoftTargetCrossEntropy)
    assert isinstance(base(smoothing=0.1), LabelSmoothingCrossEntropy)
    assert isinstance(base(), nn.CrossEntropyLoss)
    assert isinstance(base(mixup_active=True, bce_loss=True), BinaryTargetBCE)
    assert isinstance(base(cosub=True, bce_loss=True), CosubLoss) and base(cosub=True, bce_loss=True).binarize
