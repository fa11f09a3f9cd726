#!/usr/bin/env bash
# Fine-tuning of a pretrained ViT-5 at 224 px with the released recipe (starts from the EMA weights).
#   bash scripts/finetune_vit5.sh base --ckpt output/vit5_base_pretrain/checkpoint.pth \
#        --data-path /datasets/imagenet --output-dir output/vit5_base_ft
# For your own ImageFolder: add `-- --data-set FOLDER --nb-classes N` (see main.py --help).
set -euo pipefail
SCRIPT_USAGE="Fine-tune a pretrained ViT-5 with the released flags (20 epochs, lr 1e-5, EMA weights of CKPT)."
NEEDS_CKPT=1 WRITES_OUTPUT=1
source "$(dirname "$0")/launch_common.sh"

case "$SIZE" in  # only the drop-path rate differs between sizes
  small) DROP_PATH=0.05 ;;
  base)  DROP_PATH=0.25 ;;
  large) DROP_PATH=0.5 ;;
esac
RECIPE=(--model "vit5_$SIZE" --finetune "$CKPT" --data-path "$DATA_PATH" --output_dir "$OUTPUT_DIR"
  --batch 64 --lr 1e-5 --weight-decay 0.1 --epochs 20 --unscale-lr --aa rand-m9-mstd0.5-inc1
  --drop-path "$DROP_PATH" --reprob 0.0 --smoothing 0.1 --no-repeated-aug --dist-eval --load_ema
  --eval-crop-ratio 1.0 --disable_wandb)
launch
