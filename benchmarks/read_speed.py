"""How much does reading through OpenSlideReader cost over OpenSlide's own read_region?

Builds (once, cached) a mosaic slide at 0.25 um/px from MoNuSeg test tiles with
../shared/tools/mosaic_slide.py, then reads a SIZE x SIZE region at MPP um/px at a few
positions, two ways:

  ours      OpenSlideReader.read(x, y, SIZE, SIZE, MPP): level choice, RGBA -> RGB on white,
            area resampling, numpy array out.
  openslide OpenSlide.read_region at get_best_level_for_downsample, .convert("RGB") (it
            ignores transparency: fine here, all reads are inside the slide), PIL BOX resize
            to SIZE, numpy array out.

Each position is read once by each way to warm up, then REPEATS times by each in turn.
Prints the median per position and overall, and the ratio ours / openslide (target <= 2).

    python benchmarks/read_speed.py [--cache DIR] [--cols 8 --rows 8] [--size 2048] [--mpp 0.5]
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from nucleiflow.pipeline.slide.reader import OpenSlideReader

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NUCLEIFLOW_SHARED", REPO.parent / "shared"))


def mosaic(cache: Path, cols: int, rows: int, seed: int = 1) -> Path:
    """Path of a cached cols x rows mosaic slide (0.25 um/px, 1000 px cells); built if missing."""
    out = cache / f"monuseg-test-{cols}x{rows}-s{seed}.tiff"
    if out.exists():
        return out
    tmp = cache / f"build-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(SHARED / "tools" / "mosaic_slide.py"), str(SHARED / "data" / "monuseg"),
           "--split", "test", "--cols", str(cols), "--rows", str(rows), "--tissue", "0.75",
           "--mpp", "0.25", "--seed", str(seed), "--no-labels", "--out", str(tmp / "m")]
    print("building", out, "...", flush=True)
    subprocess.run(cmd, check=True)
    (tmp / "m.tiff").rename(out)  # whole file or nothing: a killed build is never reused
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_openslide(s: openslide.OpenSlide, x: int, y: int, size: int, ds: float) -> np.ndarray:
    """OpenSlide's read_region at its best level, then a PIL area resize: the baseline."""
    level = s.get_best_level_for_downsample(ds)
    n = math.ceil(size * ds / s.level_downsamples[level])
    img = s.read_region((x, y), level, (n, n)).convert("RGB")
    return np.asarray(img.resize((size, size), Image.Resampling.BOX))


def timed(fn, *args) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "nucleiflow-bench")
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--size", type=int, default=2048, help="output px per side")
    p.add_argument("--mpp", type=float, default=0.5, help="um/px of the output")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()

    path = mosaic(a.cache, a.cols, a.rows)
    ours = OpenSlideReader(path)
    theirs = openslide.OpenSlide(str(path))  # a handle of its own: no shared tile cache
    i = ours.info
    ds = a.mpp / i.mpp_x
    span = math.ceil(a.size * ds)  # level-0 px one read covers
    print(f"slide {path.name}: {i.width}x{i.height} px at {i.mpp_x} um/px, levels "
          f"{i.level_downsamples}; region {a.size}x{a.size} at {a.mpp} um/px = {span} level-0 px")
    free_x, free_y = max(i.width - span, 0), max(i.height - span, 0)
    positions = [(0, 0), (free_x // 3, free_y // 2), (free_x, free_y), (free_x // 2, free_y // 5)]
    all_ours, all_theirs = [], []
    for x, y in positions:
        _, a_ours = timed(ours.read, x, y, a.size, a.size, a.mpp)  # warm up both
        _, a_theirs = timed(read_openslide, theirs, x, y, a.size, ds)
        diff = np.abs(a_ours.astype(np.int16) - a_theirs).mean()
        t_ours, t_theirs = [], []
        for _ in range(a.repeats):
            t_ours.append(timed(ours.read, x, y, a.size, a.size, a.mpp)[0])
            t_theirs.append(timed(read_openslide, theirs, x, y, a.size, ds)[0])
        all_ours += t_ours
        all_theirs += t_theirs
        mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
        print(f"  at ({x:6d}, {y:6d}): ours {mo * 1e3:7.1f} ms  openslide {mt * 1e3:7.1f} ms  "
              f"ratio {mo / mt:4.2f}  (mean |diff| {diff:.2f} grey levels)")
    mo, mt = statistics.median(all_ours), statistics.median(all_theirs)
    print(f"median over {len(all_ours)} reads: ours {mo * 1e3:.1f} ms, openslide {mt * 1e3:.1f} ms, "
          f"ratio ours/openslide {mo / mt:.2f} (target <= 2)")
    ours.close()
    theirs.close()


if __name__ == "__main__":
    main()
