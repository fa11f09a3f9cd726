"""Train or evaluate ViT-5 (and the DeiT-III baselines) on ImageNet and smaller image sets.

    torchrun --nproc_per_node 8 main.py --model vit5_small --data-path IMNET --output_dir OUT ...
    python main.py --model vit5_tiny --data-set FOLDER --data-path DIR --device cpu ...   # one process
    python main.py --eval --resume OUT/checkpoint.pth [--load_ema] --model vit5_small --data-path IMNET
    python main.py --eval --eval-set v2 --finetune vit5_small.in1k --data-path DIR   # also real, a, r, sketch

Errors in the inputs (data, checkpoints, settings) end the run with a one-line message and exit
code 2; a loss that stops being finite, or a rank that died or hung, ends the others with exit code 1;
SIGTERM or SIGUSR1 ends training after checkpointing the step every rank agreed on, with exit code 75
(EXIT_STOPPED); Ctrl-C ends it with exit code 130.
"""
import argparse
import contextlib
import datetime
import functools
import inspect
import json
import os
import re
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

import checkpoint
import eval_sets
import gpu_augment
import models_vit5
import utils
from datasets import DataError, build_dataset, build_transform
from engine import evaluate, train_one_epoch
from losses import build_criterion
from samplers import RASampler
from seeding import SeededDataset, SeededSampler
from utils import CheckpointError, ConfigError, NonFiniteLossError, Stopped

AMP_DTYPES = dict(bfloat16=torch.bfloat16, float16=torch.float16, float32=torch.float32)
SCHEDULES = ('cosine', 'tanh', 'step', 'poly', 'plateau', 'constant')
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
CUDA_GRAPH_MODES = ('reduce-overhead', 'max-autotune')  # the compile modes that replay CUDA graphs
FUSED_OPTS = ('adam', 'adamw', 'sgd', 'momentum')  # timm names of torch optimizers with a fused kernel
EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped by a signal, checkpoint written, run again to continue


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), exit code 2."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def number(kind=int, low=None, high=None, low_open=False, high_open=False):
    """argparse `type` for a number in [low, high]; `low_open` / `high_open` exclude the bound."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {"an integer" if kind is int else "a number"}, '
                                             f'got {text!r}') from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            if high is None:
                bounds = f'{">" if low_open else ">="} {low}'
            else:
                bounds = f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
            raise argparse.ArgumentTypeError(f'must be {bounds}, got {text}')
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


COUNT = number(int, 1)  # sizes, epochs, steps: at least one
NONNEG_INT, NONNEG = number(int, 0), number(float, 0)
PROB = number(float, 0, 1)  # probabilities, decays, mixing weights
RATE = number(float, 0, 1, high_open=True)  # dropout, stochastic depth, label smoothing


class KeyValueArgs(ParseKwargs):
    """timm's key=value parsing (`qk_norm=False depth=2` -> dict of literals), with a usage error
    instead of a traceback for an item without '='."""

    def __call__(self, parser, namespace, values, option_string=None):
        bad = [v for v in values if '=' not in v]
        if bad:
            raise argparse.ArgumentError(self, f'expected key=value, got {bad[0]!r}')
        super().__call__(parser, namespace, values, option_string)


def get_args_parser() -> argparse.ArgumentParser:
    # no abbreviations: `--epoch 1` must not silently mean `--epochs 1`; the released commands' `--batch` is
    # an explicit alias of `--batch-size` instead
    p = Parser(prog='main.py', description='ViT-5 training and evaluation', allow_abbrev=False,
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bool_flag = argparse.BooleanOptionalAction  # --x / --no-x

    g = p.add_argument_group('model')
    g.add_argument('--model', default='vit5_base', choices=timm.list_models(module='models_vit5'), metavar='NAME',
                   help='one of: %(choices)s')
    g.add_argument('--input-size', default=224, type=COUNT, help='image side in pixels')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=KeyValueArgs, metavar='K=V',
                   help='extra create_model arguments, e.g. qk_norm=False num_registers=0')
    g.add_argument('--drop', type=RATE, default=0.0, help='dropout before the head')
    g.add_argument('--drop-path', type=RATE, default=0.1, help='stochastic depth rate (same in every block)')
    g.add_argument('--flash', action=bool_flag, default=False, help='flash-attn backend (needs flash-attn)')
    g.add_argument('--compile', action='store_true',
                   help="torch.compile the training model (and the gpu data pipeline's pixel-wise steps)")
    g.add_argument('--compile-mode', default=None, choices=COMPILE_MODES,
                   help="torch.compile mode (implies --compile, which alone means 'default'); reduce-overhead "
                        "and max-autotune replay the training model as CUDA graphs (not with --accum_iter > 1)")
    g.add_argument('--model-ema', action=bool_flag, default=True, help='keep an EMA of the weights')
    g.add_argument('--model-ema-decay', type=PROB, default=0.99996, help='EMA decay per optimizer step')
    g.add_argument('--model-ema-force-cpu', action='store_true',
                   help='keep the EMA on the CPU: saves a copy of the weights in device memory, but every optimizer '
                        'step then waits for the device, copies all weights to the host (one batch of copies '
                        'into pinned memory) and lerps them there on the CPU (tens of ms per step for ViT-B); '
                        'the EMA is not evaluated per epoch when training elsewhere')

    g = p.add_argument_group('optimizer')
    g.add_argument('--batch-size', '--batch', type=COUNT, default=64, help='images per process and step')
    g.add_argument('--accum_iter', type=COUNT, default=1, help='batches accumulated per optimizer step')
    g.add_argument('--opt', default='adamw', help="timm optimizer name; 'fusedlamb' uses apex, else timm LAMB")
    g.add_argument('--opt-fused', action='store_true',
                   help=f"torch's fused optimizer kernel (--opt {'/'.join(FUSED_OPTS)})")
    g.add_argument('--opt-eps', type=NONNEG, default=1e-8, help='optimizer epsilon')
    g.add_argument('--opt-betas', type=PROB, nargs='+', default=None, help="optimizer betas (when not given: the optimizer's)")
    g.add_argument('--clip-grad', type=number(float, 0, low_open=True), default=None,
                   help='max gradient norm (off when not given)')
    g.add_argument('--momentum', type=PROB, default=0.9, help='SGD / RMSProp momentum')
    g.add_argument('--weight-decay', type=NONNEG, default=0.05, help='decoupled weight decay')
    g.add_argument('--layer-decay', type=PROB, default=None, help='layer-wise lr decay (fine-tuning)')
    g.add_argument('--unscale-lr', action='store_true',
                   help='use --lr as given; otherwise lr * batch * accum_iter * world_size / 512')

    g = p.add_argument_group('learning-rate schedule')
    g.add_argument('--epochs', type=COUNT, default=300, help='epochs trained, cooldown included')
    g.add_argument('--sched', default='cosine', choices=SCHEDULES, help='lr schedule')
    g.add_argument('--lr', type=NONNEG, default=5e-4,
                   help='peak lr; scaled by batch * accum_iter * processes / 512 unless --unscale-lr')
    g.add_argument('--lr-noise', type=NONNEG, nargs='+', default=None,
                   help='lr noise on/off points as fractions of the schedule')
    g.add_argument('--lr-noise-pct', type=NONNEG, default=0.67, help='lr noise limit, as a fraction of the lr')
    g.add_argument('--lr-noise-std', type=NONNEG, default=1.0, help='lr noise standard deviation')
    g.add_argument('--warmup-lr', type=NONNEG, default=1e-6, help='lr at the start of the warmup')
    g.add_argument('--min-lr', type=NONNEG, default=1e-5, help='lr at the end of the decay and in the cooldown')
    g.add_argument('--decay-epochs', type=number(float, 0, low_open=True), default=30, help='step schedule: epochs between decays')
    g.add_argument('--warmup-epochs', type=NONNEG_INT, default=5, help='epochs of linear warmup from --warmup-lr')
    g.add_argument('--cooldown-epochs', type=NONNEG_INT, default=10,
                   help='last epochs held at --min-lr (cosine/tanh/poly)')
    g.add_argument('--patience-epochs', type=NONNEG_INT, default=10, help='plateau schedule: epochs without gain')
    g.add_argument('--decay-rate', type=NONNEG, default=0.1, help='step/plateau factor, poly power')

    g = p.add_argument_group('augmentation')
    g.add_argument('--color-jitter', type=NONNEG, default=0.3,
                   help='brightness, contrast and saturation jitter (0: off)')
    g.add_argument('--hflip', type=PROB, default=0.5,
                   help='horizontal flip probability (0 for data where a mirror image is another class)')
    g.add_argument('--aa', default='rand-m9-mstd0.5-inc1', help="timm AutoAugment policy, 'none' for off")
    g.add_argument('--smoothing', type=RATE, default=0.1, help='label smoothing')
    g.add_argument('--train-interpolation', default='bicubic',
                   help='resize interpolation of the train crop (bicubic, bilinear, random, ...)')
    g.add_argument('--repeated-aug', action=bool_flag, default=True, help='3 augmented copies per image (RASampler)')
    g.add_argument('--train-mode', action=bool_flag, default=True,
                   help='model.train() while training (--no-train-mode: no dropout / drop path)')
    g.add_argument('--ThreeAugment', action='store_true', help='crop, flip, one of gray/solarize/blur, jitter')
    g.add_argument('--src', action='store_true', help='ThreeAugment with simple random crop')
    g.add_argument('--reprob', type=PROB, default=0.25, help='random erase probability')
    g.add_argument('--remode', default='pixel', choices=('pixel', 'rand', 'const'), help='random erase fill')
    g.add_argument('--recount', type=COUNT, default=1, help='random erase: most boxes per image')
    g.add_argument('--resplit', action='store_true',
                   help='no random erasing on the clean augmentation split (needs augmentation splits)')
    g.add_argument('--mixup', type=NONNEG, default=0.8, help='mixup alpha, 0 for off')
    g.add_argument('--cutmix', type=NONNEG, default=1.0, help='cutmix alpha, 0 for off')
    g.add_argument('--cutmix-minmax', type=PROB, nargs=2, default=None, metavar=('MIN', 'MAX'),
                   help='cutmix box side as a fraction of the image, drawn from [MIN, MAX) (replaces --cutmix)')
    g.add_argument('--mixup-prob', type=PROB, default=1.0, help='probability of mixing a batch')
    g.add_argument('--mixup-switch-prob', type=PROB, default=0.5, help='probability of cutmix instead of mixup')
    g.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'),
                   help='one mixing per batch, per pair of images or per image')
    g.add_argument('--bce-loss', action='store_true', help='BCE on binarised (mixed) targets')
    g.add_argument('--eval-crop-ratio', type=number(float, 0, 1, low_open=True), default=0.875,
                   help='evaluation: resize to input-size / ratio, then centre crop')

    g = p.add_argument_group('distillation and co-training')
    g.add_argument('--teacher-model', default='regnety_160', help='timm model name of the teacher')
    g.add_argument('--teacher-path', default='', help='local checkpoint of the teacher')
    g.add_argument('--distillation-type', default='none', choices=('none', 'soft', 'hard'),
                   help="distil from --teacher-model: its softened outputs, or its top-1 class")
    g.add_argument('--distillation-alpha', type=PROB, default=0.5, help='weight of the distillation term')
    g.add_argument('--distillation-tau', type=number(float, 0, low_open=True), default=1.0, help='soft distillation temperature')
    g.add_argument('--cosub', action='store_true', help='co-training of two stochastic-depth sub-models')

    g = p.add_argument_group('fine-tuning')
    g.add_argument('--finetune', default='', metavar='CKPT',
                   help='start from these weights, a checkpoint file or a released tag such as vit5_small.in1k '
                        '(pos_embed resampled, head of another shape dropped); a tag, or the args stored in a file, '
                        'also set --model, --model-kwargs and --input-size unless given')
    g.add_argument('--load_ema', action='store_true', help="--finetune / --eval read 'model_ema'")
    g.add_argument('--attn-only', action='store_true',
                   help='train attention, patch / position embedding and head only')

    g = p.add_argument_group('data')
    g.add_argument('--data-path', default=None, metavar='DIR',
                   help="the data set folder (train/ and val/ inside); WDS: the shards' folder, URL prefix or "
                        "pipe: command with {} for the file name")
    g.add_argument('--data-set', default='IMNET',
                   choices=('IMNET', 'CIFAR', 'CIFAR10', 'INAT', 'INAT19', 'FOLDER', 'WDS'),
                   help='layout of --data-path (FOLDER: any image folder with train/ and val/; WDS: WebDataset '
                        'shards and _info.json, as timm/imagenet-1k-wds or scripts/make_shards.py)')
    g.add_argument('--eval-set', default='in1k', choices=eval_sets.EVAL_SETS,
                   help="with --eval: the set at --data-path, in its own layout and scored by its own rule "
                        "(ImageNet-ReaL, -V2, -A, -R, -Sketch; see eval_sets.py); in1k: --data-set's val/")
    g.add_argument('--real-labels', default=None, metavar='FILE',
                   help="--eval-set real: the label sets (when not given: timm's copy of real.json)")
    g.add_argument('--inat-category', default='name',
                   choices=('kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name'),
                   help='iNaturalist: the taxonomy level that makes a class')
    g.add_argument('--nb-classes', type=COUNT, default=None, help='classifier size (when not given: from the data)')
    g.add_argument('--shuffle-buffer', type=COUNT, default=1000,
                   help='WDS: samples each DataLoader worker holds to shuffle the shards it reads (undecoded: '
                        'about 110 KB each for ImageNet)')
    g.add_argument('--num_workers', type=NONNEG_INT, default=utils.default_num_workers(),
                   help=f'DataLoader worker processes per process (when not given: one per CPU core of the '
                        f'process, its share under torchrun, at most {utils.MAX_DEFAULT_WORKERS})')
    g.add_argument('--pin-mem', action=bool_flag, default=True, help='pinned host memory (CUDA only)')
    g.add_argument('--data-pipeline', default='auto', choices=('auto', 'cpu', 'gpu'),
                   help='cpu: PIL augments in the DataLoader workers; gpu: the workers decode and crop, '
                        'the device runs ThreeAugment (or the eval resize) on whole batches; '
                        'auto: gpu on CUDA with --ThreeAugment, else cpu')

    g = p.add_argument_group('runtime')
    g.add_argument('--output_dir', default='', help='checkpoints and logs go here (nothing saved if empty)')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cpu, cuda, cuda:1, ...')
    g.add_argument('--amp-dtype', default=None, choices=tuple(AMP_DTYPES),
                   help='autocast dtype (when not given: bfloat16 on CUDA, float32 elsewhere)')
    g.add_argument('--seed', type=NONNEG_INT, default=42, help='seed of every random stream (plus the rank)')
    g.add_argument('--resume', default='', metavar='CKPT',
                   help='checkpoint to continue from: the run it holds goes on with its settings (model, recipe, '
                        'data, seed) except the flags given, writing beside it unless --output_dir is given; with '
                        '--eval, to evaluate (its model settings unless given)')
    g.add_argument('--auto-resume', action='store_true',
                   help='resume from OUTPUT_DIR/checkpoint.pth if there (or from previous_checkpoint.pth when '
                        'that one cannot be read)')
    g.add_argument('--save-interval', type=NONNEG_INT, default=0, metavar='N',
                   help='also write OUTPUT_DIR/checkpoint.pth every N optimizer steps (0: at epoch ends only); '
                        'a resume from it continues at that exact step')
    g.add_argument('--start_epoch', type=NONNEG_INT, default=0, metavar='N', help='first epoch (a resume sets it)')
    g.add_argument('--eval', action='store_true', help='evaluate only')
    g.add_argument('--dist-eval', action=bool_flag, default=True,
                   help='under DDP, every process evaluates a shard of the validation set (exact: the sums are '
                        'all-reduced, nothing padded); --no-dist-eval: rank 0 evaluates alone while the others wait')
    g.add_argument('--distributed', action='store_true',
                   help='insist on a launcher; with one process, a group of one (DDP on one GPU)')
    g.add_argument('--world_size', type=COUNT, default=1, help='expected number of processes')
    g.add_argument('--dist_url', default='env://', help='process group rendezvous (env:// reads torchrun / SLURM)')
    g.add_argument('--dist-timeout', type=number(float, 0, low_open=True), default=utils.DIST_TIMEOUT_MINUTES,
                   metavar='MINUTES',
                   help="how long a collective (NCCL or gloo) may wait for the other ranks; a rank that died or hung "
                        "ends the others with a one-line error after this long. Longer than PyTorch's 10 minutes "
                        "because ranks legitimately wait on rank 0's checkpoint writes and on uneven compile times "
                        "(max-autotune)")
    g.add_argument('--tf32', action=bool_flag, default=False,
                   help='TF32 tensor cores for float32 matmuls (CUDA; cuDNN uses them for convolutions by '
                        'default; under bf16 autocast little runs in float32)')
    g.add_argument('--ddp-bucket-view', action=bool_flag, default=False,
                   help="DDP gradient_as_bucket_view: gradients live in DDP's all-reduce buckets (no copy)")
    g.add_argument('--ddp-static-graph', action=bool_flag, default=False,
                   help='DDP static_graph: the same parameters get gradients every step (not with --accum_iter > 1)')

    g = p.add_argument_group('logging')
    g.add_argument('--if_wandb', action='store_true', help='log to Weights & Biases')
    g.add_argument('--disable_wandb', dest='if_wandb', action='store_false', help='no W&B logging')
    g.add_argument('--wandb_key', default=None, help='W&B API key (when not given: the logged-in account)')
    g.add_argument('--wandb_project', default='vit5', help='W&B project')
    g.add_argument('--wandb_entity', default=None, help='W&B team or user')
    g.add_argument('--wandb_resume', default=None, metavar='RUN_ID', help='continue this wandb run')
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, plus `args.given`: the destinations of the flags the user actually gave."""
    args = get_args_parser().parse_args(argv)
    explicit = get_args_parser()
    for action in explicit._actions:
        action.default = argparse.SUPPRESS  # leaves only what was given in the namespace
    args.given = sorted(vars(explicit.parse_args(argv)))
    return args


# Flags of one invocation: what to load or do, the machine, the launch, speed and logging. A resume takes every
# other flag (the run's settings: model, recipe, data, seed, --save-interval) from its checkpoint unless given.
INVOCATION_FLAGS = frozenset((
    'resume', 'auto_resume', 'start_epoch', 'eval', 'eval_set', 'real_labels', 'finetune', 'load_ema', 'output_dir',
    'device', 'num_workers', 'pin_mem', 'flash', 'compile', 'compile_mode', 'opt_fused', 'model_ema_force_cpu', 'tf32',
    'distributed', 'world_size', 'dist_url', 'dist_timeout', 'dist_eval', 'ddp_bucket_view', 'ddp_static_graph',
    'if_wandb', 'wandb_key', 'wandb_project', 'wandb_entity', 'wandb_resume'))
RUN_SETTINGS = tuple(dict.fromkeys(a.dest for a in get_args_parser()._actions
                                   if a.dest != 'help' and a.dest not in INVOCATION_FLAGS))


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
    if args.auto_resume and not args.output_dir:
        raise ConfigError('--auto-resume needs --output_dir')
    if args.save_interval and not args.output_dir:
        raise ConfigError(f'--save-interval {args.save_interval} needs --output_dir, where the checkpoints go')
    if args.eval and not (args.resume or args.finetune or args.auto_resume):
        raise ConfigError('--eval needs weights to evaluate: --resume CKPT (a training checkpoint or a released '
                          'file) or --finetune CKPT|TAG (e.g. vit5_small.in1k); without them it would score '
                          'random weights')
    # two PyTorch bugs that make gradient accumulation fail (or, worked around, go silently wrong)
    if args.accum_iter > 1 and args.ddp_static_graph and not args.eval:
        raise ConfigError(f"--ddp-static-graph cannot run with --accum_iter {args.accum_iter}: DDP's no_sync fails "
                          f"under static_graph ('expect_autograd_hooks_ INTERNAL ASSERT FAILED', PyTorch issue "
                          f'#143580); drop --ddp-static-graph')
    if args.accum_iter > 1 and args.compile_mode in CUDA_GRAPH_MODES and not args.eval:
        raise ConfigError(f'--compile-mode {args.compile_mode} cannot run with --accum_iter {args.accum_iter}: its '
                          f"CUDA graphs overwrite one micro-batch's gradients with the next's (PyTorch issue #169545); "
                          f'use --compile-mode max-autotune-no-cudagraphs or default')
    if args.eval_set != 'in1k' and not args.eval:
        raise ConfigError(f'--eval-set {args.eval_set} is an evaluation set: add --eval (training reads '
                          f'--data-set)')
    if args.real_labels and args.eval_set != 'real':
        raise ConfigError(f'--real-labels is read by --eval-set real, not --eval-set {args.eval_set}')
    if args.cutmix_minmax is not None:
        low, high = args.cutmix_minmax
        if int(args.input_size * low) >= int(args.input_size * high):
            raise ConfigError(f'--cutmix-minmax {low} {high} leaves no box sizes to draw at --input-size '
                              f'{args.input_size}: MAX must exceed MIN by at least one pixel')
    check_output_dir(args.output_dir)


def check_output_dir(path: str) -> None:
    """--output_dir must be a folder, or creatable as one, and writable."""
    if not path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f'--output_dir {path} is a file; give a folder (it is created when missing)')
    _, existing = utils.missing_folders(path)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f'--output_dir {path}: cannot write in {existing}')


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
    batch on `device`; either way the loaders yield (images, targets) ready for the model. Each training
    image's augmentation draws from generators seeded by (seed, epoch, rank, position in the epoch's
    order) (seeding.SeededSampler), so neither the worker count nor a resume changes them; the
    DataLoaders' own seed draws come from a generator of theirs, not from the training's.
    """
    world, rank = utils.get_world_size(), utils.get_rank()
    pin = args.pin_mem and device.type == 'cuda'
    gpu = data_pipeline(args, device) == 'gpu'
    print(f'Data pipeline: gpu (augmentation on {device})' if gpu else 'Data pipeline: cpu')

    def make_loader(dataset, **kw):
        loader = torch.utils.data.DataLoader(dataset, num_workers=args.num_workers, pin_memory=pin,
                                             collate_fn=gpu_augment.collate if gpu else None,
                                             worker_init_fn=utils.loader_worker_init,
                                             generator=torch.Generator().manual_seed(args.seed), **kw)
        if not gpu:
            return loader
        augment = gpu_augment.DeviceAugment(args.input_size, compile=args.compile or bool(args.compile_mode))
        return gpu_augment.DeviceLoader(loader, augment, device)

    def dataset(is_train):
        transform = gpu_augment.worker_transform(is_train, args) if gpu else None
        if not is_train and args.eval_set != 'in1k':
            return eval_set_dataset(args, transform or build_transform(False, args))
        return build_dataset(is_train, args, transform)

    dataset_val, nb_classes = dataset(False)
    val_set, val_batch = dataset_val, int(1.5 * args.batch_size)
    shard_val = args.distributed and args.dist_eval
    if hasattr(dataset_val, 'eval_stream'):  # shards: streams cut per process (all when rank 0 evaluates alone)
        val_set = dataset_val.eval_stream(val_batch, args.num_workers, *((world, rank) if shard_val else (1, 0)))
    elif shard_val:
        val_set = torch.utils.data.Subset(dataset_val, range(rank, len(dataset_val), world))  # no padding
    loader_val = make_loader(val_set, batch_size=val_batch, shuffle=False)
    if args.eval:
        return None, loader_val, len(dataset_val), nb_classes

    dataset_train, nb_classes = dataset(True)
    if args.data_set == 'WDS':  # the stream orders and seeds itself: every sample once per epoch, equal steps per rank
        dataset_train = dataset_train.train_stream(args.batch_size, args.num_workers, world, rank, args.seed,
                                                   repeats=3 if args.repeated_aug else 1, buffer=args.shuffle_buffer)
        sampler, per_process = None, dataset_train.per_rank
    else:
        if args.repeated_aug:
            sampler = RASampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        else:  # DistributedSampler with one replica is a seeded, epoch-dependent shuffle
            sampler = torch.utils.data.DistributedSampler(dataset_train, num_replicas=world, rank=rank,
                                                          shuffle=True, seed=args.seed)
        per_process = len(sampler)
        dataset_train, sampler = SeededDataset(dataset_train), SeededSampler(sampler, args.seed, rank)
    loader_train = make_loader(dataset_train, sampler=sampler, batch_size=args.batch_size, drop_last=True)
    if len(loader_train) == 0:
        raise ConfigError(f'{args.data_path}: {per_process} training images per process make no full batch '
                          f'of --batch-size {args.batch_size}')
    return loader_train, loader_val, len(dataset_val), nb_classes


def eval_set_dataset(args, transform):
    """(dataset, 1000) of --eval-set at --data-path: the set's own layout takes the place of --data-set."""
    if 'data_set' in getattr(args, 'given', ()):
        print(f'Note: --eval-set {args.eval_set} reads its own layout; --data-set {args.data_set} is ignored')
    if args.nb_classes not in (None, eval_sets.NUM_CLASSES):
        raise ConfigError(f'--eval-set {args.eval_set} scores the {eval_sets.NUM_CLASSES} ImageNet-1k classes; '
                          f'this model has {args.nb_classes} (--nb-classes, or the checkpoint\'s)')
    dataset = eval_sets.build_eval_set(args.eval_set, args.data_path, transform, args.real_labels)
    return dataset, eval_sets.NUM_CLASSES


def build_mixup(args, nb_classes) -> Optional[Mixup]:
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=nb_classes)


def epoch_batches(loader) -> int:
    """The training batches of a whole epoch (the loader's length, unless a resume started it later)."""
    if hasattr(loader.dataset, 'set_epoch'):  # a shard stream
        return loader.dataset.batches
    return len(loader.sampler.sampler) // loader.batch_size


def set_epoch(loader, epoch: int, start_batch: int = 0) -> None:
    """The epoch's sample order from its batch `start_batch` on (a mid-epoch resume skips the batches before
    without loading them): from the sampler, or from the shard stream, which orders itself."""
    if hasattr(loader.dataset, 'set_epoch'):
        loader.dataset.set_epoch(epoch, start_batch=start_batch)
    else:
        loader.sampler.set_epoch(epoch, skip=start_batch * loader.batch_size)


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


def build_teacher(args, nb_classes: int, device) -> Optional[nn.Module]:
    if args.distillation_type == 'none':
        return None
    if not args.teacher_path or not os.path.isfile(args.teacher_path):
        raise ConfigError(f'--distillation-type {args.distillation_type} needs the teacher weights: '
                          f'--teacher-path {args.teacher_path!r} does not exist')
    if not timm.is_model(args.teacher_model):
        raise ConfigError(f'--teacher-model {args.teacher_model!r} is not a timm model')
    teacher = timm.create_model(args.teacher_model, num_classes=nb_classes)
    ckpt = checkpoint.load_checkpoint(args.teacher_path)
    state = ckpt['model'] if isinstance(ckpt.get('model'), dict) else ckpt
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    mismatch = checkpoint.weight_mismatch(teacher.state_dict(), state)
    if mismatch:
        raise CheckpointError(f'{args.teacher_path} does not fit --teacher-model {args.teacher_model}: {mismatch}')
    teacher.load_state_dict(state)
    return teacher.to(device).eval().requires_grad_(False)


# ---- optimisation ----------------------------------------------------------------------------------
def apex_has_cuda_kernels() -> bool:
    """True when NVIDIA apex imports with its CUDA extensions. A Python-only build of apex imports too,
    but its FusedLAMB raises 'requires cuda extensions' when built; apex's multi_tensor_applier says
    whether the extensions loaded."""
    try:
        import apex.optimizers  # noqa: F401
        from apex.multi_tensor_apply import multi_tensor_applier
    except Exception:  # noqa: BLE001  not installed, the unrelated PyPI 'apex', or a build that fails to import
        return False
    return bool(getattr(multi_tensor_applier, 'available', False))


def optimizer_name(opt: str, device) -> str:
    """'fusedlamb' needs NVIDIA apex with its CUDA kernels, on CUDA; otherwise timm's LAMB runs with the
    same hyperparameters."""
    if opt != 'fusedlamb':
        return opt
    if device.type == 'cuda' and apex_has_cuda_kernels():
        return opt
    print("Notice: apex FusedLAMB is not available here; --opt fusedlamb runs timm's LAMB with the same settings")
    return 'lamb'


def build_optimizer(args, model: nn.Module, device):
    """timm's optimizer factory. LAMB runs timm's foreach (multi-tensor) path on CUDA, or apex's
    FusedLAMB (see optimizer_name); --opt-fused picks torch's single-kernel Adam(W)/SGD."""
    extra = dict(eps=args.opt_eps)
    if args.opt_betas:
        extra['betas'] = tuple(args.opt_betas)
    if args.opt_fused:
        if args.opt not in FUSED_OPTS:
            raise ConfigError(f'--opt-fused: torch has fused kernels for --opt {", ".join(FUSED_OPTS)}, '
                              f'not {args.opt} (apex FusedLAMB is --opt fusedlamb)')
        extra['fused'] = True
    try:
        return create_optimizer_v2(model, opt=optimizer_name(args.opt, device), lr=args.lr,
                                   weight_decay=args.weight_decay, momentum=args.momentum,
                                   layer_decay=args.layer_decay, **extra)
    except (ValueError, AssertionError) as err:  # unknown optimizer name, bad betas
        raise ConfigError(f'--opt {args.opt}: {err}') from None


def cooldown_epochs(args) -> int:
    """--cooldown-epochs, shortened if need be to leave at least one epoch of schedule."""
    return max(0, min(args.cooldown_epochs, args.epochs - 1))


def build_scheduler(args, optimizer):
    """timm scheduler stepped once per epoch at its START: epoch e trains at the value for e.

    --epochs counts the cooldown: the decay spans the first epochs - cooldown epochs, the rest
    stay at --min-lr (cooldown shortened, if need be, to leave one epoch of schedule).
    """
    cooldown = cooldown_epochs(args)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs - cooldown, decay_epochs=args.decay_epochs,
        cooldown_epochs=cooldown, patience_epochs=args.patience_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        noise=args.lr_noise, noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed)
    return scheduler


def peak_lr(args) -> float:
    """The highest lr the schedule reaches over --epochs (stepped on a stand-in optimizer)."""
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    scheduler, peak = build_scheduler(args, stand_in), 0.0
    for epoch in range(args.epochs):
        schedule(scheduler, args, epoch)
        peak = max(peak, stand_in.param_groups[0]['lr'])
    return peak


def warn_schedule(args) -> None:
    """One line when warmup and cooldown leave the schedule no room: the warmup does not end before the
    decay does, so the lr never gets near --lr. (timm's decay counts from epoch 0, warmup included, so even
    a roomy schedule peaks a little below --lr: 0.99 of it in 100 epochs, 0.8 in the released 20-epoch
    fine-tuning; that is the recipe, not a mistake.)"""
    if args.sched == 'plateau' or args.warmup_epochs < args.epochs - cooldown_epochs(args):
        return
    peak = peak_lr(args)
    if peak < args.lr:
        print(f'Warning: --warmup-epochs {args.warmup_epochs} and --cooldown-epochs {args.cooldown_epochs} leave '
              f'no room in --epochs {args.epochs}: the lr peaks at {peak:.3g} and never reaches {args.lr:.3g}')


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


# ---- the training model: kernels, DDP, compile, EMA -----------------------------------------------
def apply_speed_settings(args) -> None:
    """Process-wide kernel choices. --tf32: TF32 tensor cores for float32 matmuls (cuDNN already
    uses them for float32 convolutions by default). Without it PyTorch's defaults stay. The gpu data
    pipeline is not affected: it runs its matmuls in full float32 whatever this says
    (gpu_augment.full_float32)."""
    if args.tf32:
        torch.set_float32_matmul_precision('high')


def wrap_ddp(model: nn.Module, args, device) -> nn.Module:
    """DDP with the --ddp-* options (both off by default: scripts/gpu_report.py measures them).

    No buffer broadcast before each forward (DDP's default copies rank 0's buffers to every rank at
    every step): the only buffers of our models are the RoPE frequencies, constants that training
    never changes (models_vit5.RotaryEmbedding2D), computed alike on every rank. Recent torch names
    the switch forward_sync_buffers (and deprecates broadcast_buffers); older torch, broadcast_buffers.
    """
    ddp = torch.nn.parallel.DistributedDataParallel
    no_sync = ('forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(ddp.__init__).parameters
               else 'broadcast_buffers')
    return ddp(model, device_ids=[device.index] if device.type == 'cuda' else None, **{no_sync: False},
               gradient_as_bucket_view=args.ddp_bucket_view, static_graph=args.ddp_static_graph)


def compile_model(model: nn.Module, mode: str = 'default') -> nn.Module:
    """torch.compile of the whole training model, forward and backward; under DDP, of the DDP module,
    so the compiler splits the graph at gradient buckets and the all-reduce overlaps the backward.
    The CUDA-graph modes (reduce-overhead, max-autotune) replay recorded kernels, which the training
    step allows: static shapes (drop_last) and no host read inside it (engine.TrainStep)."""
    return torch.compile(model, mode=mode)


class HostModelEma(ModelEmaV3):
    """timm's ModelEmaV3, whose update also runs in one piece when the EMA lives on another device than
    the model (--model-ema-force-cpu).

    There timm turns its foreach update off and copies the model over tensor by tensor, each copy a
    wait for the device (about 150 per step for ViT-B). Here the model's whole state goes over in one
    foreach copy into pinned host buffers, queued without waiting; one wait for them to land; then
    the same foreach lerp as on one device.
    """

    def __init__(self, model: nn.Module, **kwargs):
        super().__init__(model, **kwargs)
        self._staged = None  # host copies of the model's state, reused every update

    def crosses_devices(self, values: list) -> bool:
        """True when the model's state (`values`) is on another device than the EMA."""
        return self.device is not None and bool(values) and values[0].device != self.device

    def apply_update_(self, model: nn.Module, decay: float):
        values = [v.detach() for v in model.state_dict().values()]
        if not self.crosses_devices(values):
            return super().apply_update_(model, decay)
        source = values[0].device
        cuda = source.type == 'cuda' and torch.cuda.is_available()
        if self._staged is None:
            self._staged = [torch.empty(v.shape, dtype=v.dtype, device=self.device, pin_memory=cuda) for v in values]
        torch._foreach_copy_(self._staged, values, non_blocking=cuda)
        if cuda:
            torch.cuda.current_stream(source).synchronize()  # the update's one wait: the copies have landed
        ema = list(self.module.state_dict().values())
        floats = [i for i, e in enumerate(ema) if e.is_floating_point()]
        self._foreach_lerp_([ema[i] for i in floats], [self._staged[i] for i in floats], weight=1. - decay)
        for e, staged in zip(ema, self._staged):
            if not e.is_floating_point():
                e.copy_(staged)


def build_ema(args, model: nn.Module):
    """timm's ModelEmaV3 with its foreach update: one multi-tensor lerp over weights and buffers per
    optimizer step, no per-tensor Python loop; with --model-ema-force-cpu, on the CPU (HostModelEma:
    one foreach copy to the host and one wait per step)."""
    if not args.model_ema:
        return None
    return HostModelEma(model, decay=args.model_ema_decay, foreach=True,
                        device=torch.device('cpu') if args.model_ema_force_cpu else None)


# ---- checkpoints --------------------------------------------------------------------------------
def check_finite_weights(*models) -> None:
    """Before a save: one host read per model (weights stay identical across ranks under DDP)."""
    if not all(utils.all_finite(m.state_dict().values()) for m in models if m is not None):
        raise NonFiniteLossError('the weights became non-finite; stopping before they are saved')


# ---- evaluation and logging ---------------------------------------------------------------------
def run_eval(args, loader, model, device, amp_dtype, header='Test:') -> dict:
    """--dist-eval: every rank evaluates its shard. Otherwise rank 0 evaluates alone and shares the result.
    --eval-set a / r score their 200 classes' logits only (the other sets' rules are in their targets)."""
    scoring = dict(header=header, classes=eval_sets.logit_classes(args.eval_set))
    if args.distributed and not args.dist_eval:
        stats = evaluate(loader, model, device, amp_dtype, **scoring) if utils.is_main_process() else None
        return utils.broadcast_object(stats)
    return evaluate(loader, model, device, amp_dtype, distributed=args.distributed, **scoring)


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
def main(args, body=None):
    """Train (or with --eval, evaluate) as `args` say; returns the last epoch's log entry (or the
    evaluation's numbers). `body(args, device, amp_dtype)` runs instead of `run`, in the same setup
    (devices, process group): scripts/eval_suite.py evaluates several sets that way."""
    check_args(args)
    device, amp_dtype = resolve_device(args)
    utils.init_distributed(args, device.type)
    if device.type == 'cuda':
        device = torch.device('cuda', args.local_rank if args.distributed else (device.index or 0))
        torch.cuda.set_device(device)  # device-less CUDA calls (the pin-memory thread's) go to this GPU, not GPU 0
    else:
        set_cpu_threads(args.num_workers)
    try:
        return (body or run)(args, device, amp_dtype)
    finally:
        if utils.is_dist():
            torch.distributed.destroy_process_group()


def set_cpu_threads(num_workers: int) -> None:
    """Leave the cores the DataLoader workers need: intra-op threads and workers fighting over the same
    cores made a 2-core run several times slower. OMP_NUM_THREADS, when set, is the user's choice."""
    threads = utils.cpu_threads(num_workers)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        print(f'CPU: {threads} intra-op thread(s) beside {num_workers} DataLoader worker(s) '
              f'(set OMP_NUM_THREADS to choose)')


def start(args) -> Optional[dict]:
    """Seeds the run; returns the checkpoint to resume (or evaluate) from, or None. A training resume takes the
    run's settings from it, an evaluation its model settings, a --finetune tag or file the model settings too:
    each for the flags the user did not give. A training run's --output_dir must not hold another run."""
    ckpt = None
    found = checkpoint.newest_checkpoint(os.path.join(args.output_dir, 'checkpoint.pth')) if args.auto_resume else None
    if found is not None:
        args.resume, ckpt = found
    elif args.resume:
        ckpt = checkpoint.load_checkpoint(args.resume)
    if ckpt is not None and not args.eval:
        checkpoint.take_run_settings(args, ckpt, args.resume, RUN_SETTINGS, found=found is not None)
        check_args(args)  # the taken settings with those the user gave
    elif ckpt is not None:
        if found is not None:
            print(f'Auto-resuming from {args.resume}')
        checkpoint.take_model_settings(args, ckpt, args.resume)
    elif args.finetune:
        checkpoint.take_finetune_settings(args)
    if not args.eval:
        checkpoint.check_run_folder(args.output_dir, args.resume if ckpt is not None else '', newest=found is not None)
    utils.seed_everything(args.seed + utils.get_rank())  # the initial weights (DDP then copies rank 0's)
    return ckpt


def run(args, device, amp_dtype) -> dict:
    ckpt = start(args)
    if ckpt is not None and not args.eval and checkpoint.nothing_left_to_train(args, ckpt):
        return {}
    loader_train, loader_val, n_val, nb_classes = build_loaders(args, device)
    model = prepare_model(args, nb_classes, device, ckpt)
    if args.eval:
        if args.load_ema:
            print(f'Evaluating the EMA weights (model_ema) of {args.resume or args.finetune}')
        stats = run_eval(args, loader_val, model, device, amp_dtype)
        print(f'Accuracy of the network on the {n_val} test images: {stats["acc1"]:.1f}%')
        return stats
    # the folder appears only now, and goes again if the run fails before its first checkpoint
    with utils.output_folder(args.output_dir, keep_if='checkpoint.pth'):
        return train(args, model, ckpt, loader_train, loader_val, n_val, nb_classes, device, amp_dtype)


def finetune_file(name: str) -> str:
    """--finetune: a checkpoint path, or a released tag (vit5_small.in1k) read through the Hugging Face cache."""
    try:
        return models_vit5.pretrained_file(name)
    except OSError as err:  # a tag whose file is neither cached nor downloadable
        raise CheckpointError(str(err)) from None


def prepare_model(args, nb_classes: int, device, ckpt: Optional[dict]):
    """The model on `device` with the weights asked for (`ckpt`: the --resume checkpoint, or None)."""
    model = build_model(args, nb_classes)
    if ckpt is not None:
        if args.finetune:
            print(f'Resuming from {args.resume}: --finetune {args.finetune} is not loaded')
        checkpoint.load_weights(model, ckpt, args.resume, use_ema=args.eval and args.load_ema, finetune=False)
    elif args.finetune:
        path = finetune_file(args.finetune)
        checkpoint.load_weights(model, checkpoint.load_checkpoint(path), args.finetune, args.load_ema, finetune=True)
    print(f'{args.model}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters')
    return model.to(device)


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
    apply_speed_settings(args)
    train_model = wrap_ddp(model, args, device) if args.distributed else model
    if args.compile or args.compile_mode:
        train_model = compile_model(train_model, args.compile_mode or 'default')
    model_ema = build_ema(args, model)  # after DDP, which copies rank 0's weights to every rank
    optimizer = build_optimizer(args, model, device)
    scheduler = build_scheduler(args, optimizer)
    warn_schedule(args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    mixup_fn = build_mixup(args, nb_classes)
    criterion = build_criterion(mixup_fn is not None, args.smoothing, args.bce_loss, args.cosub,
                                build_teacher(args, nb_classes, device), args.distillation_type,
                                args.distillation_alpha, args.distillation_tau)
    start = checkpoint.ResumePoint(args.start_epoch)
    if ckpt is not None:
        start = checkpoint.resume_training(args, ckpt, args.resume, model, model_ema, optimizer, scheduler, scaler)
    args.start_epoch, max_accuracy = start.epoch, start.max_accuracy
    run_logger = start_wandb(args) if args.if_wandb and utils.is_main_process() else None
    out = args.output_dir
    last = os.path.join(out, 'checkpoint.pth') if out else ''
    if out:
        write_json(os.path.join(out, 'args.json'), vars(args))
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ema_module = model_ema.module if model_ema is not None else None

    def save(epoch: int, batches_done: Optional[int] = None, progress: Optional[dict] = None) -> dict:
        """checkpoint.pth (the one before kept as previous_checkpoint.pth) at an epoch's end or mid-epoch."""
        check_finite_weights(model, ema_module)
        state = checkpoint.training_state(args, epoch, model, model_ema, optimizer, scheduler, scaler, max_accuracy,
                                          batches_done, progress)
        checkpoint.save_checkpoint(state, last, keep_previous=True)
        return state

    print(f'Training for {args.epochs} epochs from epoch {start.epoch}' +
          (f', batch {start.batch}' if start.batch else ''))
    start_time, log_stats = time.time(), {}
    for epoch in range(start.epoch, args.epochs):
        first = 0  # the epoch's first batch; a mid-epoch resume starts later (at most at the epoch's end)
        if epoch == start.epoch:
            first = min(start.batch, epoch_batches(loader_train))
        set_epoch(loader_train, epoch, first)
        schedule(scheduler, args, epoch)
        train_stats = train_one_epoch(
            train_model, criterion, loader_train, optimizer, device, epoch, scaler, amp_dtype,
            max_norm=args.clip_grad, model_ema=model_ema, mixup_fn=mixup_fn, accum_iter=args.accum_iter,
            cosub=args.cosub, set_training_mode=args.train_mode, seed=args.seed, start=first,
            progress=start.progress if epoch == start.epoch else None, save_interval=args.save_interval,
            save=functools.partial(save, epoch) if out else None)
        if 'stopped_at' in train_stats:
            raise Stopped(stop_note(epoch, train_stats['stopped_at'], first + len(loader_train), last))
        check_finite_weights(model, ema_module)
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **evaluate_epoch(args, loader_val, n_val, model, model_ema, device, amp_dtype),
                     'epoch': epoch, 'n_parameters': n_parameters}
        schedule(scheduler, args, epoch, metric=log_stats['test_acc1'])
        is_best = max_accuracy is None or log_stats['test_acc1'] > max_accuracy
        max_accuracy = log_stats['test_acc1'] if is_best else max_accuracy
        print(f'Max accuracy: {max_accuracy:.2f}%')
        if out:
            state = save(epoch)
            if is_best:
                checkpoint.save_checkpoint(state, os.path.join(out, 'best_checkpoint.pth'))
            write_json(os.path.join(out, 'log.txt'), log_stats, mode='a')
        if run_logger is not None:
            run_logger.log(log_stats, step=epoch)
    if run_logger is not None:
        run_logger.finish()
    print(f'Training time {datetime.timedelta(seconds=int(time.time() - start_time))}')
    return log_stats


def stop_note(epoch: int, batches_done: int, n_batches: int, path: str) -> str:
    """The one line a run stopped by a signal ends with."""
    received = utils.stop_requested()
    why = f'on {received}' if received else 'on a stop signal to another rank'
    where = f'epoch {epoch} after batch {batches_done} of {n_batches}'
    if not path:
        return f'Stopped {why} at {where}; nothing was saved (no --output_dir)'
    return f'Stopped {why} at {where}: {path} holds that step; continue with --auto-resume (or --resume {path})'


def one_line(err: Exception) -> str:
    """The message of `err` on one line; an error re-raised from a DataLoader worker carries the
    worker's traceback in its text, of which only the last line (the original message) is kept."""
    text = str(err).strip()
    if 'Traceback' in text:
        text = text.splitlines()[-1]
        text = text.split(': ', 1)[1] if ': ' in text else text
    return ' '.join(text.split())


def interrupted_note(args) -> str:
    last = os.path.join(args.output_dir, 'checkpoint.pth') if args.output_dir else ''
    if last and os.path.isfile(last):
        what = 'the last saved step' if args.save_interval else 'the last finished epoch'
        return f'interrupted; {last} holds {what} (continue with --resume {last})'
    return 'interrupted; nothing was saved'


def lost_contact_note(args, err: BaseException) -> str:
    """One line for a collective that failed because another rank died, hung or lost its node."""
    detail = re.sub(r'^\[[^\]]*\]\s*', '', one_line(err)).split('. ')[0][:160]  # without gloo's source location
    return (f'error: rank {args.rank} lost contact with the other processes ({detail}): one of them died, hung for '
            f'more than --dist-timeout {args.dist_timeout:g} min, or lost its node')


def cli(argv=None) -> int:
    return guarded(parse_args(argv))


def guarded(args, body=None) -> int:
    """main(args, body) as a command: the exit code, and a user's mistake as one line on stderr."""
    utils.handle_ctrl_c()
    try:
        with contextlib.nullcontext() if args.eval else utils.stop_signals_noted():
            main(args, body)
    except (DataError, CheckpointError, ConfigError) as err:
        sys.stderr.write(f'error: {one_line(err)}\n')  # not print(): other ranks' print is muted
        return 2
    except NonFiniteLossError as err:
        sys.stderr.write(f'error: {one_line(err)}\n')
        return 1
    except Stopped as stop:
        if getattr(args, 'rank', 0) == 0:
            sys.stderr.write(f'{stop}\n')
        return EXIT_STOPPED
    except BaseException as err:
        if utils.interrupted():
            # Ctrl-C (whatever it broke on the way out): checkpoints are written atomically, the last is whole
            if getattr(args, 'rank', 0) == 0:
                sys.stderr.write(interrupted_note(args) + '\n')
            return 130
        if getattr(args, 'distributed', False) and utils.lost_contact(err):
            sys.stderr.write(lost_contact_note(args, err) + '\n')
            return 1
        raise
    return 0


if __name__ == '__main__':
    sys.exit(cli())
