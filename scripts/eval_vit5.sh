#!/usr/bin/env bash
# ImageNet-1k top-1 of a released or trained ViT-5 checkpoint (validation set, full image: crop ratio 1.0).
#   bash scripts/eval_vit5.sh small --ckpt vit5_small.in1k --data-path /datasets/imagenet --gpus 1
#   bash scripts/eval_vit5.sh base --ckpt vit5_base.in1k_384 --data-path ...     # a released tag sets its size
#   bash scripts/eval_vit5.sh small --ckpt vit5_small_patch16_224.pth --data-path ...
#   ... -- --input-size 384      the size, for a file whose stored args do not give it (224 otherwise)
#   ... -- --load_ema            evaluates a training checkpoint's EMA weights
set -euo pipefail
SCRIPT_USAGE="Evaluate a ViT-5 checkpoint file or released tag on the ImageNet validation set."
NEEDS_CKPT=1 WRITES_OUTPUT=0
source "$(dirname "$0")/launch_common.sh"

# A checkpoint file goes through --resume (its stored args give the input size); anything else is a
# released tag such as vit5_base.in1k_384, which --finetune reads from the Hugging Face cache.
case "$CKPT" in
  *.pth|*.pt|*.bin|*.safetensors|*/*) WEIGHTS=(--resume "$CKPT") ;;
  *) WEIGHTS=(--finetune "$CKPT") ;;
esac
RECIPE=(--eval "${WEIGHTS[@]}" --model "vit5_$SIZE" --data-path "$DATA_PATH" --eval-crop-ratio 1.0 --dist-eval)
launch
