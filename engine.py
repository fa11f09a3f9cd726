"""One training epoch and one evaluation pass. main.py builds everything they use."""
import contextlib
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import unwrap_model

from utils import MetricLogger, NonFiniteLossError, SmoothedValue, all_ranks_finite, all_reduce_sum

PRINT_FREQ = 10


def autocast(device: torch.device, amp_dtype: torch.dtype):
    return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)


def train_one_epoch(
        model: nn.Module,
        criterion: nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        epoch: int,
        scaler: torch.amp.GradScaler,
        amp_dtype: torch.dtype = torch.float32,
        max_norm: Optional[float] = None,
        model_ema=None,
        mixup_fn=None,
        accum_iter: int = 1,
        cosub: bool = False,
        set_training_mode: bool = True,
) -> dict:
    """Train for one pass over `data_loader`; returns the epoch averages {'loss', 'lr'}.

    Gradients accumulate over windows of `accum_iter` batches. Under DDP the gradient
    all-reduce runs only on a window's last batch (no_sync on the others); the final window
    of the epoch may be shorter and is stepped too, its loss averaged over its own length.
    The loss must be finite on every rank before anything is backpropagated; otherwise all
    ranks raise NonFiniteLossError at the same step. `model_ema` follows every optimizer step.
    """
    model.train(set_training_mode)
    logger = MetricLogger(device)
    logger.add_meter('lr', SmoothedValue(window=1, fmt='{value:.6f}'))
    n_steps = len(data_loader)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    header = f'Epoch: [{epoch}]'
    for i, (samples, targets) in enumerate(logger.log_every(data_loader, PRINT_FREQ, header,
                                                           getattr(data_loader, 'batch_size', 0) or 0)):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        if cosub:
            samples = torch.cat([samples, samples])  # two stochastic-depth draws of one batch
        window_start = i - i % accum_iter
        window = min(accum_iter, n_steps - window_start)  # the epoch's last window may be short
        update = i == window_start + window - 1
        no_sync = model.no_sync() if not update and hasattr(model, 'no_sync') else contextlib.nullcontext()
        with no_sync:
            with autocast(device, amp_dtype):
                outputs = model(samples)
                loss = criterion(samples, outputs, targets)
            if not all_ranks_finite(loss):
                raise NonFiniteLossError(
                    f'loss is {loss.item()} (or non-finite on another rank) at epoch {epoch}, step {i}; '
                    f'training stopped on every rank, nothing saved for this epoch')
            scaler.scale(loss / window).backward()
        if update:
            if max_norm:
                scaler.unscale_(optimizer)  # clip the true accumulated gradient, not the scaled one
                torch.nn.utils.clip_grad_norm_(params, max_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if model_ema is not None:
                model_ema.update(unwrap_model(model))
        logger.update(loss=loss.item(), lr=max(g['lr'] for g in optimizer.param_groups))
    logger.synchronize_between_processes()
    print('Averaged stats:', logger)
    return {name: meter.global_avg for name, meter in logger.meters.items()}


@torch.no_grad()
def evaluate(
        data_loader: Iterable,
        model: nn.Module,
        device: torch.device,
        amp_dtype: torch.dtype = torch.float32,
        distributed: bool = False,
        header: str = 'Test:',
) -> dict:
    """Cross-entropy, top-1 and top-5 accuracy (%) of `model` over `data_loader`.

    With `distributed`, each rank holds a disjoint shard of the set and the sums of losses,
    hits and counts are all-reduced, so the result equals a single-process pass exactly
    (no padded duplicates). Prints the summary line `* Acc@1 X Acc@5 Y loss Z`.
    """
    model.eval()
    logger = MetricLogger(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    for images, target in logger.log_every(data_loader, PRINT_FREQ, header):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        loss = F.cross_entropy(output, target, reduction='sum')
        top = output.topk(min(5, output.shape[-1]), dim=-1).indices  # (B, k), best first
        hits = top.eq(target[:, None])
        batch = torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(-1).sum().double(),
                             torch.tensor(len(target), dtype=torch.float64, device=device)])
        sums += batch
        logger.update(loss=loss.item() / len(target), acc1=100 * batch[1].item() / len(target))
    if distributed:
        all_reduce_sum(sums)
    loss, hit1, hit5, n = sums.tolist()
    n = max(n, 1)
    stats = dict(loss=loss / n, acc1=100 * hit1 / n, acc5=100 * hit5 / n, n=int(n))
    print(f'* Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f}')
    return stats
