#!/usr/bin/env bash
# The adaptation study's deciding rows (benchmarks/adapt.md) on one CUDA GPU, sized for 15 minutes
# of one H100/H200: for each target (CoNSeP, NuInsSeg, CryoNuSeg) the bundled model zero-shot,
# then for seeds 0, 1, 2 the rows that decide: 0 labels Mean Teacher vs IRCR, 2 labels supervised
# fine-tune vs IRCR (CryoNuSeg's labels as binary masks), then IRCR without MIAC (mt_piac, 0 labels:
# the default's open question, adapt.md "Session 6"), 160 steps each with the CPU study's
# settings (fp32, 4 + 4 crops of 128 px, EMA 0.995, validated every 40 steps; the `gpu` preset of
# benchmarks/experiments/adapt.py). The 9 (target, seed) groups run side by side, one torch thread
# each, and stop starting rows after MINUTES (default 8; a row in flight is cut at MINUTES + 3); finished rows are in
# benchmarks/results/adapt-gpu.json (copied to $OUT with every log and the table); a run cut short
# resumes on the next call. 45 rows + 3 zero-shot rows; not run yet (no GPU was lent).
#
# Needs: a CUDA GPU; python3 with this repository's dependencies (torch, numpy, scipy,
# scikit-image, pillow, pyyaml, click, ...); the three targets in scratch/gpu-shared/data
# (git-ignored; CoNSeP's licence is not stated: never committed, weights trained on it never
# shipped), copied from ../shared by (about 46 MB):
#   mkdir -p scratch/gpu-shared/data && for d in consep-colorectal nuinsseg-spleen cryonuseg-frozen; do
#     cp -rL ../shared/data/$d scratch/gpu-shared/data/; done
# and carried with the run (carry: ["scratch/gpu-shared"]).
# Run:  bash benchmarks/experiments/gpu_adapt.sh       (DRY_RUN=1: print the commands, run nothing)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WSI_IRCR_SHARED=$PWD/scratch/gpu-shared
MINUTES=${MINUTES:-8}
OUT=${OUT:-/tmp/gpu-out}
DRY_RUN=${DRY_RUN:-0}
TARGETS="consep nuinsseg cryonuseg"
SEEDS="0 1 2"
mkdir -p "$OUT"
if [ "$DRY_RUN" = 0 ]; then
  for d in consep-colorectal nuinsseg-spleen cryonuseg-frozen; do
    [ -d "scratch/gpu-shared/data/$d/images" ] || {
      echo "error: scratch/gpu-shared/data/$d is missing; copy it from ../shared (see the top of this file) and carry it" >&2; exit 2; }
  done
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
fi
until=$(date -u -d "+$MINUTES min" +%H:%M)
for target in $TARGETS; do
  for seed in $SEEDS; do
    skip=""
    [ "$seed" = 0 ] || skip="--skip-zero-shot"  # the seed-0 group scores the bundled model first
    cmd=(python3 -m benchmarks.experiments.adapt --preset gpu --threads 1 --target "$target" --until "$until" $skip
         --rows "mean_teacher+ema995:0:$seed:160" "ircr+ema995:0:$seed:160" "supervised+ema995:2:$seed:160" "ircr+ema995:2:$seed:160"
                "mt_piac+ema995:0:$seed:160")
    if [ "$DRY_RUN" != 0 ]; then
      echo "${cmd[*]}"
    else
      timeout $((MINUTES * 60 + 180)) "${cmd[@]}" > "$OUT/adapt-$target-s$seed.log" 2>&1 &
    fi
  done
done
[ "$DRY_RUN" != 0 ] && exit 0
wait
cp benchmarks/results/adapt-gpu.json "$OUT/" 2>/dev/null
python3 -m benchmarks.experiments.adapt --preset gpu --table > "$OUT/table.md" 2>&1
tail -n 2 "$OUT"/adapt-*.log; cat "$OUT/table.md"
