#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what benchmarks/gpu/run.sh needs on a lent GPU machine,
# which has no network and gets only the working tree plus `carry` paths (64 MiB in all):
#
#   .gpu/wheels/  cp312 manylinux wheels of the project's dependencies that the device image
#                 lacks (openslide, zarr, numcodecs, shapely, pydantic, dask, imagecodecs
#                 pruned to its JPEG/zlib/deflate codecs: the whole wheel is 26 MB).
#   .gpu/shared/tools/mosaic_slide.py  the mosaic builder of ../shared, which does not travel.
#   .gpu/data/    MoNuSeg + TNBC (splits.csv, labels as PNG, images as JPEG q$QUALITY: the
#                 PNGs are 96 MB). run.sh turns them back into the shared/data layout.
#
# Run HERE, in the root of the checkout whose device calls carry it (the session's own
# checkout: a helper's worktree does not travel), then `bash benchmarks/gpu/prepare.sh --check`
# installs the wheels into a Python 3.12 folder and builds and reads a small mosaic with
# them (no torch here for 3.12: the model side is only exercised by run.sh --cpu-dry-run).
#
#   bash benchmarks/gpu/prepare.sh [--check] [--bench-data]
#
# --bench-data: MoNuSeg's test images alone (4 MiB instead of 20), enough for the mosaic of
# `run.sh sweep bench` but not for `train`: for when the tree has grown.
#   QUALITY=90 SHARED=../shared PY=.venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${SHARED:-../shared}
PY=${PY:-.venv/bin/python}
QUALITY=${QUALITY:-90}
DEST=.gpu
CHECK=0 BENCH_ONLY=0
for a in "$@"; do
  case $a in
    --check) CHECK=1 ;;
    --bench-data) BENCH_ONLY=1 ;;
    *) echo "unknown argument $a" >&2; exit 2 ;;
  esac
done
mkdir -p "$DEST"
git check-ignore -q "$DEST" || { echo "$DEST is not git-ignored here: it would travel twice" >&2; exit 1; }

# The device image has Python 3.12 with numpy, scipy, scikit-image, pillow, tifffile,
# pyarrow, pandas, psutil, pyyaml, typer, rich, safetensors, click, fsspec, toolz,
# cloudpickle, packaging (KINDS.md): these are not carried. Versions are
# the ones the project's tests pass with here. Prefect and its ~60 dependencies are not
# carried either: run.sh trains through benchmarks/gpu/train_gpu.py.
WHEELS=(
  openslide-python==1.4.7 openslide-bin==4.0.1.2 imagecodecs==2026.3.6
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
  shapely==2.2.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.8.0
  typing-inspection==0.4.5 dask==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2
  typing-extensions==4.16.0  # pydantic needs >= 4.14.1; the image's version is unknown
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
rm -rf "$DEST/wheels"
mkdir -p "$DEST/wheels"
# --no-deps: every wheel is named above; pip's resolver would also fetch what the device has.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST/wheels" "${WHEELS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
[ "$(ls "$DEST"/wheels/*.whl | wc -l)" -eq "${#WHEELS[@]}" ] || { echo "missing wheels" >&2; exit 1; }

# imagecodecs: keep what tifffile needs to read and write the mosaic's JPEG tiles (jpeg8,
# zlib/deflate, the _imcd helpers), with the bundled libraries those link to.
"$PY" - "$DEST"/wheels/imagecodecs-*.whl <<'EOF'
import base64, hashlib, re, sys, zipfile
from pathlib import Path
src = Path(sys.argv[1])
keep_ext = {"_shared", "_shared_cython", "_imcd", "_jpeg8", "_zlib", "_deflate"}
keep_lib = ("libjpeg-", "libdeflate-", "libz-")
def kept(name: str) -> bool:
    if name.startswith("imagecodecs.libs/"):
        return name.split("/")[1].startswith(keep_lib)
    m = re.match(r"imagecodecs/(_\w+)\.abi3\.so$", name)
    return m is None or m.group(1) in keep_ext
tmp = src.with_suffix(".tmp")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    record_name = next(n for n in zin.namelist() if n.endswith(".dist-info/RECORD"))
    rows = []
    for info in zin.infolist():
        if info.filename == record_name or not kept(info.filename):
            continue
        data = zin.read(info)
        zout.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{info.filename},sha256={digest},{len(data)}")
    zout.writestr(record_name, "\n".join(rows + [f"{record_name},,"]) + "\n")
print(f"imagecodecs pruned: {src.stat().st_size / 2**20:.1f} -> {tmp.stat().st_size / 2**20:.1f} MiB")
tmp.replace(src)
EOF

# The mosaic builder throughput.py calls (../shared does not travel).
mkdir -p "$DEST/shared/tools"
cp "$SHARED/tools/mosaic_slide.py" "$DEST/shared/tools/"

rm -rf "$DEST/data"
for ds in monuseg tnbc; do
  mkdir -p "$DEST/data/$ds/images" "$DEST/data/$ds/labels"
  cp "$SHARED/data/$ds/splits.csv" "$DEST/data/$ds/"
  cp "$SHARED/data/$ds"/labels/*.png "$DEST/data/$ds/labels/"
done
# JPEG, not PNG: lossless WebP would still be 60 MB for MoNuSeg alone. Training already
# sees JPEG re-encoding (augment.jpeg_p); scores on these images are compared with the
# bundled model's on the same images in the same run, and the checkpoint that comes back
# can be scored on the PNGs here.
"$PY" - "$SHARED/data" "$DEST/data" "$QUALITY" "$BENCH_ONLY" <<'EOF'
import csv, sys
from pathlib import Path
from PIL import Image
src, dst, q, bench_only = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
for ds in ("monuseg", "tnbc"):
    for row in csv.DictReader(open(src / ds / "splits.csv")):
        if bench_only and (ds, row["split"]) != ("monuseg", "test"):
            continue  # mosaic_slide.py reads the test split's rows alone
        image = Image.open(src / ds / "images" / f"{row['name']}.png").convert("RGB")
        image.save(dst / ds / "images" / f"{row['name']}.jpg", quality=q)
EOF

mib() { du -sb "$@" | awk '{s += $1} END {printf "%.1f MiB", s / 2^20}'; }
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
echo "wheels: $(ls "$DEST"/wheels/*.whl | wc -l) files, $(mib "$DEST/wheels")"
echo "data:   $(mib "$DEST/data")$([ "$BENCH_ONLY" = 1 ] && echo ' (MoNuSeg test only: no training)')"
echo "working tree without .gpu: $(awk -v b="$tree" 'BEGIN {printf "%.1f MiB", b / 2^20}');" \
  "with it: $(du -sb "$DEST" | awk -v b="$tree" '{printf "%.1f MiB", (b + $1) / 2^20}') (limit 64 MiB)"

if [ "$CHECK" = 1 ]; then
  # A device-like Python 3.12: the carried wheels plus cp312 stand-ins for what the image
  # already has (numpy, scipy, scikit-image, pillow, tifffile, pyarrow, ...), fetched from
  # this machine's offline index into /tmp (not carried).
  PY312=${PY312:-$HOME/.pyenv/versions/3.12.1/bin/python3.12}
  CHK=/tmp/nucleiflow-gpuprep-check
  rm -rf "$CHK" && mkdir -p "$CHK/have"
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$CHK/have" numpy pillow tifffile scipy scikit-image pyarrow packaging pyyaml \
    toolz cloudpickle fsspec click 2>&1 | grep -v "^WARNING: Location" || true
  "$PY312" -m pip install -q --no-index --no-deps --no-compile --target "$CHK/site" "$CHK"/have/*.whl
  bash benchmarks/gpu/install.sh "$PY312" "$CHK/site"  # as run.sh does on the device
  mkdir -p "$CHK/data/monuseg/images"
  cp -r "$DEST/data/monuseg/labels" "$DEST/data/monuseg/splits.csv" "$CHK/data/monuseg/"
  PYTHONPATH="$CHK/site" "$PY312" - "$DEST/data/monuseg/images" "$CHK/data/monuseg/images" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
for p in Path(sys.argv[1]).glob("*.jpg"):
    Image.open(p).save(Path(sys.argv[2]) / (p.stem + ".png"))
EOF
  PYTHONPATH="$CHK/site" "$PY312" "$DEST/shared/tools/mosaic_slide.py" "$CHK/data/monuseg" --split test --cols 2 --rows 2 \
    --tissue 0.5 --mpp 0.25 --seed 1 --no-labels --out "$CHK/m" >/dev/null
  PYTHONPATH="$CHK/site" "$PY312" - "$CHK/m.tiff" <<'EOF'
import sys
import dask.array, imagecodecs, numcodecs, openslide, pydantic, shapely, tifffile, zarr
from importlib.metadata import version
# The torch-free part of the package, through install.sh's links (torch has no cp312 wheel here).
import nucleiflow.pipeline.config, nucleiflow.pipeline.slide.reader, nucleiflow.pipeline.slide.pyramid
import nucleiflow.pipeline.outputs.omezarr, nucleiflow.pipeline.outputs.geoparquet
import nucleiflow.pipeline.postprocess.watershed, nucleiflow.pipeline.postprocess.morphometry, nucleiflow.pipeline.batch.tile_parts
s = openslide.OpenSlide(sys.argv[1])
page = tifffile.TiffFile(sys.argv[1]).pages[0]
fh = page.parent.filehandle
fh.seek(page.dataoffsets[0]); raw = fh.read(page.databytecounts[0])
tile = page.decode(raw, 0, jpegtables=page.jpegtables)[0][0]
ref = __import__("numpy").asarray(s.read_region((0, 0), 0, (tile.shape[1], tile.shape[0])).convert("RGB"))
print(f"check ok: python {sys.version.split()[0]}, openslide {openslide.__library_version__} "
      f"{s.dimensions}, tile {tile.shape} equal to OpenSlide's: {(tile == ref).all()}, zarr {zarr.__version__}, "
      f"numcodecs {numcodecs.__version__}, shapely {shapely.__version__}, pydantic {pydantic.__version__}, "
      f"imagecodecs {imagecodecs.__version__} (jpeg8 {imagecodecs.JPEG8.available}), "
      f"nucleiflow {version('nucleiflow')} from {nucleiflow.pipeline.config.__file__}")
EOF
  rm -rf "$CHK"
fi
