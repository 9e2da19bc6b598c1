#!/usr/bin/env bash
# The GPU checks of issues 12 and 13 (item 6 of each) in one device call; see
# benchmarks/gpu/README.md for the call itself. Runs on the lent machine, in the repo root,
# with .gpu/ (benchmarks/gpu/prepare.sh) carried:
#
#   0. environment: the carried wheels into /tmp/nf/site (PYTHONPATH over the image's own
#      Python, whose CUDA torch is the one to use), this working tree as the nucleiflow
#      package, nvidia-smi, versions; the carried data back in the shared/data layout.
#   1. sweep:  forward alone, student + golo, batch x fp32/fp16/bf16 x channels_last
#              (forward_sweep.py), while the >= 24k^2 px mosaic builds on one core.
#   2. bench:  benchmarks/throughput.py on the 24,000^2 px mosaic, student then golo, CUDA,
#              auto pools: Mpx/s, s/mm2, GPU busy share (NVML) and the stage that bounds it.
#   3. train:  benchmarks/gpu/student-gpu.yaml through train_gpu.py for the minutes left
#              (at most TRAIN_MAX_MIN), the checkpoint to $OUT/student-gpu.
#
#   bash benchmarks/gpu/run.sh [sweep] [bench] [train] [--cpu-dry-run]
#
# No step may overrun: each has a `timeout` from what is left of BUDGET_S (default 540 s,
# under the device's 600 s per command), and a failed step does not stop the next ones.
# Files to $OUT (at most 8 come back): run.log, sweep.json, throughput-student.json,
# throughput-golo.json, student-gpu/{model.safetensors,model.json,README.md}.
# --cpu-dry-run: the same logic on this CPU machine with the project's .venv, a 2,000 px
# mosaic, a tiny sweep and a few training steps: it checks the script, it measures nothing.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
DRY=0 STEPS=()
for a in "$@"; do
  case $a in
    --cpu-dry-run) DRY=1 ;;
    sweep|bench|train) STEPS+=("$a") ;;
    *) echo "unknown argument $a" >&2; exit 2 ;;
  esac
done
[ ${#STEPS[@]} -gt 0 ] || STEPS=(sweep bench train)
want() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

OUT=${OUT:-/tmp/nf/out}
NF=${NF:-/tmp/nf}  # scratch: site-packages, data, mosaic cache, training state
BUDGET_S=${BUDGET_S:-540}
TRAIN_MAX_MIN=${TRAIN_MAX_MIN:-4}
mkdir -p "$OUT" "$NF"
exec > >(tee -a "$OUT/run.log") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1
T0=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - T0))); }
# step NAME CAP_S CMD...: run CMD under `timeout` of min(CAP_S, seconds left), or skip it.
step() {
  local name=$1 cap=$2 t
  shift 2
  t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then echo "== $name: skipped, ${t}s left"; return 1; fi
  echo "== $name (timeout ${t}s, at $((SECONDS - T0))s)"
  timeout -k 10 "$t" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - T0))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
  return $rc
}

# -- 0. environment -------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  PY=${PY:-$REPO/.venv/bin/python}  # has every dependency; the cp312 wheels are not for it
  DEVICE=cpu
  export OMP_NUM_THREADS=1  # a shared 2-core machine
else
  PY=${PY:-python3}  # the image's Python 3.12 with CUDA torch (/opt/torch/.venv)
  DEVICE=cuda
  bash benchmarks/gpu/install.sh "$PY" "$NF/site" || { echo "install failed"; exit 1; }
  export PYTHONPATH=$NF/site
  timeout 30 nvidia-smi
  timeout 30 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv
fi
"$PY" - <<'EOF' || { echo "imports failed"; exit 1; }
import os, sys, torch, numpy, zarr, shapely, openslide, imagecodecs, tifffile, skimage, pydantic, dask
import nucleiflow.pipeline.batch.run_slide
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name()}, cudnn {torch.backends.cudnn.version()})" if torch.cuda.is_available() else ""))
print(f"numpy {numpy.__version__}, scikit-image {skimage.__version__}, tifffile {tifffile.__version__}, "
      f"imagecodecs {imagecodecs.__version__}, zarr {zarr.__version__}, shapely {shapely.__version__}, "
      f"openslide {openslide.__library_version__}; {len(os.sched_getaffinity(0))} usable cores")
EOF

# The carried data back in the shared/data layout (JPEG -> PNG) with mosaic_slide.py beside
# it: throughput.py and the training read NUCLEIFLOW_SHARED as they read ../shared.
export NUCLEIFLOW_SHARED=$NF/shared
mkdir -p "$NUCLEIFLOW_SHARED/tools"
cp .gpu/shared/tools/mosaic_slide.py "$NUCLEIFLOW_SHARED/tools/"
"$PY" - .gpu/data "$NUCLEIFLOW_SHARED/data" <<'EOF' || { echo "data unpack failed"; exit 1; }
import shutil, sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from PIL import Image

def png(job):
    src, dst = job
    Image.open(src).save(dst, compress_level=1)

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
jobs = []
for ds in sorted(p for p in src.iterdir() if p.is_dir()):
    (dst / ds.name / "images").mkdir(parents=True, exist_ok=True)
    shutil.copy(ds / "splits.csv", dst / ds.name)
    shutil.copytree(ds / "labels", dst / ds.name / "labels", dirs_exist_ok=True)
    jobs += [(p, dst / ds.name / "images" / (p.stem + ".png")) for p in sorted((ds / "images").glob("*.jpg"))]
with ProcessPoolExecutor(min(8, len(jobs))) as pool:
    list(pool.map(png, jobs))
print(f"data: {len(jobs)} images unpacked under {dst}")
EOF

if [ "$DRY" = 1 ]; then
  SIZE=2000 SWEEP=(--size 128 --batches 1 2 --modes fp32-cl predictor --seconds 0.2)
  BENCH=(--threads 1) TRAIN=(--tiny)
else
  SIZE=24000 SWEEP=(--batches 1 4 8 16 --seconds 0.5) BENCH=() TRAIN=()
fi
CACHE=$NF/mosaics
# Built in the background (one core, ~1-2 min for 24k^2) while the sweep has the GPU.
# throughput.py's own `mosaic` names it, so its run below finds it in the cache.
mosaic_pid=
if want bench; then
  (cd benchmarks && timeout -k 10 $((BUDGET_S / 2)) "$PY" -c "
import sys; from pathlib import Path; from throughput import SHARED, mosaic
print('mosaic:', mosaic(Path('$CACHE'), $SIZE, 0.5, 1, SHARED / 'data' / 'monuseg', 'test'))") &
  mosaic_pid=$!
fi

# -- 1. sweep -------------------------------------------------------------------------------
if want sweep; then
  step sweep 120 "$PY" benchmarks/gpu/forward_sweep.py --device "$DEVICE" "${SWEEP[@]}" --json "$OUT/sweep.json"
fi

# -- 2. bench -------------------------------------------------------------------------------
if want bench; then
  wait "$mosaic_pid" || echo "mosaic build failed (exit $?): throughput.py tries again"
  for m in student golo; do
    step "throughput $m" 200 "$PY" benchmarks/throughput.py --sizes "$SIZE" --model "$m" --device "$DEVICE" \
      --readers auto --workers auto --batch-size "${BATCH:-4}" --cache "$CACHE" "${BENCH[@]}" \
      --json "$OUT/throughput-$m.json"
  done
fi

# -- 3. train -------------------------------------------------------------------------------
if want train; then
  # Minutes to train: what is left less ~2 min of data loading, scoring (new on both test
  # splits, old on MoNuSeg's) and writing. max_minutes is checked after each epoch.
  minutes=$(awk -v s="$(left)" -v m="$TRAIN_MAX_MIN" 'BEGIN {t = (s - 120) / 60; if (t > m) t = m; if (t < 0.1) t = 0.1; printf "%.1f", t}')
  if [ "$DRY" = 1 ] || awk -v t="$minutes" 'BEGIN {exit !(t >= 1)}'; then
    rm -rf "$OUT/student-gpu" "$NF/train-work" "$NF/train-result.json"
    step train "$(left)" "$PY" benchmarks/gpu/train_gpu.py benchmarks/gpu/student-gpu.yaml \
      --data "$NUCLEIFLOW_SHARED/data" --out "$OUT/student-gpu" --work "$NF/train-work" --minutes "$minutes" \
      --device "$DEVICE" --compare-with student --result "$NF/train-result.json" "${TRAIN[@]}"
  else
    echo "== train: skipped, ${minutes} min would be left to train"
  fi
fi

echo "== summary"
"$PY" benchmarks/gpu/summary.py "$OUT" "$NF/train-result.json"
echo "== done in $((SECONDS - T0))s; files in $OUT:"
ls -la "$OUT" "$OUT"/student-gpu 2>/dev/null
exec >&- 2>&-
wait "$TEE_PID"  # run.log complete before the call returns
