"""A slide SIGKILLed at ~90% of its tiles, then re-run: the re-run's time beside a full run's.

    python benchmarks/resume_inside.py SLIDE [--model student] [--tile-size 512] [--at 0.9] [--out DIR]

Each run is a fresh process (`segment_slide`, as the flow calls it; model loading included,
no Prefect): a full run; a run killed (SIGKILL) once ``--at`` of the tiles have their parts
in ``<slide>/.resume``; the re-run that takes them over. Prints wall seconds, the run.json
stream time, tiles run and taken over, and whether the re-run's outputs equal the full run's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

SID = "slide"


def child(slide: str, out: str, model: str, tile: int) -> None:
    """One run of the slide into ``out`` (the subprocess side)."""
    from nucleiflow.flows.segment import _predictor
    from nucleiflow.pipeline.batch.manifest import SlideJob
    from nucleiflow.pipeline.batch.run_slide import segment_slide
    from nucleiflow.pipeline.config import SegmentConfig

    predictor, mhash = _predictor(model, "cpu")
    cfg = SegmentConfig(model=model, tile_size=tile, device="cpu")
    segment_slide(SlideJob(slide, SID), out, cfg, predictor, mhash, log=None)


def start(args: argparse.Namespace, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, args.slide, "--child", str(out), "--model", args.model,
                             "--tile-size", str(args.tile_size)], start_new_session=True)


def timed(args: argparse.Namespace, out: Path) -> tuple[float, dict]:
    t0 = time.monotonic()
    if start(args, out).wait() != 0:
        sys.exit(f"the run into {out} failed")
    return time.monotonic() - t0, json.loads((out / SID / "run.json").read_text())


def same_outputs(a: Path, b: Path) -> bool:
    import numpy as np
    import pyarrow.parquet as pq
    import zarr

    pa_, pb = (p / "nuclei" / f"slide_id={SID}" / "part-0.parquet" for p in (a, b))
    if not pq.read_table(pa_).equals(pq.read_table(pb)):
        return False
    za, zb = (zarr.open_group(str(p / SID / "masks.ome.zarr"), mode="r") for p in (a, b))
    levels = [f"{g}{k}" for g in ("", "labels/nuclei/") for k in range(len(zb["labels/nuclei"]))]
    return all(np.array_equal(za[k][...], zb[k][...]) for k in levels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide")
    parser.add_argument("--model", default="student")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--at", type=float, default=0.9, help="fraction of the tiles done at the kill")
    parser.add_argument("--out", type=Path, default=Path("/tmp/nucleiflow-resume-bench"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.slide, args.child, args.model, args.tile_size)

    shutil.rmtree(args.out, ignore_errors=True)
    full_s, full = timed(args, args.out / "full")
    need = round(args.at * full["tiles"])
    killed = args.out / "killed"
    parts = killed / SID / ".resume"
    t0, p = time.monotonic(), start(args, killed)
    while len(list(parts.glob("tile-*.npz")) if parts.is_dir() else []) < need:
        if p.poll() is not None:
            sys.exit("the run ended before the kill point")
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    killed_s, have = time.monotonic() - t0, len(list(parts.glob("tile-*.npz")))
    resume_s, resumed = timed(args, killed)

    print(f"{args.slide}: {full['tiles']} tiles of {args.tile_size} px, model {args.model}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    print(f"{'run':<22}{'wall s':>8}{'stream s':>10}{'tiles run':>11}{'taken over':>12}")
    print(f"{'full':<22}{full_s:8.1f}{full['timings_s']['stream']:10.1f}{full['tiles']:11d}{0:12d}")
    print(f"{'killed at ' + str(have) + ' parts':<22}{killed_s:8.1f}{'':>10}{have:11d}{'':>12}")
    run = resumed["tiles"] - resumed["tiles_resumed"]
    print(f"{'re-run (resume)':<22}{resume_s:8.1f}{resumed['timings_s']['stream']:10.1f}{run:11d}"
          f"{resumed['tiles_resumed']:12d}")
    print(f"re-run / full: {resume_s / full_s:.2f} (wall), "
          f"{resumed['timings_s']['stream'] / full['timings_s']['stream']:.2f} (stream); "
          f"outputs equal: {same_outputs(args.out / 'full', killed)}")


if __name__ == "__main__":
    main()
