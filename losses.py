"""Training losses of the recipe.

Every top-level criterion is called as `criterion(inputs, outputs, targets)`: distillation needs
the inputs to query its teacher, the others ignore them. `build_criterion` picks one from the flags.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy


def dense_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) class indices -> (B, C) one-hot floats; (B, C) targets pass through as floats."""
    if targets.ndim == 1:
        return F.one_hot(targets, num_classes).float()
    return targets.float()


def binarize_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """--bce-loss: every class with a non-zero (mixed) weight becomes a positive, 1.0; the rest 0.0."""
    return dense_targets(targets, num_classes).gt(0).float()


class BinaryTargetBCE(nn.Module):
    """BCE-with-logits against binarised targets: each class mixed into the image is a positive."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, binarize_targets(targets, logits.shape[-1]))


class DistillationLoss(nn.Module):
    """(1 - alpha) * base(outputs, targets) + alpha * distillation from a frozen teacher.

    soft: KL(teacher || student) of the tau-softened distributions, times tau^2, averaged over
          the batch (Hinton et al.);
    hard: cross-entropy against the teacher's top-1 class.
    'none' returns the base loss alone. A model returning (cls_logits, dist_logits) is
    distilled through its second head; our models have one head, which then serves both.
    """

    def __init__(self, base_criterion: nn.Module, teacher: Optional[nn.Module] = None,
                 distillation_type: str = 'none', alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if distillation_type not in ('none', 'soft', 'hard'):
            raise ValueError(f"distillation_type must be 'none', 'soft' or 'hard', got {distillation_type!r}")
        if distillation_type != 'none' and teacher is None:
            raise ValueError(f'{distillation_type} distillation needs a teacher model')
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.distillation_type, self.alpha, self.tau = distillation_type, alpha, tau

    def forward(self, inputs: torch.Tensor, outputs, targets: torch.Tensor) -> torch.Tensor:
        outputs_kd = outputs
        if isinstance(outputs, (tuple, list)):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, targets)
        if self.distillation_type == 'none':
            return base_loss
        with torch.no_grad():
            teacher_logits = self.teacher(inputs)
        if self.distillation_type == 'soft':
            T = self.tau
            distill = F.kl_div(F.log_softmax(outputs_kd / T, dim=-1), F.log_softmax(teacher_logits / T, dim=-1),
                               reduction='batchmean', log_target=True) * (T * T)
        else:
            distill = F.cross_entropy(outputs_kd, teacher_logits.argmax(dim=-1))
        return base_loss * (1 - self.alpha) + distill * self.alpha


class CosubLoss(nn.Module):
    """Co-training of two sub-models (--cosub).

    The batch went through the model twice in one forward (inputs concatenated with themselves),
    so stochastic depth draws two sub-networks: outputs = (2B, C). Each half learns from the
    targets (binarised under --bce-loss) and from the other half's detached sigmoid, all with
    BCE-with-logits and weight 1/4. The logits are taken in float32 first: under bf16 autocast the
    soft targets would otherwise be rounded to bf16 (sigmoid runs in its input's dtype).
    """

    def __init__(self, binarize: bool = False):
        super().__init__()
        self.binarize = binarize

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        a, b = outputs.float().chunk(2, dim=0)
        convert = binarize_targets if self.binarize else dense_targets
        t = convert(targets, a.shape[-1])
        bce = F.binary_cross_entropy_with_logits
        return 0.25 * (bce(a, t) + bce(b, t) + bce(a, b.detach().sigmoid()) + bce(b, a.detach().sigmoid()))


def build_criterion(mixup_active: bool, smoothing: float, bce_loss: bool, cosub: bool,
                    teacher: Optional[nn.Module] = None, distillation_type: str = 'none',
                    alpha: float = 0.5, tau: float = 1.0) -> nn.Module:
    """The training criterion the flags ask for, called as criterion(inputs, outputs, targets)."""
    if cosub:
        return CosubLoss(binarize=bce_loss)
    if bce_loss:
        base = BinaryTargetBCE()
    elif mixup_active:
        base = SoftTargetCrossEntropy()  # mixup already applied the label smoothing
    elif smoothing > 0:
        base = LabelSmoothingCrossEntropy(smoothing=smoothing)
    else:
        base = nn.CrossEntropyLoss()
    return DistillationLoss(base, teacher, distillation_type, alpha, tau)
