"""Train or evaluate ViT-5 (and the DeiT-III baselines) on ImageNet and smaller image sets.

    torchrun --nproc_per_node 8 main.py --model vit5_small --data-path IMNET --output_dir OUT ...
    python main.py --model vit5_tiny --data-set FOLDER --data-path DIR --device cpu ...   # one process
    python main.py --eval --resume OUT/checkpoint.pth [--load_ema] --model vit5_small --data-path IMNET

Errors in the inputs (data, checkpoints, settings) end the run with a one-line message and exit
code 2; a loss that stops being finite ends every rank with exit code 1.
"""
import argparse
import datetime
import json
import os
import sys
import time
from typing import Optional

import timm
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, ParseKwargs

import gpu_augment
import models_vit5
import utils
from datasets import DataError, build_dataset
from engine import evaluate, train_one_epoch
from losses import build_criterion
from samplers import RASampler
from utils import CheckpointError, ConfigError, NonFiniteLossError

AMP_DTYPES = dict(bfloat16=torch.bfloat16, float16=torch.float16, float32=torch.float32)
SCHEDULES = ('cosine', 'tanh', 'step', 'poly', 'plateau', 'constant')


class KeyValueArgs(ParseKwargs):
    """timm's key=value parsing (`qk_norm=False depth=2` -> dict of literals), with a usage error
    instead of a traceback for an item without '='."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [v for v in values if '=' not in v]
        if bad:
            raise argparse.ArgumentError(self, f'expected key=value, got {bad[0]!r}')
        super().__call__(parser, namespace, values, option_string)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('ViT-5 training and evaluation', add_help=True)
    bool_flag = argparse.BooleanOptionalAction  # --x / --no-x

    g = p.add_argument_group('model')
    g.add_argument('--model', default='vit5_base', choices=timm.list_models(module='models_vit5'))
    g.add_argument('--input-size', default=224, type=int, help='image side in pixels')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=KeyValueArgs, metavar='K=V',
                   help='extra create_model arguments, e.g. qk_norm=False num_registers=0')
    g.add_argument('--drop', type=float, default=0.0, help='dropout before the head')
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate (same in every block)')
    g.add_argument('--flash', action=bool_flag, default=False, help='flash-attn backend (needs flash-attn)')
    g.add_argument('--compile', action='store_true',
                   help="torch.compile the training model (and the gpu data pipeline's pixel-wise steps)")
    g.add_argument('--model-ema', action=bool_flag, default=True, help='keep an EMA of the weights')
    g.add_argument('--model-ema-decay', type=float, default=0.99996, help='EMA decay per optimizer step')
    g.add_argument('--model-ema-force-cpu', action='store_true',
                   help='keep the EMA on the CPU (not evaluated per epoch when training elsewhere)')

    g = p.add_argument_group('optimizer')
    g.add_argument('--batch-size', type=int, default=64, help='per process (--batch works too)')
    g.add_argument('--accum_iter', type=int, default=1, help='batches accumulated per optimizer step')
    g.add_argument('--opt', default='adamw', help="timm optimizer name; 'fusedlamb' uses apex, else timm LAMB")
    g.add_argument('--opt-eps', type=float, default=1e-8)
    g.add_argument('--opt-betas', type=float, nargs='+', default=None)
    g.add_argument('--clip-grad', type=float, default=None, help='max gradient norm (off by default)')
    g.add_argument('--momentum', type=float, default=0.9)
    g.add_argument('--weight-decay', type=float, default=0.05)
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay (fine-tuning)')
    g.add_argument('--unscale-lr', action='store_true',
                   help='use --lr as given; otherwise lr * batch * accum_iter * world_size / 512')

    g = p.add_argument_group('learning-rate schedule')
    g.add_argument('--epochs', type=int, default=300, help='epochs trained, cooldown included')
    g.add_argument('--sched', default='cosine', choices=SCHEDULES)
    g.add_argument('--lr', type=float, default=5e-4)
    g.add_argument('--lr-noise', type=float, nargs='+', default=None,
                   help='lr noise on/off points as fractions of the schedule')
    g.add_argument('--lr-noise-pct', type=float, default=0.67)
    g.add_argument('--lr-noise-std', type=float, default=1.0)
    g.add_argument('--warmup-lr', type=float, default=1e-6)
    g.add_argument('--min-lr', type=float, default=1e-5)
    g.add_argument('--decay-epochs', type=float, default=30, help='step schedule: epochs between decays')
    g.add_argument('--warmup-epochs', type=int, default=5)
    g.add_argument('--cooldown-epochs', type=int, default=10,
                   help='last epochs held at --min-lr (cosine/tanh/poly)')
    g.add_argument('--patience-epochs', type=int, default=10, help='plateau schedule: epochs without gain')
    g.add_argument('--decay-rate', type=float, default=0.1, help='step/plateau factor, poly power')

    g = p.add_argument_group('augmentation')
    g.add_argument('--color-jitter', type=float, default=0.3)
    g.add_argument('--hflip', type=float, default=0.5,
                   help='horizontal flip probability (0 for data where a mirror image is another class)')
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help="timm AutoAugment policy, 'none' for off")
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--train-interpolation', default='bicubic')
    g.add_argument('--repeated-aug', action=bool_flag, default=True, help='3 augmented copies per image (RASampler)')
    g.add_argument('--train-mode', action=bool_flag, default=True,
                   help='model.train() while training (--no-train-mode: no dropout / drop path)')
    g.add_argument('--ThreeAugment', action='store_true', help='crop, flip, one of gray/solarize/blur, jitter')
    g.add_argument('--src', action='store_true', help='ThreeAugment with simple random crop')
    g.add_argument('--reprob', type=float, default=0.25, help='random erase probability')
    g.add_argument('--remode', default='pixel')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--resplit', action='store_true',
                   help='no random erasing on the clean augmentation split (needs augmentation splits)')
    g.add_argument('--mixup', type=float, default=0.8, help='mixup alpha, 0 for off')
    g.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha, 0 for off')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'))
    g.add_argument('--bce-loss', action='store_true', help='BCE on binarised (mixed) targets')
    g.add_argument('--eval-crop-ratio', type=float, default=0.875)

    g = p.add_argument_group('distillation and co-training')
    g.add_argument('--teacher-model', default='regnety_160', help='timm model name of the teacher')
    g.add_argument('--teacher-path', default='', help='local checkpoint of the teacher')
    g.add_argument('--distillation-type', default='none', choices=('none', 'soft', 'hard'))
    g.add_argument('--distillation-alpha', type=float, default=0.5)
    g.add_argument('--distillation-tau', type=float, default=1.0)
    g.add_argument('--cosub', action='store_true', help='co-training of two stochastic-depth sub-models')

    g = p.add_argument_group('fine-tuning')
    g.add_argument('--finetune', default='', help='start from these weights (pos_embed resampled, head '
                                                  'of another shape dropped)')
    g.add_argument('--load_ema', action='store_true', help="--finetune / --eval read 'model_ema'")
    g.add_argument('--attn-only', action='store_true',
                   help='train attention, patch / position embedding and head only')

    g = p.add_argument_group('data')
    g.add_argument('--data-path', default=None)
    g.add_argument('--data-set', default='IMNET', choices=('IMNET', 'CIFAR', 'CIFAR10', 'INAT', 'INAT19', 'FOLDER'))
    g.add_argument('--inat-category', default='name',
                   choices=('kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name'))
    g.add_argument('--nb-classes', type=int, default=None, help='classifier size (default: from the data)')
    g.add_argument('--num_workers', type=int, default=10)
    g.add_argument('--pin-mem', action=bool_flag, default=True, help='pinned host memory (CUDA only)')
    g.add_argument('--data-pipeline', default='auto', choices=('auto', 'cpu', 'gpu'),
                   help='cpu: PIL augments in the DataLoader workers; gpu: the workers decode and crop, '
                        'the device runs ThreeAugment (or the eval resize) on whole batches; '
                        'auto: gpu on CUDA with --ThreeAugment, else cpu')

    g = p.add_argument_group('runtime')
    g.add_argument('--output_dir', default='', help='checkpoints and logs go here (nothing saved if empty)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--amp-dtype', default=None, choices=tuple(AMP_DTYPES),
                   help='autocast dtype (default bfloat16 on CUDA, float32 elsewhere)')
    g.add_argument('--seed', type=int, default=42)
    g.add_argument('--resume', default='', help='checkpoint to continue from')
    g.add_argument('--auto-resume', action='store_true', help='resume from OUTPUT_DIR/checkpoint.pth if there')
    g.add_argument('--start_epoch', type=int, default=0, metavar='N')
    g.add_argument('--eval', action='store_true', help='evaluate only')
    g.add_argument('--dist-eval', action='store_true', help='evaluate on every process (each a shard)')
    g.add_argument('--distributed', action='store_true', help='insist on a multi-process launch')
    g.add_argument('--world_size', type=int, default=1, help='expected number of processes')
    g.add_argument('--dist_url', default='env://')

    g = p.add_argument_group('logging')
    g.add_argument('--if_wandb', action='store_true', help='log to Weights & Biases')
    g.add_argument('--disable_wandb', dest='if_wandb', action='store_false')
    g.add_argument('--wandb_key', default=None)
    g.add_argument('--wandb_project', default='vit5')
    g.add_argument('--wandb_entity', default=None)
    g.add_argument('--wandb_resume', default=None, metavar='RUN_ID', help='continue this wandb run')
    return p


# ---- settings ------------------------------------------------------------------------------------
def check_args(args) -> None:
    """Combinations that cannot work, refused before anything is built."""
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if args.bce_loss and args.smoothing > 0:
        raise ConfigError(f'--bce-loss binarises the targets, so every smoothed class would become a '
                          f'positive: pass --smoothing 0 (got {args.smoothing})')
    if mixup_active and not args.eval and args.batch_size % 2:
        raise ConfigError(f'mixup/cutmix need an even --batch-size, got {args.batch_size}')
    if args.cosub and args.distillation_type != 'none':
        raise ConfigError('--cosub and --distillation-type are alternatives; pick one')
    if args.resplit:
        raise ConfigError('--resplit only acts on augmentation splits, which this recipe does not use')
    if args.accum_iter < 1:
        raise ConfigError(f'--accum_iter must be >= 1, got {args.accum_iter}')
    if args.auto_resume and not args.output_dir:
        raise ConfigError('--auto-resume needs --output_dir')


def resolve_device(args):
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise ConfigError(f'--device {args.device!r}: {err}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ConfigError(f'--device {args.device} asked for, but CUDA is not available')
    if args.amp_dtype is None:
        args.amp_dtype = 'bfloat16' if device.type == 'cuda' else 'float32'
    return device, AMP_DTYPES[args.amp_dtype]


# ---- data ----------------------------------------------------------------------------------------
def data_pipeline(args, device) -> str:
    """'cpu' or 'gpu': where --data-pipeline (auto included) puts the augmentation."""
    if args.data_pipeline == 'auto':
        return 'gpu' if device.type == 'cuda' and args.ThreeAugment else 'cpu'
    if args.data_pipeline == 'gpu' and not (args.ThreeAugment or args.eval):
        raise ConfigError('--data-pipeline gpu trains with the ThreeAugment recipe only: add --ThreeAugment, '
                          'or use --data-pipeline cpu for the RandAugment recipe')
    return args.data_pipeline


def build_loaders(args, device):
    """(train loader or None under --eval, val loader, number of val images, number of classes).

    With the gpu pipeline the workers ship cropped uint8 pixels and a DeviceLoader finishes each
    batch on `device`; either way the loaders yield (images, targets) ready for the model.
    """
    world, rank = utils.get_world_size(), utils.get_rank()
    pin = args.pin_mem and device.type == 'cuda'
    gpu = data_pipeline(args, device) == 'gpu'
    print(f'Data pipeline: gpu (augmentation on {device})' if gpu else 'Data pipeline: cpu')

    def make_loader(dataset, **kw):
        loader = torch.utils.data.DataLoader(dataset, num_workers=args.num_workers, pin_memory=pin,
                                             collate_fn=gpu_augment.collate if gpu else None, **kw)
        if not gpu:
            return loader
        return gpu_augment.DeviceLoader(loader, gpu_augment.DeviceAugment(args.input_size, compile=args.compile), device)

    def dataset(is_train):
        return build_dataset(is_train, args, gpu_augment.worker_transform(is_train, args) if gpu else None)

    dataset_val, nb_classes = dataset(False)
    val_set = dataset_val
    if args.distributed and args.dist_eval:
        val_set = torch.utils.data.Subset(dataset_val, range(rank, len(dataset_val), world))  # no padding
    loader_val = make_loader(val_set, batch_size=int(1.5 * args.batch_size), shuffle=False)
    if args.eval:
        return None, loader_val, len(dataset_val), nb_classes

    dataset_train, nb_classes = dataset(True)
    if args.repeated_aug:
        sampler = RASampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    else:  # DistributedSampler with one replica is a seeded, epoch-dependent shuffle
        sampler = torch.utils.data.DistributedSampler(dataset_train, num_replicas=world, rank=rank,
                                                      shuffle=True, seed=args.seed)
    loader_train = make_loader(dataset_train, sampler=sampler, batch_size=args.batch_size, drop_last=True)
    if len(loader_train) == 0:
        raise ConfigError(f'{args.data_path}: {len(sampler)} training images per process make no full batch '
                          f'of --batch-size {args.batch_size}')
    return loader_train, loader_val, len(dataset_val), nb_classes


def build_mixup(args, nb_classes) -> Optional[Mixup]:
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=nb_classes)


# ---- model and weights -----------------------------------------------------------------------------
def build_model(args, nb_classes: int) -> nn.Module:
    try:
        model = timm.create_model(args.model, num_classes=nb_classes, img_size=args.input_size,
                                  drop_rate=args.drop, drop_path_rate=args.drop_path,
                                  attn_backend='flash_attn' if args.flash else 'sdpa', **args.model_kwargs)
    except (TypeError, ValueError, ImportError) as err:  # bad --model-kwargs, sizes, missing flash-attn
        raise ConfigError(f'cannot build {args.model} with {args.model_kwargs or "default settings"}: {err}') from None
    if args.attn_only:
        trainable = ('head.', 'pos_embed', 'patch_embed.')
        for name, param in model.named_parameters():
            param.requires_grad_('.attn.' in name or name.startswith(trainable))
    return model


def _listing(items, n: int = 4) -> str:
    items = list(items)
    more = f' and {len(items) - n} more' if len(items) > n else ''
    return ', '.join(str(i) for i in items[:n]) + more


def weight_mismatch(own: dict, state: dict) -> str:
    """'' when `state` fits the state dict `own` exactly; else which keys differ, and how."""
    differ = [f'{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})'
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
    prints the keys the file lacks or has in excess; any other shape difference is an error.
    """
    if use_ema and not isinstance(ckpt.get('model_ema', ckpt.get('state_dict_ema')), dict):
        raise CheckpointError(f'{path} holds no EMA weights (model_ema) for --load_ema')
    try:
        state = models_vit5.checkpoint_filter_fn(ckpt, model, use_ema=use_ema)
    except (ValueError, AttributeError, TypeError) as err:
        raise CheckpointError(f'{path} holds no usable weights: {err}') from None
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    own, name = model.state_dict(), model.pretrained_cfg.get('architecture', type(model).__name__)
    if not set(state) & set(own):
        raise CheckpointError(f'{path} holds no weights of {name} (no parameter name in common)')
    if finetune:
        head = model.pretrained_cfg.get('classifier', 'head') + '.'
        for k in [k for k in state if k.startswith(head) and k in own and state[k].shape != own[k].shape]:
            print(f'Dropping {k} of shape {tuple(state.pop(k).shape)}: the model needs {own[k].shape[0]} classes')
        shared = [k for k in state if k in own]
        mismatch = weight_mismatch({k: own[k] for k in shared}, {k: state[k] for k in shared})
    else:
        mismatch = weight_mismatch(own, state)
    if mismatch:
        raise CheckpointError(f'{path} does not fit {name}: {mismatch}')
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        print(f'Weights not in {path} (left at their initial values): {missing}')
    if unexpected:
        print(f'Weights in {path} the model does not use (ignored): {unexpected}')


def build_teacher(args, nb_classes: int, device) -> Optional[nn.Module]:
    if args.distillation_type == 'none':
        return None
    if not args.teacher_path or not os.path.isfile(args.teacher_path):
        raise ConfigError(f'--distillation-type {args.distillation_type} needs the teacher weights: '
                          f'--teacher-path {args.teacher_path!r} does not exist')
    if not timm.is_model(args.teacher_model):
        raise ConfigError(f'--teacher-model {args.teacher_model!r} is not a timm model')
    teacher = timm.create_model(args.teacher_model, num_classes=nb_classes)
    ckpt = utils.load_checkpoint(args.teacher_path)
    state = ckpt['model'] if isinstance(ckpt.get('model'), dict) else ckpt
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    mismatch = weight_mismatch(teacher.state_dict(), state)
    if mismatch:
        raise CheckpointError(f'{args.teacher_path} does not fit --teacher-model {args.teacher_model}: {mismatch}')
    teacher.load_state_dict(state)
    return teacher.to(device).eval().requires_grad_(False)


# ---- optimisation ----------------------------------------------------------------------------------
def optimizer_name(opt: str, device) -> str:
    """'fusedlamb' needs NVIDIA apex on CUDA; otherwise timm's LAMB runs with the same hyperparameters."""
    if opt != 'fusedlamb':
        return opt
    if device.type == 'cuda':
        try:
            import apex.optimizers  # noqa: F401
            return opt
        except ImportError:
            pass
    print("Notice: apex FusedLAMB is not available here; --opt fusedlamb runs timm's LAMB with the same settings")
    return 'lamb'


def build_optimizer(args, model: nn.Module, device):
    extra = dict(eps=args.opt_eps)
    if args.opt_betas:
        extra['betas'] = tuple(args.opt_betas)
    try:
        return create_optimizer_v2(model, opt=optimizer_name(args.opt, device), lr=args.lr,
                                   weight_decay=args.weight_decay, momentum=args.momentum,
                                   layer_decay=args.layer_decay, **extra)
    except (ValueError, AssertionError) as err:  # unknown optimizer name, bad betas
        raise ConfigError(f'--opt {args.opt}: {err}') from None


def build_scheduler(args, optimizer):
    """timm scheduler stepped once per epoch at its START: epoch e trains at the value for e.

    --epochs counts the cooldown: the decay spans the first epochs - cooldown epochs, the rest
    stay at --min-lr (cooldown shortened, if need be, to leave one epoch of schedule).
    """
    cooldown = max(0, min(args.cooldown_epochs, args.epochs - 1))
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs - cooldown, decay_epochs=args.decay_epochs,
        cooldown_epochs=cooldown, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        noise=args.lr_noise, noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed)
    return scheduler


def schedule(scheduler, args, epoch: int, metric: Optional[float] = None) -> None:
    """Called before `epoch` (no metric): set its lr. Called after it with its top-1: only the plateau
    schedule uses that, once its warmup is over."""
    if args.sched != 'plateau':
        if metric is None:
            scheduler.step(epoch)
    elif metric is None:
        if args.warmup_epochs and epoch <= args.warmup_epochs:  # timm's plateau warms up from --warmup-lr
            scheduler.step(epoch)
    elif epoch + 1 > args.warmup_epochs:
        scheduler.step(epoch + 1, metric)


def scheduler_state(scheduler):
    """What a checkpoint stores of the schedule. timm's plateau schedule keeps its patience counters
    in the torch ReduceLROnPlateau inside it and saves only part of them, so that one is stored."""
    return getattr(scheduler, 'lr_scheduler', scheduler)


# ---- checkpoints --------------------------------------------------------------------------------
def checkpoint_state(args, epoch, model, model_ema, optimizer, scheduler, scaler, max_accuracy) -> dict:
    """Everything a resume needs; collective (gathers every rank's RNG state), so call it on all ranks."""
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                 lr_scheduler=scheduler_state(scheduler).state_dict(), scaler=scaler.state_dict(), epoch=epoch,
                 args=args, max_accuracy=max_accuracy, rng=utils.all_gather_object(utils.get_rng_state()))
    if model_ema is not None:
        state['model_ema'] = model_ema.module.state_dict()
    return state


def resume_training(args, ckpt, model, model_ema, optimizer, scheduler, scaler):
    """Restore a run from a checkpoint; returns (start epoch, best top-1 so far)."""
    path = args.resume
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
        if isinstance(ckpt.get('model_ema'), dict):
            load_weights(model_ema.module, {'model': ckpt['model_ema']}, path, use_ema=False, finetune=False)
        else:
            print(f'{path} has no EMA weights: the EMA restarts from the model')
            model_ema.set(model)
    rng = ckpt.get('rng')
    if isinstance(rng, list) and len(rng) == utils.get_world_size():
        utils.set_rng_state(rng[utils.get_rank()])
    else:
        print(f'{path} has no RNG state for {utils.get_world_size()} process(es): random streams start afresh')
    return ckpt['epoch'] + 1, ckpt.get('max_accuracy')


def check_finite_weights(*models) -> None:
    for m in models:
        floats = [t for t in m.state_dict().values() if t.is_floating_point()] if m is not None else []
        if not all(torch.isfinite(t).all() for t in floats):
            raise NonFiniteLossError('the weights became non-finite; stopping before they are saved')


# ---- evaluation and logging ---------------------------------------------------------------------
def run_eval(args, loader, model, device, amp_dtype, header='Test:') -> dict:
    """--dist-eval: every rank evaluates its shard. Otherwise rank 0 evaluates alone and shares the result."""
    if args.distributed and not args.dist_eval:
        stats = evaluate(loader, model, device, amp_dtype, header=header) if utils.is_main_process() else None
        return utils.broadcast_object(stats)
    return evaluate(loader, model, device, amp_dtype, distributed=args.distributed, header=header)


def start_wandb(args):
    try:
        import wandb
    except ImportError:
        raise ConfigError('--if_wandb needs the wandb package (pip install wandb)') from None
    if args.wandb_key:
        wandb.login(key=args.wandb_key)
    return wandb.init(project=args.wandb_project, entity=args.wandb_entity, config=vars(args),
                      id=args.wandb_resume, resume='allow' if args.wandb_resume else None,
                      dir=args.output_dir or None)


def write_json(path: str, obj, mode: str = 'w') -> None:
    if utils.is_main_process():
        with open(path, mode) as f:
            f.write(json.dumps(obj, default=str) + ('\n' if mode == 'a' else ''))


# ---- the run ------------------------------------------------------------------------------------
def main(args) -> dict:
    """Train (or with --eval, evaluate) as `args` say; returns the last epoch's log entry."""
    check_args(args)
    device, amp_dtype = resolve_device(args)
    utils.init_distributed(args, device.type)
    if device.type == 'cuda':
        device = torch.device('cuda', args.local_rank if args.distributed else (device.index or 0))
    try:
        return run(args, device, amp_dtype)
    finally:
        if utils.is_dist():
            torch.distributed.destroy_process_group()


def run(args, device, amp_dtype) -> dict:
    utils.seed_everything(args.seed + utils.get_rank())
    if args.output_dir and utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
    if args.auto_resume and os.path.isfile(os.path.join(args.output_dir, 'checkpoint.pth')):
        args.resume = os.path.join(args.output_dir, 'checkpoint.pth')
        print(f'Auto-resuming from {args.resume}')
    loader_train, loader_val, n_val, nb_classes = build_loaders(args, device)
    model, ckpt = prepare_model(args, nb_classes, device)
    if args.eval:
        stats = run_eval(args, loader_val, model, device, amp_dtype)
        print(f'Accuracy of the network on the {n_val} test images: {stats["acc1"]:.1f}%')
        return stats
    return train(args, model, ckpt, loader_train, loader_val, n_val, nb_classes, device, amp_dtype)


def prepare_model(args, nb_classes: int, device):
    """The model on `device` with the weights asked for; also the --resume checkpoint (or None)."""
    model = build_model(args, nb_classes)
    ckpt = utils.load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        if args.finetune:
            print(f'Resuming from {args.resume}: --finetune {args.finetune} is not loaded')
        load_weights(model, ckpt, args.resume, use_ema=args.eval and args.load_ema, finetune=False)
    elif args.finetune:
        load_weights(model, utils.load_checkpoint(args.finetune), args.finetune, args.load_ema, finetune=True)
    print(f'{args.model}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters')
    return model.to(device), ckpt


def evaluate_epoch(args, loader, n_val: int, model, model_ema, device, amp_dtype) -> dict:
    """test_* entries of the epoch's log: the model, then the EMA when it is on the training device."""
    stats = run_eval(args, loader, model, device, amp_dtype)
    print(f'Accuracy of the network on the {n_val} test images: {stats["acc1"]:.1f}%')
    log = {f'test_{k}': v for k, v in stats.items() if k != 'n'}
    if model_ema is not None and next(model_ema.module.parameters()).device.type == device.type:
        ema_stats = run_eval(args, loader, model_ema.module, device, amp_dtype, header='Test (EMA):')
        log.update({f'test_{k}_ema': v for k, v in ema_stats.items() if k != 'n'})
    return log


def train(args, model, ckpt, loader_train, loader_val, n_val, nb_classes, device, amp_dtype) -> dict:
    """The training loop; returns the last epoch's log entry."""
    if not args.unscale_lr:
        args.lr = args.lr * args.batch_size * args.accum_iter * utils.get_world_size() / 512.0
    train_model = torch.compile(model) if args.compile else model
    if args.distributed:  # DDP copies rank 0's weights to every rank, so build the EMA after it
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == 'cuda' else None)
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)
    optimizer = build_optimizer(args, model, device)
    scheduler = build_scheduler(args, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    mixup_fn = build_mixup(args, nb_classes)
    criterion = build_criterion(mixup_fn is not None, args.smoothing, args.bce_loss, args.cosub,
                                build_teacher(args, nb_classes, device), args.distillation_type,
                                args.distillation_alpha, args.distillation_tau)
    max_accuracy = None
    if ckpt is not None:  # last: restores the RNG streams after everything above drew from them
        args.start_epoch, max_accuracy = resume_training(args, ckpt, model, model_ema, optimizer, scheduler, scaler)
    run_logger = start_wandb(args) if args.if_wandb and utils.is_main_process() else None
    out = args.output_dir
    if out:
        write_json(os.path.join(out, 'args.json'), vars(args))
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)

    print(f'Training for {args.epochs} epochs from epoch {args.start_epoch}')
    start_time, log_stats = time.time(), {}
    for epoch in range(args.start_epoch, args.epochs):
        loader_train.sampler.set_epoch(epoch)
        schedule(scheduler, args, epoch)
        train_stats = train_one_epoch(
            train_model, criterion, loader_train, optimizer, device, epoch, scaler, amp_dtype,
            max_norm=args.clip_grad, model_ema=model_ema, mixup_fn=mixup_fn, accum_iter=args.accum_iter,
            cosub=args.cosub, set_training_mode=args.train_mode)
        check_finite_weights(model, model_ema.module if model_ema is not None else None)
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **evaluate_epoch(args, loader_val, n_val, model, model_ema, device, amp_dtype),
                     'epoch': epoch, 'n_parameters': n_parameters}
        schedule(scheduler, args, epoch, metric=log_stats['test_acc1'])
        is_best = max_accuracy is None or log_stats['test_acc1'] > max_accuracy
        max_accuracy = log_stats['test_acc1'] if is_best else max_accuracy
        print(f'Max accuracy: {max_accuracy:.2f}%')
        if out:
            state = checkpoint_state(args, epoch, model, model_ema, optimizer, scheduler, scaler, max_accuracy)
            utils.save_checkpoint(state, os.path.join(out, 'checkpoint.pth'))
            if is_best:
                utils.save_checkpoint(state, os.path.join(out, 'best_checkpoint.pth'))
            write_json(os.path.join(out, 'log.txt'), log_stats, mode='a')
        if run_logger is not None:
            run_logger.log(log_stats, step=epoch)
    if run_logger is not None:
        run_logger.finish()
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return log_stats


def one_line(err: Exception) -> str:
    """The message of `err` on one line; an error re-raised from a DataLoader worker carries the
    worker's traceback in its text, of which only the last line (the original message) is kept."""
    text = str(err).strip()
    if 'Traceback' in text:
        text = text.splitlines()[-1]
        text = text.split(': ', 1)[1] if ': ' in text else text
    return ' '.join(text.split())


def cli(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except (DataError, CheckpointError, ConfigError) as err:
        sys.stderr.write(f'error: {one_line(err)}\n')  # not print(): other ranks' print is muted
        return 2
    except NonFiniteLossError as err:
        sys.stderr.write(f'error: {one_line(err)}\n')
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(cli())
