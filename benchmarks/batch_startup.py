"""What starting the reader / post-processing pools costs per slide: per slide (the old
lifetime: every slide starts and stops its own) vs once per batch (`TilePools` shared).

    python benchmarks/batch_startup.py [--slides 10] [--readers 1] [--workers 1]
        [--model student] [--tile-size 512] [--cache DIR]

Builds (once, cached) a 1 x 1 MoNuSeg mosaic (1000 px at 0.25 um/px: one 512 px tile at the
model's 0.5 um/px) with ../shared/tools/mosaic_slide.py and links it under --slides names,
then segments the batch twice with `segment_slide` (no Prefect, whose start-up would blur
the figure), into fresh folders, the same model and torch threads (the `auto` rule's):

  per slide   ``pools=None``: each slide starts and stops its own pools (before issue 13).
  per batch   one `TilePools` for the batch, passed to every slide.

Per slide it prints the pool start seconds (run.json ``pools.start_s``: until every process
answered a no-op job) and the slide's wall time; then the means, and the wall-time saving
per slide (which also holds the per-slide pools' shutdown). Figures only; it asserts nothing.
Wall times on a shared CPU are only as steady as the CPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nucleiflow.models.checkpoint import model_hash, resolve
from nucleiflow.pipeline.batch.manifest import SlideJob
from nucleiflow.pipeline.batch.run_slide import segment_slide
from nucleiflow.pipeline.config import SegmentConfig
from nucleiflow.pipeline.infer.pools import TilePools, pool_sizes, usable_cores
from nucleiflow.pipeline.infer.predictor import load_predictor

from read_speed import mosaic  # benchmarks/ is the script's folder: on sys.path


def run_batch(jobs: list[SlideJob], out: Path, cfg: SegmentConfig, pred, mhash: str,
              pools: TilePools | None) -> list[tuple[float, float]]:
    """(pool start seconds, wall seconds) per slide."""
    rows, started = [], 0.0
    for job in jobs:
        t0 = time.perf_counter()
        rec = segment_slide(job, out, cfg, pred, mhash, log=None, pools=pools)
        wall = time.perf_counter() - t0
        total = rec["pools"]["start_s"]  # cumulative in a shared TilePools
        rows.append((total - started if pools is not None else total, wall))
        started = total if pools is not None else 0.0
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slides", type=int, default=10)
    p.add_argument("--readers", default="1")
    p.add_argument("--workers", default="1")
    p.add_argument("--model", default="student")
    p.add_argument("--tile-size", type=int, default=512)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "nucleiflow-bench")
    a = p.parse_args()
    as_n = lambda v: v if v == "auto" else int(v)  # noqa: E731
    cfg = SegmentConfig(model=a.model, device="cpu", tile_size=a.tile_size, readers=as_n(a.readers),
                        workers=as_n(a.workers))
    sizes = pool_sizes(usable_cores(), False, cfg.readers, cfg.workers)
    torch.set_num_threads(sizes.torch_threads)
    pred, mhash = load_predictor(a.model, device="cpu"), model_hash(resolve(a.model))
    src = mosaic(a.cache, 1, 1)
    with tempfile.TemporaryDirectory(prefix="batch-startup-") as tmp:
        d = Path(tmp)
        jobs = []
        for i in range(a.slides):
            (d / f"slide-{i:02d}.tiff").symlink_to(src)
            jobs.append(SlideJob(str(d / f"slide-{i:02d}.tiff"), f"slide-{i:02d}"))
        print(f"{a.slides} slides ({src.name}), model {a.model}, tile {a.tile_size}, {sizes}", flush=True)
        old = run_batch(jobs, d / "per-slide", cfg, pred, mhash, None)
        with TilePools(sizes) as pools:
            new = run_batch(jobs, d / "per-batch", cfg, pred, mhash, pools)
            assert pools.starts == 1
    print(f"\n{'slide':<10} {'per-slide start s':>18} {'wall s':>8} {'per-batch start s':>18} {'wall s':>8}")
    for job, (s0, w0), (s1, w1) in zip(jobs, old, new):
        print(f"{job.slide_id:<10} {s0:>18.2f} {w0:>8.2f} {s1:>18.2f} {w1:>8.2f}")
    mean = lambda rows, i: statistics.fmean(r[i] for r in rows)  # noqa: E731
    print(f"{'mean':<10} {mean(old, 0):>18.2f} {mean(old, 1):>8.2f} {mean(new, 0):>18.2f} {mean(new, 1):>8.2f}")
    print(f"\npool start per slide: {mean(old, 0):.2f} s per slide -> {mean(new, 0):.2f} s per batch slide; "
          f"wall saved per slide: {mean(old, 1) - mean(new, 1):.2f} s")
    print(json.dumps({"sizes": sizes.to_dict(), "per_slide": old, "per_batch": new}))


if __name__ == "__main__":
    main()
