#!/usr/bin/env bash
# ImageNet-1k top-1 of a released or trained ViT-5 checkpoint (validation set, full image: crop ratio 1.0).
#   bash scripts/eval_vit5.sh small --ckpt vit5_small_patch16_224.pth --data-path /datasets/imagenet --gpus 1
#   bash scripts/eval_vit5.sh base --ckpt vit5_base_patch16_384.pth --data-path ... -- --input-size 384
#   ... -- --load_ema     evaluates a training checkpoint's EMA weights
set -euo pipefail
SCRIPT_USAGE="Evaluate a ViT-5 checkpoint on the ImageNet validation set (224 px unless '-- --input-size N')."
NEEDS_CKPT=1 WRITES_OUTPUT=0
source "$(dirname "$0")/launch_common.sh"

RECIPE=(--eval --resume "$CKPT" --model "vit5_$SIZE" --input-size 224 --data-path "$DATA_PATH"
  --eval-crop-ratio 1.0 --dist-eval)
launch
