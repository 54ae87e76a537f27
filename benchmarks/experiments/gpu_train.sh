#!/usr/bin/env bash
# The training recipe, longer, on a machine with a CUDA GPU: three runs side by side on one GPU
# for MINUTES (default 7): the recipe's Kumar-pool run (lite-m, EMA weights) with seeds 0 and 1,
# and configs/train/bundled.yaml; STEPS (default 6000) steps each, bf16. Checkpoints and logs go
# to $OUT (default /tmp/gpu-out).
#
# Needs: a CUDA GPU; python3 with torch, numpy, scipy, scikit-image, tifffile, pillow, pyyaml and
# click; the MoNuSeg tiles in scratch/gpu-data (git-ignored; MoNuSeg is never committed), packed
# from ../shared by:  python -m benchmarks.experiments.gpu_pack
# Run:  bash benchmarks/experiments/gpu_train.sh
# A CPU smoke test:  DEVICE=cpu STEPS=2 MINUTES=1 OUT=/tmp/gpu-out bash benchmarks/experiments/gpu_train.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-6000}       # per run; sized so that the runs end inside MINUTES on one H200
MINUTES=${MINUTES:-7}
OUT=${OUT:-/tmp/gpu-out}
DATA=scratch/gpu-data
mkdir -p "$OUT" /tmp/gpu-runs
[ -d "$DATA/images" ] || { echo "error: $DATA is missing; run python -m benchmarks.experiments.gpu_pack here and carry it" >&2; exit 2; }
wsi() { python3 -c 'import sys; from wsi_ircr.cli import main; sys.exit(main())' "$@"; }
common=(--images "$DATA/images" --labels "$DATA/labels" --device "$DEVICE" --steps "$STEPS"
        --set threads=2 --set val_every=$((STEPS / 4 > 0 ? STEPS / 4 : 1)) --set data.mpp=0.25 --set bf16=true)
start=$(date +%s)
for seed in 0 1; do  # the recipe's pool runs (held-out figures), two seeds
  wsi train --config configs/train/recipe.yaml --out /tmp/gpu-runs/pool-s$seed --seed $seed --set arch=lite-m \
      --set scale_jitter=0.15 --set ema_weights=true --set ema_alpha=0.99 "${common[@]}" > "$OUT/pool-s$seed.log" 2>&1 &
done
wsi train --config configs/train/bundled.yaml --out /tmp/gpu-runs/bundled "${common[@]}" > "$OUT/bundled.log" 2>&1 &
deadline=$((start + MINUTES * 60))
while [ -n "$(jobs -r)" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
kill $(jobs -p) 2>/dev/null
wait
for run in pool-s0 pool-s1 bundled; do
  for f in model.pt last.pt; do [ -f /tmp/gpu-runs/$run/$f ] && cp /tmp/gpu-runs/$run/$f "$OUT/$run-$f" && break; done
done
echo "wall $(( $(date +%s) - start )) s; $(ls "$OUT")"
