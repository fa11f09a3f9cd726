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
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import timm
import torch
import torch.nn as nn

import models_vit5
import utils
from utils import CheckpointError, ConfigError

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
    already in); returns where the run continues. Optimizer hyperparameters and lr schedule flags the resume
    changed (take_run_settings) take effect: those hyperparameters are set over the restored state, and the
    schedule is the one built from the new settings."""
    changes = set(getattr(args, 'resume_changes', ()))  # flags given with other values than the checkpoint's
    built = [{k: v for k, v in group.items() if k not in ('params', 'lr', 'initial_lr')}
             for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError) as err:
        raise CheckpointError(f'{path}: optimizer state does not fit this run ({err})') from None
    if changes & set(OPTIMIZER_SETTINGS):  # the new hyperparameters over the restored moments
        for group, hyper in zip(optimizer.param_groups, built):
            group.update(hyper)
    if not changes & set(SCHEDULE_SETTINGS):  # else the schedule built from the new settings stays
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


# ---- a run's settings: what a resume, an evaluation or a fine-tune takes from the file -----------------
# main.py flags that rebuild a checkpoint's model: --eval --resume and --finetune FILE take them from the file
MODEL_SETTINGS = ('model', 'model_kwargs', 'input_size', 'nb_classes')
# flags of the lr schedule: one a resume changes makes the schedule rebuilt from the new settings, not restored
SCHEDULE_SETTINGS = ('epochs', 'sched', 'lr', 'lr_noise', 'lr_noise_pct', 'lr_noise_std', 'warmup_lr', 'min_lr',
                     'decay_epochs', 'warmup_epochs', 'cooldown_epochs', 'patience_epochs', 'decay_rate')
# optimizer hyperparameters: one a resume changes is set over the restored optimizer state
OPTIMIZER_SETTINGS = ('weight_decay', 'opt_eps', 'opt_betas', 'momentum', 'layer_decay')


def flag_text(key: str, value) -> str:
    if isinstance(value, dict):
        value = ' '.join(f'{k}={v}' for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        value = ' '.join(map(str, value))
    return f'--{key.replace("_", "-")} {value}'


def take_settings(args, settings: dict, source: str) -> None:
    """Model settings (MODEL_SETTINGS keys) from a checkpoint or a released tag, for the flags the user did
    not give (args.given; without that record, none are taken). Prints what was taken."""
    given = getattr(args, 'given', None)
    if given is None:
        return
    taken = {k: v for k, v in settings.items() if k not in given and v is not None and v != getattr(args, k)}
    for key, value in taken.items():
        setattr(args, key, value)
    if taken:
        print(f'Model settings from {source}: {" ".join(flag_text(k, v) for k, v in taken.items())} '
              f'(give a flag to override)')


def take_model_settings(args, ckpt: dict, path: str, keys=MODEL_SETTINGS) -> None:
    """The model settings a checkpoint was trained with (its `args`), for those the user did not give. A --model
    given that is not the file's takes none of them (the file's kwargs and sizes are another model's)."""
    saved = ckpt.get('args')
    if not isinstance(saved, argparse.Namespace):
        return
    settings = {key: getattr(saved, key, None) for key in keys}
    if not known_model(saved, path):
        settings.pop('model')
    elif 'model' in getattr(args, 'given', ()) and args.model != settings['model']:
        return
    take_settings(args, settings, path)


def known_model(saved: argparse.Namespace, path: str) -> bool:
    """False, with one line, when a checkpoint's args name a --model this code does not define (then none is taken)."""
    model = getattr(saved, 'model', None)
    if model is None or model in timm.list_models(module='models_vit5'):
        return True
    print(f'{path} was trained with --model {model}, which this code does not define')
    return False


def take_finetune_settings(args) -> None:
    """--finetune: the model settings of a released tag (e.g. vit5_base.in1k_384: model and input size) or of a
    checkpoint file's args (model, kwargs and input size: the classifier follows the new data), for those the
    user did not give. A --model of another architecture cannot take a tag's weights."""
    if os.path.isfile(args.finetune):
        take_model_settings(args, load_checkpoint(args.finetune), args.finetune, keys=MODEL_SETTINGS[:3])
        return
    cfg = models_vit5.released_cfg(args.finetune)
    if cfg is None:
        return
    if 'model' in getattr(args, 'given', ()) and args.model != cfg['architecture']:
        raise ConfigError(f'--finetune {args.finetune} holds {cfg["architecture"]} weights, which --model '
                          f'{args.model} cannot take')
    take_settings(args, dict(model=cfg['architecture'], input_size=cfg['input_size'][-1]), args.finetune)


def given_lr(saved: argparse.Namespace, ckpt: dict) -> float:
    """The --lr a checkpoint's run was started with: its args hold the lr after the batch-size rule (lr x batch x
    accum_iter x world size / 512 without --unscale-lr), as the released files' do."""
    if getattr(saved, 'unscale_lr', False):
        return saved.lr
    world = ckpt.get('world_size') or getattr(saved, 'world_size', 1) or 1
    return saved.lr * 512.0 / (saved.batch_size * getattr(saved, 'accum_iter', 1) * world)


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)  # an lr through the batch-size rule and back
    return a == b


def take_run_settings(args, ckpt: dict, path: str, flags, found: bool = False) -> None:
    """A resume continues the run the checkpoint holds: each of `flags` (the run's settings: model, recipe, data,
    seed; not the machine's or the launch's) the user did not give takes the checkpoint's value. One line lists
    the flags given with another value; `args.resume_changes` names them (resume_training makes the schedule and
    the optimizer follow them). Without --output_dir the run goes on writing beside the checkpoint. `found`: the
    file is the one --auto-resume found."""
    for key in ('optimizer', 'lr_scheduler', 'epoch'):  # a released file, or weights alone
        if key not in ckpt:
            raise CheckpointError(f'{path} has no {key!r} to resume from (use --finetune to start from its weights)')
    saved, given = ckpt.get('args'), getattr(args, 'given', None)
    if not isinstance(saved, argparse.Namespace) or given is None:  # a file without its run's command line
        take_model_settings(args, ckpt, path)
        args.resume_changes = []
        return
    if not known_model(saved, path):
        flags = [key for key in flags if key not in MODEL_SETTINGS]
    # the run's values (a flag newer than the checkpoint is left out: today's default)
    run = {key: given_lr(saved, ckpt) if key == 'lr' else getattr(saved, key) for key in flags if hasattr(saved, key)}
    changed = [key for key, value in run.items() if key in given and not _same(value, getattr(args, key))]
    for key, value in run.items():
        if key not in given:
            setattr(args, key, value)
    args.resume_changes = changed
    if 'output_dir' not in given:
        args.output_dir = os.path.dirname(path) or '.'
    text = ', '.join(f'{flag_text(key, run[key])} -> {flag_text(key, getattr(args, key)).split(" ", 1)[1]}'
                     for key in changed)
    rebuilt = ' (the lr schedule is rebuilt for them)' if set(changed) & set(SCHEDULE_SETTINGS) else ''
    print(f'{"Auto-resuming from" if found else "Resuming"} {path} with the settings it was trained with, writing to '
          f'{args.output_dir}; '
          + (f'changed: {text}{rebuilt}' if changed else 'no setting changed'))


def nothing_left_to_train(args, ckpt: dict) -> bool:
    """True when the checkpoint already holds the run's last epoch. --auto-resume (a requeued job) then
    ends quietly; an explicit --resume is an error, since the user expected training to happen."""
    last = ckpt.get('epoch')
    if not isinstance(last, int) or last + 1 < args.epochs or ckpt.get('batches_done') is not None:
        return False
    message = (f'nothing left to train: {args.resume} already finished epoch {last}, the last of --epochs '
               f'{args.epochs}')
    if args.auto_resume:
        print(message[0].upper() + message[1:])
        return True
    raise ConfigError(f'{message}; raise --epochs to train further, or evaluate it with --eval --resume {args.resume}')


# what a run leaves in its --output_dir that a run writing there would overwrite or extend
RUN_STATE = ('checkpoint.pth', PREVIOUS + 'checkpoint.pth', 'best_checkpoint.pth', 'log.txt')


def check_run_folder(out: str, resume: str = '', newest: bool = False) -> None:
    """Training writes into --output_dir only what continues the run there: a folder holding a run (its
    checkpoints or log) is refused to a new run, a fine-tune, or a resume of any other file than the folder's
    own checkpoint.pth (`newest`: --auto-resume found the file, the folder's newest readable one)."""
    if not out or newest:
        return
    held = [name for name in RUN_STATE if os.path.exists(os.path.join(out, name))]
    if not held:
        return
    last = os.path.join(out, 'checkpoint.pth')
    if resume and os.path.exists(last) and os.path.samefile(resume, last):
        return
    what = f'resuming {resume}' if resume else 'a new run'
    raise ConfigError(f'--output_dir {out} holds a run ({", ".join(held)}) that {what} would overwrite: continue '
                      f'that run with --resume {last} (or --auto-resume), or write to another --output_dir')


# ---- weights into a model ------------------------------------------------------------------------------
def _listing(items, n: int = 4) -> str:
    items = list(items)
    more = f' and {len(items) - n} more' if len(items) > n else ''
    return ', '.join(str(i) for i in items[:n]) + more


def weight_mismatch(own: dict, state: dict, file_shapes: Optional[dict] = None) -> str:
    """'' when `state` fits the state dict `own` exactly; else which keys differ, and how.
    `file_shapes` gives the shapes the file itself holds, where `state` was adapted (a resampled pos_embed)."""
    file_shapes = file_shapes or {}
    differ = [f'{k} (file {file_shapes.get(k, tuple(v.shape))}, model {tuple(own[k].shape)})'
              for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    return '; '.join(text for text in (
        differ and f'shapes differ for {_listing(differ)}',
        missing and f'missing keys [{_listing(missing)}]',
        unexpected and f'unexpected keys [{_listing(unexpected)}]') if text)


def load_weights(model: nn.Module, ckpt: dict, path: str, use_ema: bool, finetune: bool) -> None:
    """Put a checkpoint's `model` (or `model_ema`) weights into `model`.

    Prefixes are stripped and pos_embed resampled to the model's grid (checkpoint_filter_fn).
    Resume / eval demand an exact fit. Fine-tuning drops a classifier head of another shape and
    prints one summary line (finetune_summary); any other shape difference is an error.
    """
    has_ema = isinstance(ckpt.get('model_ema', ckpt.get('state_dict_ema')), dict)
    if use_ema and not has_ema:
        raise CheckpointError(f'{path} holds no EMA weights (model_ema) for --load_ema')
    try:
        file_shapes = {k: tuple(v.shape) for k, v in models_vit5.checkpoint_state_dict(ckpt, use_ema).items()
                       if isinstance(v, torch.Tensor)}
        state = models_vit5.checkpoint_filter_fn(ckpt, model, use_ema=use_ema)
    except (ValueError, AttributeError, TypeError) as err:
        raise CheckpointError(f'{path} holds no usable weights: {err}') from None
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    own, name = model.state_dict(), model.pretrained_cfg.get('architecture', type(model).__name__)
    if not set(state) & set(own):
        raise CheckpointError(f'{path} holds no weights of {name} (no parameter name in common)')
    dropped = []
    if finetune:
        head = model.pretrained_cfg.get('classifier', 'head') + '.'
        dropped = [k for k in state if k.startswith(head) and k in own and state[k].shape != own[k].shape]
        for k in dropped:
            state.pop(k)
        shared = [k for k in state if k in own]
        mismatch = weight_mismatch({k: own[k] for k in shared}, {k: state[k] for k in shared}, file_shapes)
    else:
        mismatch = weight_mismatch(own, state, file_shapes)
    if mismatch:
        raise CheckpointError(f'{path} does not fit {name}: {mismatch}')
    missing, unexpected = model.load_state_dict(state, strict=False)
    if finetune:
        kind = 'EMA weights' if use_ema else 'model weights' if has_ema or 'model' in ckpt else 'weights'
        print(finetune_summary(path, kind, state, own, file_shapes, dropped, missing, unexpected))


def finetune_summary(path, kind, state, own, file_shapes, dropped, missing, unexpected) -> str:
    """One line: what a fine-tune took from which file, what was resampled, dropped or left out."""
    loaded = len(state) - len(unexpected)
    parts = [f'Fine-tuning from {path} ({kind}): loaded {loaded} of {len(own)} tensors']
    for k, v in state.items():
        if k in own and file_shapes.get(k, tuple(v.shape)) != tuple(v.shape):
            before, after = file_shapes[k], tuple(v.shape)
            if k == 'pos_embed':  # (1, grid cells, D): say it as grids
                before, after = ('x'.join(map(str, _square(s[1]))) for s in (before, after))
            parts.append(f'{k} resampled {before} -> {after}')
    if dropped:
        parts.append(f'dropped {", ".join(dropped)} ({file_shapes[dropped[0]][0]} classes in the file, '
                     f'{own[dropped[0]].shape[0]} in the model)')
    missing = [k for k in missing if k not in dropped]
    if missing:
        parts.append(f'not in the file, left at their initial values: {_listing(missing)}')
    if unexpected:
        parts.append(f'in the file but unused: {_listing(unexpected)}')
    return '; '.join(parts)


def _square(n: int):
    side = math.isqrt(n)
    return (side, side) if side * side == n else (n,)
