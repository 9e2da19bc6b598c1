"""One slide from file to finished outputs: skip if done, claim, tissue, plan, stream, write, run.json.

A slide is *done* iff ``<out>/<slide_id>/run.json`` exists with status "done" and the same
key (slide fingerprint, model hash, config key). run.json is written last, atomically;
before a slide is (re)done its old run.json goes first, so a slide never looks finished
while it is not. Writers stream into hidden temp names and rename on close: the masks
first, then the nuclei table, then run.json, so a run killed at any moment leaves at most
a final-named table without run.json for the few ms between the last two renames, and
the next run removes it (`clean_partial`).

Only the worker holding the slide's claim (`claims`) touches its outputs: two batches on
one output folder each find the other's slide "busy" and never write the same slide.
"""
from __future__ import annotations

import os
import platform
import shutil
import socket
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from nucleiflow.pipeline.batch.claims import Claim, ClaimLost, SlideBusy, acquire
from nucleiflow.pipeline.batch.guard import check_same_slide, count_files, damage, read_record
from nucleiflow.pipeline.config import SegmentConfig
from nucleiflow.pipeline.infer.stream import Predictor
from nucleiflow.pipeline.batch.manifest import SlideJob
from nucleiflow.pipeline.infer.segment_reader import segment_reader
from nucleiflow.pipeline.slide.reader import SlideReader, open_slide
from nucleiflow.pipeline.batch.report import OVERLAY_NAME, nuclei_overlay
from nucleiflow.pipeline.tiles.ownership import empty_tile_table
from nucleiflow.pipeline.tiles.plan import plan_tiles
from nucleiflow.pipeline.slide.tissue import detect_tissue, overlay_png
from nucleiflow.pipeline.outputs.atomic import TEMP_PATTERN, write_json_atomic
from nucleiflow.pipeline.outputs.layout import SlideOutputs, slide_paths

# Leftovers of killed runs: temp files and folders (`atomic.temp_path`) and claims broken
# half-way (``.claim.stale-<random>``).
TEMP_PATTERNS = (TEMP_PATTERN, ".claim.stale-*")


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


def clean_partial(out: Path, slide_id: str, claim: Claim) -> None:
    """Remove a previous run's leftovers of this slide: run.json first, then temp files of
    any process (killed runs), then stale final outputs.

    Only the claim's holder may do this (raises ClaimLost otherwise): another live worker's
    temp files are its work in progress.
    """
    claim.verify()
    paths = slide_paths(out, slide_id)
    paths["run_json"].unlink(missing_ok=True)
    _remove_temps(out, slide_id)
    paths["parquet"].unlink(missing_ok=True)
    shutil.rmtree(paths["zarr"], ignore_errors=True)
    (paths["run_json"].parent / OVERLAY_NAME).unlink(missing_ok=True)


def _remove_temps(out: Path, slide_id: str) -> None:
    paths = slide_paths(out, slide_id)
    for folder in (paths["parquet"].parent, paths["zarr"].parent):
        if folder.is_dir():
            for pattern in TEMP_PATTERNS:
                for p in folder.glob(pattern):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def tidy_done(out: Path, slide_id: str) -> None:
    """Remove what a run killed after its run.json left beside a done slide (a dead
    worker's claim, a half-drawn overlay); left alone while another worker holds it."""
    folder = slide_paths(out, slide_id)["run_json"].parent
    if not any(folder.glob(".*")):
        return
    try:
        with acquire(folder) as claim:
            claim.verify()
            _remove_temps(out, slide_id)
    except (SlideBusy, ClaimLost, OSError):
        pass


def segment_slide(
    job: SlideJob,
    out: str | Path,
    cfg: SegmentConfig,
    predictor: Predictor,
    model_hash: str,
    *,
    log=print,
    claim_ttl_s: float | None = None,
) -> dict:
    """Segment ``job`` into ``out``; returns the run record (also written as run.json).

    Status "skipped" (done before with this key), "busy" (another live worker holds the
    slide's claim; ``reason`` says who) or "done". Raises SlideError (bad slide) or OSError
    (output) after removing partial outputs.
    """
    out = Path(out)
    log = log or (lambda msg: None)  # None = quiet (on_tile below already allowed it)
    t0 = time.perf_counter()
    with open_slide(job.path, mpp=job.mpp or cfg.mpp) as reader:
        info = reader.info
        # The effective mpp changes every size: it is part of what "done" means.
        key = run_key(info.fingerprint, model_hash, f"{cfg.key()}@{info.mpp_x:.6g}")
        paths = slide_paths(out, job.slide_id)
        base = {"slide_id": job.slide_id, **key, "path": str(job.path)}
        if _intact_done(paths, key, log):
            log(f"{job.slide_id}: already done with this slide, model and config; skipping")
            tidy_done(out, job.slide_id)
            return {**base, "status": "skipped"}
        try:
            claim = acquire(paths["run_json"].parent, **({} if claim_ttl_s is None else {"ttl_s": claim_ttl_s}))
        except SlideBusy as e:
            log(f"{e}; leaving it to that worker")
            return {**base, "status": "busy", "reason": str(e)}
        with claim:
            # Another worker may have finished it between our look and our claim.
            if _intact_done(paths, key, None):
                log(f"{job.slide_id}: finished by another worker meanwhile; skipping")
                return {**base, "status": "skipped"}
            check_same_slide(read_record(paths["run_json"]), info.fingerprint, job.path,
                             paths["run_json"].parent, cfg.overwrite)
            damaged = is_done(paths["run_json"], key)  # done with this key, yet not intact
            record = _segment_claimed(job, out, cfg, predictor, model_hash, reader, key, claim, log, t0)
            return {**record, "reason": "redone: its outputs were damaged"} if damaged else record


def _intact_done(paths: dict[str, Path], key: dict, log) -> bool:
    """Done with ``key`` and its files still match run.json; logs why a done slide is redone."""
    if not is_done(paths["run_json"], key):
        return False
    why = damage(read_record(paths["run_json"]) or {}, paths)
    if why is not None and log is not None:
        log(f"{paths['run_json'].parent.name}: done before, but its outputs are damaged ({why}); redoing it")
    return why is None


def _segment_claimed(job: SlideJob, out: Path, cfg: SegmentConfig, predictor: Predictor, model_hash: str,
                     reader: SlideReader, key: dict, claim: Claim, log, t0: float) -> dict:
    info, card = reader.info, predictor.card
    paths = slide_paths(out, job.slide_id)
    clean_partial(out, job.slide_id, claim)
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
    outputs = SlideOutputs(
        out, job.slide_id, shape=(plan.height, plan.width), mpp=plan.mpp, scale=plan.scale,
        chunk=cfg.tile_size, metadata=meta, tissue=tissue.mask, tissue_mpp=tissue.mpp,
    )
    try:
        def on_tile(tn, offset: int) -> None:
            if (tn.tile.index + 1) % 10 == 0:
                log(f"{job.slide_id}: {tn.tile.index + 1}/{len(plan)} tiles")

        t = time.perf_counter()
        stats = segment_reader(
            reader, plan, predictor, outputs, batch_size=cfg.batch_size, readers=cfg.readers,
            workers=cfg.workers, on_tile=on_tile,
        )
        timings["stream"] = time.perf_counter() - t
        if stats.tiles == 0:
            # No tile wrote a table: give the file the columns every other slide's has.
            # pyarrow, geopandas and DuckDB take a batch's schema from its first file and
            # silently drop columns missing there (touches_halo_edge, class_*).
            outputs.write_table(empty_tile_table(classes="tp" in (card.get("outputs") or {})))
        overlay_png(reader, tissue, plan, paths["run_json"].parent / "overlay.png")
        t = time.perf_counter()
        claim.verify()  # never publish over a slide another worker now owns
        outputs.close({"nuclei": stats.nuclei})  # masks first, the table last (see SlideOutputs)
        timings["write_close"] = time.perf_counter() - t
    except BaseException:
        outputs.abort()
        _unpublish(paths, claim)
        raise
    if stats.halo_edge_nuclei:
        warnings.warn(f"{job.slide_id}: {stats.halo_edge_nuclei} nuclei touch the halo edge; "
                      f"the halo ({cfg.halo} px) may be too small for them", stacklevel=3)
    tissue_mm2 = float(tissue.mask.sum()) * (tissue.mpp / 1000) ** 2
    try:
        record = {
            "slide_id": job.slide_id, "status": "done", **key, "path": str(job.path),
            "model": cfg.model, "config": cfg.model_dump(), "model_mpp": plan.mpp,
            "slide": info.to_dict(), "tissue_fraction": tissue.fraction, "tissue_mm2": tissue_mm2,
            "tiles": stats.tiles, "nuclei": stats.nuclei, "halo_edge_nuclei": stats.halo_edge_nuclei,
            **({"reason": f"warning: {tissue.warning}"} if tissue.warning else {}),  # shown in the table
            "zarr_files": count_files(paths["zarr"]),  # lets a later skip notice a lost chunk
            "timings_s": {**timings, **{f"tiles_{k}": v for k, v in stats.timer.seconds.items()},
                          "total": time.perf_counter() - t0},
            "outputs": {k: str(v) for k, v in paths.items()},
            "written_by": {"host": socket.gethostname(), "pid": os.getpid(), "claim": claim.token},
            "versions": versions(),
        }
        claim.verify()
        write_json_atomic(paths["run_json"], record)
    except BaseException:  # e.g. the disk filled up at the very last write
        _unpublish(paths, claim)
        raise
    # After run.json: drawing takes seconds on a big slide, and before it the final-named
    # table would sit there without run.json all that time. A run killed here leaves a
    # done slide without the picture; the batch summary draws the missing ones.
    _nuclei_overlay(reader, paths, log)
    return record


def _unpublish(paths: dict[str, Path], claim: Claim) -> None:
    """After a failure: remove what this run renamed to final names already (a writer that
    closed before another failed, a run.json whose folder sync failed), so a failed slide
    leaves nothing a batch read picks up. clean_partial removed older outputs of the slide
    before this run began; while we hold the claim these are this run's."""
    if claim.owned():
        paths["run_json"].unlink(missing_ok=True)
        paths["parquet"].unlink(missing_ok=True)
        shutil.rmtree(paths["zarr"], ignore_errors=True)


def _nuclei_overlay(reader: SlideReader, paths: dict[str, Path], log) -> Path | None:
    """The morning-after PNG; a failure here is a warning, not a failed slide."""
    try:
        return nuclei_overlay(reader, paths["parquet"], paths["run_json"].parent / OVERLAY_NAME)
    except Exception as e:  # noqa: BLE001 - the outputs are complete; only the picture is missing
        log(f"{paths['run_json'].parent.name}: nuclei overlay not written: {e}")
        return None


def versions() -> dict:
    from importlib.metadata import version

    import torch
    import zarr

    return {"nucleiflow": version("nucleiflow"), "python": platform.python_version(), "torch": torch.__version__,
            "zarr": zarr.__version__, "numpy": np.__version__}
