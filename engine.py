"""One training epoch and one evaluation pass. main.py builds everything they use."""
import contextlib
import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import unwrap_model

import seeding
from utils import (MetricLogger, RunningLoss, SmoothedValue, all_reduce_sum, get_rank, is_log_step, stop_requested,
                   sync_allowed)

PRINT_FREQ = 10


def autocast(device: torch.device, amp_dtype: torch.dtype):
    return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """Drop the gradient of every parameter the optimizer steps: what zero_grad(set_to_none=True) does,
    for any optimizer. (apex's FusedLAMB.zero_grad takes no argument: calling it with set_to_none raises
    a TypeError.)"""
    for group in optimizer.param_groups:
        for p in group['params']:
            p.grad = None


class TrainStep:
    """One batch of the recipe: mixup, forward under autocast, loss, backward; on the last batch
    of an accumulation window, also clipping, the optimizer step and the EMA update.

    Nothing here copies a device value to the host, so the CPU queues step after step while the
    device works, and a CUDA-graph compile mode can replay the model's part (static shapes come
    from drop_last). The one exception is float16's GradScaler: its skip-step decision needs a host
    read per optimizer step, and a second read tells the EMA whether the step was taken (a skipped
    step leaves weights and EMA alike unchanged); bfloat16 and float32 have none.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, device: torch.device, amp_dtype: torch.dtype = torch.float32,
                 max_norm: Optional[float] = None, model_ema=None, mixup_fn=None, cosub: bool = False):
        self.model, self.criterion, self.optimizer, self.scaler = model, criterion, optimizer, scaler
        self.device, self.amp_dtype, self.max_norm = device, amp_dtype, max_norm
        self.model_ema, self.mixup_fn, self.cosub = model_ema, mixup_fn, cosub
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scale = scaler.get_scale()  # float16: the scale before the next step (1.0, no read, otherwise)

    def __call__(self, samples: torch.Tensor, targets: torch.Tensor, window: int = 1,
                 update: bool = True) -> torch.Tensor:
        """Returns the batch's loss, detached, on the device. `window`: batches in this accumulation
        window (the loss is divided by it); `update`: this batch ends the window."""
        if self.mixup_fn is not None:
            samples, targets = self.mixup_fn(samples, targets)
        if self.cosub:
            samples = torch.cat([samples, samples])  # two stochastic-depth draws of one batch
        # under DDP, the gradient all-reduce runs on a window's last batch only
        no_sync = self.model.no_sync() if not update and hasattr(self.model, 'no_sync') else contextlib.nullcontext()
        with no_sync:
            with autocast(self.device, self.amp_dtype):
                loss = self.criterion(samples, self.model(samples), targets)
            self.scaler.scale(loss / window).backward()
        if update:
            self.optimizer_step()
        return loss.detach()

    def optimizer_step(self):
        if self.max_norm:
            self.scaler.unscale_(self.optimizer)  # clip the true accumulated gradient, not the scaled one
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        clear_grads(self.optimizer)
        if self.model_ema is not None and not self.step_skipped():
            self.model_ema.update(unwrap_model(self.model))

    def step_skipped(self) -> bool:
        """True when float16's GradScaler has just skipped the step (an inf or NaN gradient): it lowers its
        scale then, and only then. One host read under float16; none without a scaler."""
        if not self.scaler.is_enabled():
            return False
        before, self.scale = self.scale, self.scaler.get_scale()
        return self.scale < before


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
        print_freq: int = PRINT_FREQ,
        seed: Optional[int] = None,
        start: int = 0,
        progress: Optional[dict] = None,
        save_interval: int = 0,
        save: Optional[Callable[[int, dict], None]] = None,
) -> dict:
    """Train for one pass over `data_loader`; returns the epoch averages {'loss', 'lr'}.

    Gradients accumulate over windows of `accum_iter` batches; the final window of the epoch may be
    shorter and is stepped too, its loss averaged over its own length. `model_ema` follows every
    optimizer step taken (float16's scaler skips one whose gradient is not finite, and the EMA with
    it). The host reads the device (one sync, one collective) only where a progress line is due,
    every `print_freq` steps and at the last: there the losses are averaged over ranks, and a
    non-finite loss on any rank since the previous read raises NonFiniteLossError on all ranks
    (naming the step where it appeared), before anything of the epoch is saved.

    Exact resume: with `seed`, each batch's random draws (mixup, drop path) come from generators
    seeded by (seed, epoch, rank, batch index). A resumed epoch passes the batches from `start` on
    and the `progress` its checkpoint saved (this rank's running loss and the log meters).
    `save(batches_done, progress)` is called on every rank after every `save_interval`-th optimizer
    step of the run (counted from its first epoch; not at an epoch's last, which main.py saves).

    Stops: a rank that received a stop signal says so in the collective of the next progress line;
    every rank then finishes that optimizer step, calls `save` and returns {'stopped_at': batches done}.
    """
    model.train(set_training_mode)
    logger = MetricLogger(device)
    logger.add_meter('lr', SmoothedValue(window=1, fmt='{value:.6f}'))
    logger.add_meter('loss', SmoothedValue(window=1, fmt='{value:.4f} ({global_avg:.4f})'))  # last interval (epoch)
    losses = RunningLoss(device)
    if progress is not None:
        losses.load_state_dict(progress['loss'])
        for name, meter in progress['meters'].items():
            logger.meters[name].load_state_dict(meter)
    step = TrainStep(model, criterion, optimizer, scaler, device, amp_dtype, max_norm, model_ema, mixup_fn, cosub)
    n_steps = start + len(data_loader)
    steps_before = epoch * math.ceil(n_steps / accum_iter)  # optimizer steps of the run's earlier epochs
    rank, stop_at = get_rank(), None
    clear_grads(optimizer)
    header = f'Epoch: [{epoch}]'
    for i, (samples, targets) in enumerate(logger.log_every(data_loader, print_freq, header,
                                                           getattr(data_loader, 'batch_size', 0) or 0, start), start):
        if seed is not None:
            seeding.seed_step(seed, epoch, rank, i, device.type)
        window_start = i - i % accum_iter
        window = min(accum_iter, n_steps - window_start)  # the epoch's last window may be short
        update = i == window_start + window - 1
        loss = step(samples.to(device, non_blocking=True), targets.to(device, non_blocking=True), window, update)
        losses.add(loss, i)
        if is_log_step(i, n_steps, print_freq):  # the loop's one host read
            logger.meters['loss'].update(*losses.read(f'epoch {epoch}', stop=stop_requested() is not None))
            logger.update(lr=max(g['lr'] for g in optimizer.param_groups))
            if losses.stopping and stop_at is None:
                stop_at = window_start + window - 1  # the end of this optimizer step, alike on every rank
        if not update:
            continue
        interval_due = save_interval and (steps_before + i // accum_iter + 1) % save_interval == 0
        if save is not None and (i == stop_at or (interval_due and i < n_steps - 1)):
            save(i + 1, dict(loss=losses.state_dict(), meters={k: m.state_dict() for k, m in logger.meters.items()}))
        if i == stop_at:
            return {'stopped_at': i + 1}
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
        classes: Optional[torch.Tensor] = None,
) -> dict:
    """Cross-entropy, top-1 and top-5 accuracy (%) of `model` over `data_loader`.

    A target is a class index, or a (num_classes,) 0/1 mask of the classes that count as right
    (ImageNet-ReaL: a prediction in the image's label set is a hit; the loss is against that set,
    spread evenly). `classes`: the logits the set is scored on, in the order of the target indices
    (ImageNet-A/R: their 200 classes); None scores all of them.

    With `distributed`, each rank holds a disjoint shard of the set and the sums of losses,
    hits and counts are all-reduced, so the result equals a single-process pass exactly
    (no padded duplicates). Prints the summary line `* Acc@1 X Acc@5 Y loss Z`.
    The sums stay on the device; the host reads them only where a progress line is due (every
    PRINT_FREQ batches and at the last), as training does, so batches queue without waiting.
    """
    model.eval()
    classes = classes.to(device) if classes is not None else None
    logger = MetricLogger(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images
    shown = [0.0] * 4  # the sums as of the previous read
    n_steps = len(data_loader)
    for i, (images, target) in enumerate(logger.log_every(data_loader, PRINT_FREQ, header)):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        if classes is not None:
            output = output.index_select(-1, classes)  # the argmax runs over the set's classes only
        multi_label = target.dim() == 2
        loss = F.cross_entropy(output, target / target.sum(-1, keepdim=True) if multi_label else target,
                               reduction='sum')
        top = output.topk(min(5, output.shape[-1]), dim=-1).indices  # (B, k), best first
        hits = target.gather(-1, top).bool() if multi_label else top.eq(target[:, None])
        sums[:3].add_(torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(-1).sum().double()]))
        sums[3:].add_(len(target))  # a host number: no copy to the device
        if is_log_step(i, n_steps, PRINT_FREQ):  # the loop's one host read
            with sync_allowed(device):
                now = sums.tolist()
            images_since = now[3] - shown[3]
            if images_since:
                logger.meters['loss'].update((now[0] - shown[0]) / images_since, n=int(images_since))
                logger.meters['acc1'].update(100 * (now[1] - shown[1]) / images_since, n=int(images_since))
            shown = now
    if distributed:
        all_reduce_sum(sums)
    with sync_allowed(device):
        loss, hit1, hit5, n = sums.tolist()
    n = max(n, 1)
    stats = dict(loss=loss / n, acc1=100 * hit1 / n, acc5=100 * hit5 / n, n=int(n))
    print(f'* Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f}')
    return stats
