"""One slide from file to finished outputs: skip if done, tissue, plan, stream, write, run.json.

A slide is *done* iff ``<out>/<slide_id>/run.json`` exists with status "done" and the same
key (slide fingerprint, model hash, config key). run.json is written last, atomically;
before a slide is (re)done its old run.json goes first, so a slide never looks finished
while it is not. Writers stream into hidden temp names and rename on close.
"""
from __future__ import annotations

import platform
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from nucleiflow.pipeline.config import SegmentConfig
from nucleiflow.pipeline.inference import Predictor
from nucleiflow.pipeline.manifest import SlideJob
from nucleiflow.pipeline.segment import segment_reader
from nucleiflow.pipeline.slides import open_slide
from nucleiflow.pipeline.tilework import empty_tile_table
from nucleiflow.pipeline.tiling import plan_tiles
from nucleiflow.pipeline.tissue import detect_tissue, overlay_png
from nucleiflow.pipeline.writers import open_slide_writers, slide_paths, write_json_atomic


def run_key(fingerprint: str, model_hash: str, config_key: str) -> dict:
    return {"slide_fingerprint": fingerprint, "model_hash": model_hash, "config_key": config_key}


def is_done(run_json: Path, key: dict) -> bool:
    """Does ``run_json`` record a finished run with this key?"""
    import json

    try:
        rec = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return False
    return rec.get("status") == "done" and all(rec.get(k) == v for k, v in key.items())


def clean_partial(out: Path, slide_id: str) -> None:
    """Remove a previous run's leftovers: run.json first, then temp and stale outputs."""
    paths = slide_paths(out, slide_id)
    paths["run_json"].unlink(missing_ok=True)
    for folder in (paths["parquet"].parent, paths["zarr"].parent):
        if folder.is_dir():
            for p in folder.glob(".*.tmp-*"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    paths["parquet"].unlink(missing_ok=True)
    shutil.rmtree(paths["zarr"], ignore_errors=True)


def segment_slide(
    job: SlideJob,
    out: str | Path,
    cfg: SegmentConfig,
    predictor: Predictor,
    model_hash: str,
    *,
    log=print,
) -> dict:
    """Segment ``job`` into ``out``; returns the run record (also written as run.json).

    Raises SlideError (bad slide) or OSError (output) after removing partial outputs.
    """
    out = Path(out)
    log = log or (lambda msg: None)  # None = quiet (on_tile below already allowed it)
    t0 = time.perf_counter()
    card = predictor.card
    with open_slide(job.path, mpp=job.mpp or cfg.mpp) as reader:
        info = reader.info
        # The effective mpp changes every size: it is part of what "done" means.
        key = run_key(info.fingerprint, model_hash, f"{cfg.key()}@{info.mpp_x:.6g}")
        paths = slide_paths(out, job.slide_id)
        if is_done(paths["run_json"], key):
            log(f"{job.slide_id}: already done with this slide, model and config; skipping")
            return {"slide_id": job.slide_id, "status": "skipped", **key, "path": job.path}
        clean_partial(out, job.slide_id)
        timings: dict[str, float] = {}
        t = time.perf_counter()
        tissue = detect_tissue(reader, mpp=cfg.tissue_mpp)
        # Grow by one mask pixel: edge pixels that are only partly tissue still get tiles.
        planning_mask = ndi.binary_dilation(tissue.mask, iterations=1)
        plan = plan_tiles(
            info.width, info.height, info.mpp_x, card["mpp"], tile_size=cfg.tile_size, halo=cfg.halo,
            tissue=planning_mask, tissue_mpp=tissue.mpp,
        )
        timings["tissue"] = time.perf_counter() - t
        log(f"{job.slide_id}: {info.width}x{info.height} px at {info.mpp_x:.3f} um/px, "
            f"tissue {tissue.fraction:.1%}, {len(plan)} tiles of {cfg.tile_size} px at {plan.mpp} um/px")
        meta = {"model": cfg.model, "model_hash": model_hash, "config_hash": cfg.key(),
                "slide_fingerprint": info.fingerprint, "source": str(job.path)}
        writers = open_slide_writers(
            out, job.slide_id, shape=(plan.height, plan.width), mpp=plan.mpp, scale=plan.scale,
            chunk=cfg.tile_size, metadata=meta, tissue=tissue.mask, tissue_mpp=tissue.mpp,
        )
        table_writer, mask_writer = writers.writers
        try:
            def on_tile(tn, offset: int) -> None:
                table = dict(tn.table)
                table["nucleus_id"] = table["nucleus_id"] + offset
                table_writer.write(table)
                if (tn.tile.index + 1) % 10 == 0:
                    log(f"{job.slide_id}: {tn.tile.index + 1}/{len(plan)} tiles")

            t = time.perf_counter()
            stats = segment_reader(
                reader, plan, predictor, mask_writer, batch_size=cfg.batch_size, readers=cfg.readers,
                workers=cfg.workers, on_tile=on_tile,
            )
            timings["stream"] = time.perf_counter() - t
            if stats.tiles == 0:
                # No tile wrote a table: give the file the columns every other slide's has.
                # pyarrow, geopandas and DuckDB take a batch's schema from its first file and
                # silently drop columns missing there (touches_halo_edge, class_*).
                table_writer.write(empty_tile_table(classes="tp" in (card.get("outputs") or {})))
            overlay_png(reader, tissue, plan, paths["run_json"].parent / "overlay.png")
            t = time.perf_counter()
            writers.close({"nuclei": stats.nuclei})
            timings["write_close"] = time.perf_counter() - t
        except BaseException:
            writers.abort()
            # A writer that closed before another one failed has renamed its output already
            # (the table closes before the masks): remove it, so a failed slide leaves nothing
            # under a final name for a batch read to pick up. clean_partial removed any older
            # outputs of this slide before this run began, so these are this run's.
            paths["parquet"].unlink(missing_ok=True)
            shutil.rmtree(paths["zarr"], ignore_errors=True)
            raise
    if stats.halo_edge_nuclei:
        warnings.warn(f"{job.slide_id}: {stats.halo_edge_nuclei} nuclei touch the halo edge; "
                      f"the halo ({cfg.halo} px) may be too small for them", stacklevel=2)
    tissue_mm2 = float(tissue.mask.sum()) * (tissue.mpp / 1000) ** 2
    record = {
        "slide_id": job.slide_id, "status": "done", **key, "path": str(job.path),
        "model": cfg.model, "config": cfg.model_dump(), "model_mpp": plan.mpp,
        "slide": info.to_dict(), "tissue_fraction": tissue.fraction, "tissue_mm2": tissue_mm2,
        "tiles": stats.tiles, "nuclei": stats.nuclei, "halo_edge_nuclei": stats.halo_edge_nuclei,
        "timings_s": {**timings, **{f"tiles_{k}": v for k, v in stats.timer.seconds.items()},
                      "total": time.perf_counter() - t0},
        "outputs": {k: str(v) for k, v in paths.items()},
        "versions": versions(),
    }
    write_json_atomic(paths["run_json"], record)
    return record


def versions() -> dict:
    from importlib.metadata import version

    import torch
    import zarr

    return {"nucleiflow": version("nucleiflow"), "python": platform.python_version(), "torch": torch.__version__,
            "zarr": zarr.__version__, "numpy": np.__version__}
