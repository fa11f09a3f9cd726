#!/usr/bin/env bash
# Quick start: train a small ViT-5 on real data (scikit-learn's handwritten digits) in a few
# minutes on a CPU, through main.py like any other run, then evaluate and plot it.
#   bash scripts/quickstart.sh                  # everything goes to runs/quickstart/
#   SEED=1 bash scripts/quickstart.sh           # another seed
#   bash scripts/quickstart.sh --epochs 30      # extra flags go to main.py (and win)
# The device is picked by main.py: CUDA when present, else the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/quickstart}
SEED=${SEED:-0}
PY=.venv/bin/python
# Tiny matrices: one thread per process is as fast as two and, unlike two, does not stall when
# another program shares the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

step() { printf '\n== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

step "1/5 Python environment (.venv) and requirements.txt"
[ -x "$PY" ] || "${PYTHON:-python3}" -m venv .venv
"$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
START=$SECONDS  # the time reported at the end counts from here: data, training, evaluation, plots

step "2/5 The 1797 digits as an image folder (fixed 80/20 split): $OUT/data"
"$PY" scripts/prepare_digits.py --out "$OUT/data" --overwrite

step "3/5 Training ViT-5 on the digits (32 px, 4x4 patches of 8 px) -> $OUT"
# A fresh run each time: main.py appends to log.txt.
rm -f "$OUT/log.txt" "$OUT/args.json" "$OUT/checkpoint.pth" "$OUT/best_checkpoint.pth"
# The recipe for 32 px digits: RandomCrop(32, padding 4) and no flip (a mirrored digit is another
# shape); no random erasing, mixup or AutoAugment; 20 epochs of cosine schedule (880 steps) with
# an EMA that averages over the last ~200.
MODEL=(--model vit5_tiny --model-kwargs patch_size=8 embed_dim=128 num_heads=4 depth=6 --input-size 32)
"$PY" main.py "${MODEL[@]}" --data-set FOLDER --data-path "$OUT/data" --output_dir "$OUT" \
  --epochs 20 --batch-size 32 --opt adamw --lr 2e-3 --unscale-lr --weight-decay 0.05 \
  --warmup-epochs 2 --warmup-lr 1e-4 --cooldown-epochs 0 --drop-path 0 \
  --hflip 0 --aa none --color-jitter 0 --reprob 0 --mixup 0 --cutmix 0 --smoothing 0.1 --no-repeated-aug \
  --model-ema-decay 0.995 --num_workers 0 --seed "$SEED" "$@"

step "4/5 Evaluating the last checkpoint on the held-out digits"
"$PY" main.py --eval --resume "$OUT/checkpoint.pth" "${MODEL[@]}" --data-set FOLDER --data-path "$OUT/data" \
  --num_workers 0 | grep -E '^\* Acc|^Accuracy'

step "5/5 Pictures: training curves and the attention of the class token and registers"
"$PY" scripts/plot_log.py "$OUT/log.txt" --labels "ViT-5 digits (seed $SEED)" --out "$OUT/curves.png" \
  --title "ViT-5 on scikit-learn digits"
"$PY" scripts/visualize_attention.py "$(find "$OUT/data/val/3" -name '*.png' | sort | head -n 1)" \
  --checkpoint "$OUT/checkpoint.pth" --ema --layers 0 -1 --out "$OUT/attention.png"

ELAPSED=$((SECONDS - START))
"$PY" - "$OUT" "$ELAPSED" <<'EOF'
import json, sys
out, elapsed = sys.argv[1], int(sys.argv[2])
last = [json.loads(line) for line in open(f'{out}/log.txt')][-1]
print(f"""
Done in {elapsed // 60} min {elapsed % 60} s (after the install).
  data            {out}/data/{{train,val}}/<digit>/*.png
  log             {out}/log.txt (one JSON line per epoch)
  checkpoints     {out}/checkpoint.pth, {out}/best_checkpoint.pth
  curves          {out}/curves.png
  attention maps  {out}/attention.png
Held-out top-1 after {last['epoch'] + 1} epochs: {last['test_acc1']:.2f}% (EMA weights {last['test_acc1_ema']:.2f}%)""")
if last['test_acc1'] < 97:
    sys.exit('warning: below the 97% this demo reaches with its default settings')
EOF
