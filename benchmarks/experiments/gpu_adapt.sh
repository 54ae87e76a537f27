#!/usr/bin/env bash
# The adaptation study (benchmarks/adapt.md) on a machine with a CUDA GPU, in one go that fits
# 15 minutes: `python -m benchmarks.experiments.adapt --preset gpu` (400 steps of 8 + 8 crops of
# 192 px a row, bf16, the same plan as the CPU study: zero-shot, 0-label Mean Teacher vs IRCR,
# 2-label supervised vs IRCR, more seeds), stopped after MINUTES (default 12); finished rows are
# in benchmarks/results/adapt-gpu.json (copied to $OUT), a row cut short resumes on the next call.
#
# Needs: a CUDA GPU; python3 with this repository's dependencies (torch, numpy, scipy,
# scikit-image, pillow, pyyaml, click, ...); CoNSeP in scratch/gpu-shared/data/consep-colorectal
# (git-ignored: its licence is not stated, it is never committed and weights trained on it are
# never shipped), copied from ../shared by:
#   mkdir -p scratch/gpu-shared/data && cp -rL ../shared/data/consep-colorectal scratch/gpu-shared/data/
# and carried with the run (carry: ["scratch/gpu-shared"], about 60 MB).
# Run:  bash benchmarks/experiments/gpu_adapt.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WSI_IRCR_SHARED=$PWD/scratch/gpu-shared
MINUTES=${MINUTES:-12}
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
[ -d scratch/gpu-shared/data/consep-colorectal/images ] || {
  echo "error: scratch/gpu-shared/data/consep-colorectal is missing; copy it from ../shared (see the top of this file) and carry it" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
until=$(date -u -d "+$MINUTES min" +%H:%M)
timeout $((MINUTES * 60 + 120)) python3 -m benchmarks.experiments.adapt --preset gpu --until "$until" > "$OUT/adapt.log" 2>&1
echo "exit $?" >> "$OUT/adapt.log"
cp benchmarks/results/adapt-gpu.json "$OUT/" 2>/dev/null
python3 -m benchmarks.experiments.adapt --preset gpu --table > "$OUT/table.md" 2>&1
tail -3 "$OUT/adapt.log"; cat "$OUT/table.md"
