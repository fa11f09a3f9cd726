"""Training checkpoints: what one holds, how it is written and read, and how a run continues from one.

A checkpoint is a dict written by torch.save:

    model, model_ema     state dicts of the unwrapped model and of the EMA (no DDP or compile prefixes)
    optimizer, lr_scheduler, scaler
    epoch                the epoch it was written in
    batches_done         None: that epoch is finished (trained, evaluated, its schedule stepped);
                         k: its first k batches are trained, and the run continues at batch k
                         (written every --save-interval optimizer steps, and on a stop signal)
    progress             with batches_done: each rank's running loss of the epoch, for its log line
    world_size           the processes that wrote it (a mid-epoch position is one of their batches)
    args, max_accuracy   the command line (argparse.Namespace, as in the released files), best top-1

No random-generator state is stored: every draw a resume has to replay is a function of (seed, epoch,
position) (seeding.py), so a run continues bit-exactly from any optimizer step.

Rank 0 writes. A save goes to a temporary file beside the target, is flushed to disk and read back whole,
and only then renamed over the target; with keep_previous the file it replaces stays, as
previous_<name>, until the next save has been read back. --auto-resume (`newest_checkpoint`) falls back
to that file, with one line, when the newest one cannot be read.
"""
import argparse
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

import models_vit5
import utils
from utils import CheckpointError

PREVIOUS = 'previous_'  # checkpoint.pth -> previous_checkpoint.pth (as best_checkpoint.pth)
# Files needing any global beyond these are refused: unpickling them could run code.
SAFE_GLOBALS = [argparse.Namespace]


# ---- files ----------------------------------------------------------------------------------------
def previous_path(path: str) -> str:
    folder, name = os.path.split(path)
    return os.path.join(folder, PREVIOUS + name)


def save_checkpoint(state: dict, path: str, keep_previous: bool = False) -> None:
    """The one way this code writes a checkpoint: rank 0 only, atomically, read back before it counts.

    A crash mid-write leaves the previous file whole and at most a stray `.tmp`; a write that does not
    read back (a full or failing disk) raises CheckpointError and replaces nothing.
    """
    if not utils.is_main_process():
        return
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        load_checkpoint(tmp)
        if keep_previous and os.path.exists(path):
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
        _fsync_folder(os.path.dirname(os.path.abspath(path)))  # the renames reach the disk too
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint dict on the CPU without executing anything stored in it.

    torch.load(weights_only=True) accepts tensors, plain containers and argparse.Namespace (the
    released files pickle one). Raises CheckpointError, naming the file, for a missing, empty,
    truncated or foreign file, and for one that would need other Python objects to load.
    """
    if os.path.isdir(path):
        inside = os.path.join(path, 'checkpoint.pth')
        hint = f'; did you mean {inside}?' if os.path.isfile(inside) else ''
        raise CheckpointError(f'checkpoint {path} is a folder, not a checkpoint file{hint}')
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist')
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter('ignore', UserWarning)  # pickle-protocol chatter from the safe unpickler
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r'GLOBAL (\S+)', str(err))
        if found:
            raise CheckpointError(
                f'refusing {path}: loading it needs the Python object {found.group(1)}, which could run code; '
                f'only tensors, plain containers and argparse.Namespace are loaded (it was not unpickled)') from None
        raise CheckpointError(f'{path} is not a PyTorch checkpoint this code can read safely') from None
    except EOFError:
        raise CheckpointError(f'{path} is empty or truncated') from None
    except (RuntimeError, OSError, KeyError, ValueError, IndexError, TypeError) as err:
        # the zip reader says 'failed finding central directory' for a cut-off file
        detail = str(err).split('.')[0][:120]
        raise CheckpointError(f'{path} is truncated or not a PyTorch checkpoint ({detail})') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict')
    return ckpt


def newest_checkpoint(path: str):
    """--auto-resume: (file, checkpoint) from `path`, or from its previous_ file, with one line, when `path`
    is missing or cannot be read (cut off by a full disk, a node lost while the file system caught up, ...).
    None when neither file exists; CheckpointError when neither can be read."""
    previous = previous_path(path)
    if not os.path.exists(path) and not os.path.exists(previous):
        return None
    try:
        return path, load_checkpoint(path)
    except CheckpointError as err:
        if not os.path.exists(previous):
            raise
        print(f'{err}: resuming from the one before, {previous}')
        try:
            return previous, load_checkpoint(previous)
        except CheckpointError as err2:
            raise CheckpointError(f'no checkpoint to resume from: {err}; and {err2}') from None


# ---- what a run saves, and how it continues -----------------------------------------------------------
def scheduler_state(scheduler):
    """What a checkpoint stores of the schedule. timm's plateau schedule keeps its patience counters
    in the torch ReduceLROnPlateau inside it and saves only part of them, so that one is stored."""
    return getattr(scheduler, 'lr_scheduler', scheduler)


def training_state(args, epoch: int, model, model_ema, optimizer, scheduler, scaler, max_accuracy,
                   batches_done: Optional[int] = None, progress: Optional[dict] = None) -> dict:
    """Everything a resume needs, at the end of `epoch` or after `batches_done` of its batches (then with this
    rank's `progress`). Collective in that case (gathers every rank's progress): call it on all ranks."""
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                 lr_scheduler=scheduler_state(scheduler).state_dict(), scaler=scaler.state_dict(), epoch=epoch,
                 batches_done=batches_done, world_size=utils.get_world_size(), args=args,
                 max_accuracy=max_accuracy)
    if batches_done is not None:
        state['progress'] = utils.all_gather_object(progress)
    if model_ema is not None:
        state['model_ema'] = model_ema.module.state_dict()
    return state


@dataclass
class ResumePoint:
    """Where a run continues: at batch `batch` of `epoch`, with this rank's `progress` of that epoch."""
    epoch: int
    batch: int = 0
    progress: Optional[dict] = None
    max_accuracy: Optional[float] = None


def resume_training(args, ckpt: dict, path: str, model, model_ema, optimizer, scheduler, scaler) -> ResumePoint:
    """Restore optimizer, schedule, gradient scaler and EMA from a checkpoint (the model's weights are
    already in); returns where the run continues."""
    for key in ('optimizer', 'lr_scheduler', 'epoch'):
        if key not in ckpt:
            raise CheckpointError(f'{path} has no {key!r} to resume from (use --finetune to start from its weights)')
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError) as err:
        raise CheckpointError(f'{path}: optimizer state does not fit this run ({err})') from None
    scheduler_state(scheduler).load_state_dict(ckpt['lr_scheduler'])
    if ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    if model_ema is not None:
        restore_ema(model_ema, model, ckpt, path)
    epoch, done, best = ckpt['epoch'], ckpt.get('batches_done'), ckpt.get('max_accuracy')
    saved, world = ckpt.get('args'), ckpt.get('world_size')
    if done is None:
        if world is not None and world != utils.get_world_size():
            print(world_change_note(args, saved, path, world))
        return ResumePoint(epoch + 1, max_accuracy=best)
    per_step = getattr(saved, 'batch_size', None), world
    if per_step == (args.batch_size, utils.get_world_size()) and isinstance(ckpt.get('progress'), list):
        return ResumePoint(epoch, done, ckpt['progress'][utils.get_rank()], best)
    # other processes or batches: continue after as many of the epoch's images, not bit for bit
    batch = done * per_step[0] * per_step[1] // (args.batch_size * utils.get_world_size()) if all(per_step) else 0
    print(f'{path} stopped at batch {done} of epoch {epoch} with {world} process(es) x batch {per_step[0]}; '
          f'with {utils.get_world_size()} x {args.batch_size} the epoch continues at batch {batch}, after as many '
          f'images (the same data order and draws need the same processes and batch size)')
    return ResumePoint(epoch, batch, None, best)


def world_change_note(args, saved, path: str, saved_world: int) -> str:
    """Resuming at an epoch's end with another number of processes continues the run: the one line saying
    what that means."""
    world = utils.get_world_size()
    batch = args.batch_size * args.accum_iter * world
    saved_batch = getattr(saved, 'batch_size', 0) * getattr(saved, 'accum_iter', 1) * saved_world
    change = f' (global batch {saved_batch} -> {batch})' if saved_batch and saved_batch != batch else ''
    return (f'Resuming {path}, saved by {saved_world} process(es), in {world}: each rank draws from (--seed, epoch, '
            f'rank), the sampler deals the data over {world} process(es), and the lr schedule continues as '
            f'saved{change}')


def restore_ema(model_ema, model, ckpt: dict, path: str) -> None:
    """The EMA weights of a checkpoint (pos_embed resampled as the model's were), or the model's when it has none."""
    if not isinstance(ckpt.get('model_ema'), dict):
        print(f'{path} has no EMA weights: the EMA restarts from the model')
        model_ema.set(model)
        return
    ema = model_ema.module
    try:
        ema.load_state_dict(models_vit5.checkpoint_filter_fn({'model': ckpt['model_ema']}, ema))
    except (RuntimeError, ValueError, KeyError) as err:
        detail = ' '.join(str(err).split())[:200]
        raise CheckpointError(f'{path}: its EMA weights (model_ema) do not fit the model ({detail})') from None
