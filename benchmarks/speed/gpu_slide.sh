#!/usr/bin/env bash
# The whole-slide benchmark on a machine with a CUDA GPU, in about 6 minutes: the tests marked
# gpu (CUDA results against CPU ones), then benchmarks/speed/bench_slide.py on a 1.07 Gpx synthetic
# 40x slide (32768^2 px at 0.25 um/px), bundled model on CUDA, 8 worker processes of 2 threads,
# forward batches of 8 tiles. JSON and logs go to $OUT (default /tmp/gpu-out).
#
# Needs: a CUDA GPU, python3 with torch (CUDA build). Where the GPU machine's python lacks the
# slide packages (zarr, dask, openslide, ...), pack their wheels on a machine with network first:
#   bash benchmarks/speed/gpu_slide.sh pack      # scratch/gpu-wheels (git-ignored, about 40 MB), Python 3.12
# and copy scratch/gpu-wheels beside the checkout; they are installed into /tmp/gpu-site, no index.
# Run:  bash benchmarks/speed/gpu_slide.sh       (SIDE, LIMIT_S, DEVICE, OUT, PRECISION override the defaults)
# PRECISION: auto (default: bf16 on CUDA) or fp32; int8 runs on the CPU only (ONNX Runtime, the cpu-fast
# extra): DEVICE=cpu PRECISION=int8 needs onnxruntime and onnx installed or carried as wheels.
# A CPU smoke test at a tiny size:  DEVICE=cpu SIDE=1024 OUT=/tmp/gpu-out bash benchmarks/speed/gpu_slide.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
WHEELS=scratch/gpu-wheels
if [ "${1:-}" = pack ]; then
  mkdir -p "$WHEELS"
  pins=$(python -m pip freeze | grep -iE '^(zarr|numcodecs|donfig|google-crc32c|dask|distributed|partd|locket|tblib|zict|tornado|shapely|openslide-python|openslide-bin|imagecodecs)==')
  exec python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux1_x86_64 -d "$WHEELS" $pins
fi
DEVICE=${DEVICE:-cuda}
SIDE=${SIDE:-32768}        # level-0 side: 32768^2 = 1.07 Gpx
LIMIT_S=${LIMIT_S:-330}    # the benchmark's own deadline, inside the tool's timeout
OUT=${OUT:-/tmp/gpu-out}
PRECISION=${PRECISION:-auto}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ! python3 -c 'import zarr, numcodecs, dask, distributed, shapely, openslide, imagecodecs' 2>/dev/null; then
  [ -d "$WHEELS" ] || { echo "error: $WHEELS is missing; run bash benchmarks/speed/gpu_slide.sh pack here and carry it" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --target /tmp/gpu-site "$WHEELS"/*.whl > "$OUT/install.log" 2>&1 \
    || { echo "error: installing the carried wheels failed (see $OUT/install.log)" >&2; exit 2; }
  export PYTHONPATH=$PWD:/tmp/gpu-site
fi
start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1; nproc; free -g | head -2; } > "$OUT/machine.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_postprocess_torch.py tests/test_gpu_paths.py > "$OUT/gpu-tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -1 "$OUT/gpu-tests.log"))"
sets=(--set "precision=$PRECISION")
[ "$DEVICE" = cuda ] && sets+=(--set workers=8 --set threads_per_worker=2 --set batch_tiles=8 --set task_tiles=16)
timeout "$LIMIT_S" python3 -m benchmarks.speed.bench_slide --side-px "$SIDE" --scales 1 --device "$DEVICE" "${sets[@]}" \
  --dir /tmp/bench-slide --json "$OUT/slide.json" --no-record > "$OUT/bench.log" 2>&1
echo "bench: exit $? in $(( $(date +%s) - start )) s"
tail -20 "$OUT/bench.log"
