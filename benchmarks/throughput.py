"""Whole-slide throughput and peak memory of `segment_slide` as the slide grows.

    python benchmarks/throughput.py [--sizes 4000 8000 16000 24000] [--model student]
        [--device auto] [--tile-size 1024] [--halo 64] [--batch-size 4] [--readers 1|auto]
        [--workers 1|auto] [--threads N] [--cache DIR] [--json FILE]

Builds (once, cached under --cache) square mosaic slides of MoNuSeg test tiles at
0.25 um/px with ../shared/tools/mosaic_slide.py (1000 px cells, --tissue of them tissue),
then segments each in its own subprocess, so peak memory is per slide. The subprocess
calls `nucleiflow.pipeline.batch.run_slide.segment_slide` directly (no Prefect) into a fresh
temp folder, after one warm-up batch through the Predictor (CUDA init, cudnn autotune).

Per slide it prints sizes, tiles, nuclei, wall time, throughput (planned model px/s and
level-0 px/s), the stage seconds of run.json ``timings_s``, how busy the model kept the
stream, the main process's own time in the writers (instrumented here), and peak memory:

  self MB      getrusage(RUSAGE_SELF).ru_maxrss of the segmenting process (its baseline
               holds torch, the model and the warm-up batch).
  children MB  getrusage(RUSAGE_CHILDREN).ru_maxrss: the largest single reaped descendant
               (reader and post-process pools; they fork from the multiprocessing
               forkserver, so the forkserver is stopped first to reap it and fold them in).
               Caveat (Linux): a child that is forked and then exec's keeps its parent's
               RSS at fork as its maxrss, and the forkserver is started that way from the
               segmenting process, so this figure is at least the segmenting process's RSS
               when its first pool started; read the two rows below for the pools' own.
  tree MB      peak of the summed RSS of the process and all its descendants, sampled every
               0.1 s with psutil (shared pages counted once per process: an upper bound),
               and each descendant's own sampled peak.

On CUDA, "GPU busy" is the mean of NVML's utilisation sampled every 0.1 s during the run
(`GpuBusy`; needs nvidia-ml-py): the share of wall time in which a kernel ran. "model busy"
is the host's view: seconds in the Predictor (copies, forward, dense maps) over the stream.

Per slide, "post-process hidden" = post-process seconds per worker <= model seconds, and
"stream bound by" names the longest of model, read / readers, post-process / workers and
the main process's writes. Then ratios, largest / smallest slide and largest / second
largest: area (level-0 and planned), peak memory (target < 1.5x while area grows >= 30x)
and throughput. Small slides are one or two batches, below the steady state (pools, caches,
the GeoParquet row-group buffer), so read memory growth off the two largest. It prints
figures only; it asserts nothing. Wall times on a shared CPU are only as steady as the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from throughput_report import comparisons, derive, fmt, table

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NUCLEIFLOW_SHARED", REPO.parent / "shared"))
CELL_PX = 1000  # mosaic_slide.py cell edge at --mpp 0.25
SLIDE_MPP = 0.25


# -- slides ------------------------------------------------------------------------------
def mosaic(cache: Path, size: int, tissue: float, seed: int, dataset: Path, split: str) -> Path:
    """Path of a cached square mosaic slide of ``size`` level-0 px (rounded to whole cells)."""
    cells = max(1, round(size / CELL_PX))
    out = cache / f"{dataset.name}-{split}-{cells}x{cells}-t{tissue:g}-s{seed}.tiff"
    if out.exists():
        return out
    tmp = cache / f"build-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(SHARED / "tools" / "mosaic_slide.py"), str(dataset), "--split", split,
           "--cols", str(cells), "--rows", str(cells), "--tissue", str(tissue), "--mpp", str(SLIDE_MPP),
           "--seed", str(seed), "--no-labels", "--out", str(tmp / "m")]
    print(f"building {out.name} ({cells * CELL_PX} px square) ...", file=sys.stderr, flush=True)
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        (tmp / "m.tiff").rename(out)  # whole file or nothing: a killed build is never reused
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- the measured run (in a subprocess) ----------------------------------------------------
class TreeRSS:
    """Samples the summed RSS (bytes) of this process and its descendants in a thread."""

    def __init__(self, interval: float = 0.1) -> None:
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.peak = self.peak_self = 0
        self.peak_by_pid: dict[int, int] = {}  # descendants' own peaks, bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        own = self.proc.memory_info().rss
        total = own
        for child in self.proc.children(recursive=True):
            try:
                rss = child.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                continue
            total += rss
            self.peak_by_pid[child.pid] = max(self.peak_by_pid.get(child.pid, 0), rss)
        self.peak, self.peak_self = max(self.peak, total), max(self.peak_self, own)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeRSS:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class GpuBusy:
    """Samples the GPU's utilisation through NVML (nvidia-ml-py) every ``interval`` s in a thread.

    NVML's ``utilization.gpu`` is the share of its last sample period (1/6 s to 1 s by
    card) in which at least one kernel ran: the mean over the run is the share of wall time
    the GPU was busy. Not a measure of how full the GPU was while busy. ``mean`` is None
    where there is no NVML or no CUDA device (CPU runs).
    """

    def __init__(self, device, interval: float = 0.1) -> None:
        self.samples: list[int] = []
        self.mem_peak_mb = 0.0
        self.interval, self.handle = interval, None
        self._stop = threading.Event()
        if getattr(device, "type", None) == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml = pynvml
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception as e:  # no nvidia-ml-py, or no driver: the run goes on without it
                print(f"note: no GPU utilisation samples ({e})", file=sys.stderr)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
                self.mem_peak_mb = max(self.mem_peak_mb, self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**20)
            except Exception as e:  # an NVML error ends the sampling, not the run
                print(f"note: GPU sampling stopped ({e})", file=sys.stderr)
                return

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None

    def __enter__(self) -> GpuBusy:
        if self.handle is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def instrument_writers() -> tuple[dict[str, float], dict[str, int]]:
    """Wrap the file writers' per-tile methods: main-process seconds and calls in each.

    The pipeline's StageTimer has no entry for this work (GeoParquet rows, Zarr chunk
    writes and the stitcher's read-modify-writes), yet it runs in the main process between
    model batches. Only this subprocess is patched.
    """
    from nucleiflow.pipeline.outputs.geoparquet import GeoParquetWriter
    from nucleiflow.pipeline.outputs.omezarr import OmeZarrWriter

    seconds = {"main_parquet_write": 0.0, "main_zarr_labels_write": 0.0, "main_zarr_prob_write": 0.0,
               "main_zarr_labels_read": 0.0}
    calls = dict.fromkeys(seconds, 0)

    def timed(cls, name: str, key: str) -> None:
        fn = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                seconds[key] += time.perf_counter() - t0
                calls[key] += 1

        setattr(cls, name, wrapper)

    timed(GeoParquetWriter, "write", "main_parquet_write")
    # The stitcher's Merger calls on the Zarr side (SlideOutputs forwards them).
    timed(OmeZarrWriter, "write_labels", "main_zarr_labels_write")
    timed(OmeZarrWriter, "write_prob", "main_zarr_prob_write")
    timed(OmeZarrWriter, "read_labels", "main_zarr_labels_read")
    return seconds, calls


def stop_forkserver() -> None:
    """Stop multiprocessing's forkserver so its reaped pool workers count in RUSAGE_CHILDREN.

    Pool workers are children of the forkserver, not of this process; their rusage reaches
    ours only once the forkserver itself is reaped. ``_stop`` is private (CPython uses it in
    its tests), hence the guard.
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if server is not None and getattr(server, "_forkserver_pid", None) is not None:
        try:
            server._stop()
        except Exception as e:  # an older/newer CPython: children MB may then miss the pools
            print(f"warning: could not stop the forkserver ({e}); children MB may miss the pools",
                  file=sys.stderr)


def planned_area(slide: str, cfg, card: dict) -> tuple[int, int, int]:
    """(planned core model px, whole slide model px, tiles), planned as segment_slide plans.

    Re-plans after the measured run (tissue detection is cheap); the tile count is checked
    against run.json by the caller.
    """
    from nucleiflow.pipeline.slide.reader import open_slide
    from nucleiflow.pipeline.slide.tissue import detect_tissue
    from nucleiflow.pipeline.tiles.plan import plan_slide

    with open_slide(slide, mpp=cfg.mpp) as reader:
        tissue = detect_tissue(reader, mpp=cfg.tissue_mpp)
        plan = plan_slide(reader.info, tissue, card["mpp"], tile_size=cfg.tile_size, halo=cfg.halo)
    return plan.planned_area(), plan.width * plan.height, len(plan)


def child(spec: dict) -> dict:
    """Segment one slide as ``spec`` says; returns the measurements (JSON-able)."""
    import numpy as np
    import torch

    from nucleiflow.models.checkpoint import load_checkpoint, model_hash, resolve
    from nucleiflow.pipeline.config import SegmentConfig
    from nucleiflow.pipeline.infer.predictor import Predictor
    from nucleiflow.pipeline.batch.manifest import SlideJob
    from nucleiflow.pipeline.batch.run_slide import segment_slide

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = SegmentConfig(model=spec["model"], device=spec["device"], tile_size=spec["tile_size"],
                        halo=spec["halo"], batch_size=spec["batch_size"], readers=spec["readers"],
                        workers=spec["workers"])
    net, card = load_checkpoint(cfg.model)
    predictor = Predictor(net, card, device=cfg.device)
    mhash = model_hash(resolve(cfg.model))
    window = cfg.tile_size + 2 * cfg.halo
    t0 = time.perf_counter()
    predictor(np.zeros((cfg.batch_size, window, window, 3), np.uint8))  # warm-up, not timed below
    warmup = time.perf_counter() - t0
    writes, calls = instrument_writers()
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if spec["verbose"] else (lambda m: None)
    job = SlideJob(spec["slide"], Path(spec["slide"]).stem)
    out = Path(tempfile.mkdtemp(prefix="nucleiflow-bench-"))
    try:
        with TreeRSS() as tree, GpuBusy(predictor.device) as gpu:
            t0 = time.perf_counter()
            rec = segment_slide(job, out, cfg, predictor, mhash, log=log)
            wall = time.perf_counter() - t0
    finally:
        if spec["keep_out"]:
            print(f"outputs kept in {out}", file=sys.stderr)
        else:
            shutil.rmtree(out, ignore_errors=True)
    stop_forkserver()
    ru_self = resource.getrusage(resource.RUSAGE_SELF)
    ru_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    planned, model_px, tiles = planned_area(spec["slide"], cfg, card)
    slide = rec["slide"]
    return {
        "slide": spec["slide"], "width": slide["width"], "height": slide["height"],
        "device": str(predictor.device), "torch_threads": torch.get_num_threads(),
        "model_mpp": rec["model_mpp"], "tissue_fraction": rec["tissue_fraction"],
        "planned_model_px": planned, "model_px": model_px, "tiles": rec["tiles"],
        "tiles_replanned": tiles, "nuclei": rec["nuclei"], "halo_edge_nuclei": rec["halo_edge_nuclei"],
        "wall_s": wall, "warmup_s": warmup, "timings_s": rec["timings_s"],
        "main_writes_s": writes, "main_write_calls": calls,
        "self_cpu_s": ru_self.ru_utime + ru_self.ru_stime,
        "children_cpu_s": ru_children.ru_utime + ru_children.ru_stime,
        "self_maxrss_mb": ru_self.ru_maxrss / 1024, "children_maxrss_mb": ru_children.ru_maxrss / 1024,
        "tree_peak_mb": tree.peak / 2**20, "self_peak_sampled_mb": tree.peak_self / 2**20,
        "descendant_peaks_mb": sorted((v / 2**20 for v in tree.peak_by_pid.values()), reverse=True),
        "slide_mpp": SLIDE_MPP, "tissue_mm2": rec.get("tissue_mm2"), "gpu_busy": gpu.mean, "gpu_samples": len(gpu.samples),
        "gpu_util_samples": gpu.samples, "gpu_sample_interval_s": gpu.interval,
        "gpu_mem_peak_mb": gpu.mem_peak_mb or None,
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if predictor.cuda else None,
        "pools": rec.get("pools"),
    }


def run_child(spec: dict) -> dict:
    """Run ``child(spec)`` in a fresh interpreter; its result comes back through a file."""
    with tempfile.TemporaryDirectory(prefix="nucleiflow-bench-") as d:
        result = Path(d) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--result", str(result)]
        subprocess.run(cmd, check=True)
        return json.loads(result.read_text())


def pool_arg(v: str) -> int | str:
    return v if v == "auto" else int(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[4000, 8000, 16000, 24000],
                   help="square slide edges, level-0 px at 0.25 um/px (rounded to 1000 px cells)")
    p.add_argument("--model", default="student", help="registry name or checkpoint folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--halo", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--readers", type=pool_arg, default=1, help="reader processes, or auto (`infer.pools`)")
    p.add_argument("--workers", type=pool_arg, default=1, help="post-process processes, or auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in the run (0 = torch default)")
    p.add_argument("--tissue", type=float, default=0.5, help="fraction of mosaic cells with tissue")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dataset", type=Path, default=SHARED / "data" / "monuseg")
    p.add_argument("--split", default="test")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "nucleiflow-bench")
    p.add_argument("--json", type=Path, help="also write all figures here")
    p.add_argument("--keep-out", action="store_true", help="keep each run's output folder")
    p.add_argument("--verbose", action="store_true", help="show segment_slide's progress log")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.child:
        a.result.write_text(json.dumps(child(json.loads(a.child))))
        return

    a.cache.mkdir(parents=True, exist_ok=True)
    slides = [mosaic(a.cache, s, a.tissue, a.seed, a.dataset, a.split) for s in sorted(set(a.sizes))]
    base = {"model": str(a.model), "device": a.device, "tile_size": a.tile_size, "halo": a.halo,
            "batch_size": a.batch_size, "readers": a.readers, "workers": a.workers, "threads": a.threads,
            "verbose": a.verbose, "keep_out": a.keep_out}
    results = []
    for slide in slides:
        print(f"segmenting {slide.name} ...", file=sys.stderr, flush=True)
        r = run_child({**base, "slide": str(slide)})
        pools = r.get("pools") or {}  # run.json's: what `auto` resolved to
        r.update(readers=pools.get("readers", a.readers), workers=pools.get("workers", a.workers))
        r["d"] = derive(r)
        results.append(r)
        if r["tiles_replanned"] != r["tiles"]:
            print(f"note: re-planned {r['tiles_replanned']} tiles, run.json says {r['tiles']}: "
                  "planned Mpx may be off", file=sys.stderr)

    r0 = results[0]
    print(f"model {a.model}, device {r0['device']} ({r0['torch_threads']} torch threads), model mpp "
          f"{r0['model_mpp']}, tile {a.tile_size} + halo {a.halo}, batch {a.batch_size}, readers {r0['readers']}, "
          f"workers {r0['workers']}, {os.cpu_count()} CPUs; warm-up batch {r0['warmup_s']:.2f} s (not counted)")
    print("rates are per segment_slide wall second; 'planned' = tissue tile cores in model px; "
          "stage seconds from run.json timings_s (tiles_read / tiles_postprocess are summed over processes)")
    print()
    print(table(results))
    print()
    comps = comparisons(results) if len(results) > 1 else {}
    for title, rows in comps.items():
        print(title)
        for name, v, note in rows:
            print(f"  {name:32s} {fmt(v):>8s}x  {note}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "slides": results,
                                      "ratios": {t: {n: v for n, v, _ in rows} for t, rows in comps.items()}},
                                     indent=2))
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
