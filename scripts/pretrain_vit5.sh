#!/usr/bin/env bash
# ImageNet-1k pretraining of ViT-5 with the released recipe (8 GPUs x batch 256 per node).
#   bash scripts/pretrain_vit5.sh small --data-path /datasets/imagenet --output-dir output/vit5_small
#   GPUS=8 NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash scripts/pretrain_vit5.sh large --data-path ...
set -euo pipefail
SCRIPT_USAGE="Pretrain ViT-5 on ImageNet-1k with the released flags (small at 224 px, base and large at 192 px)."
NEEDS_CKPT=0 WRITES_OUTPUT=1
source "$(dirname "$0")/launch_common.sh"

case "$SIZE" in  # what differs between sizes
  small) INPUT=224 LR=4e-3 EPOCHS=800 DROP_PATH=0.05 ;;
  base)  INPUT=192 LR=3e-3 EPOCHS=800 DROP_PATH=0.2 ;;
  large) INPUT=192 LR=3e-3 EPOCHS=400 DROP_PATH=0.35 ;;
esac
RECIPE=(--model "vit5_$SIZE" --input-size "$INPUT" --data-path "$DATA_PATH" --output_dir "$OUTPUT_DIR"
  --batch 256 --accum_iter 1 --lr "$LR" --weight-decay 0.05 --epochs "$EPOCHS" --opt fusedlamb --unscale-lr
  --mixup .8 --cutmix 1.0 --color-jitter 0.3 --drop-path "$DROP_PATH" --reprob 0.0 --smoothing 0.0 --ThreeAugment
  --repeated-aug --bce-loss --warmup-epochs 5 --eval-crop-ratio 1.0 --dist-eval --disable_wandb)
PROCS=$((GPUS * NNODES))
if [ "$PROCS" != 8 ]; then
  echo "note: the released runs used 8 GPUs x batch 256 = 2048 images per step; this one uses" \
       "$PROCS x 256 = $((PROCS * 256)) with the same (unscaled) lr." \
       "$( [ $((8 % PROCS)) = 0 ] && echo "Add '-- --accum_iter $((8 / PROCS))' to match it.")" >&2
fi
launch
