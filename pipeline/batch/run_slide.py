"""One slide from file to finished outputs: skip if done, claim, tissue, plan, stream, write, run.json.

A slide is *done* iff ``<out>/<slide_id>/run.json`` exists with status "done" and the same
key (slide fingerprint, model hash, config key). run.json is written last, atomically;
before a slide is (re)done its old run.json goes first, so a slide never looks finished
while it is not. Outputs stream into hidden temp names and are renamed on close: the masks
first, then the nuclei table, then run.json, so a run killed at any moment leaves at most
a final-named table without run.json for the few ms between the last two renames, and
the next run removes it (`cleanup.clean_partial`).

Only the worker holding the slide's claim (`claims`) touches its outputs: two batches on
one output folder each find the other's slide "busy" and never write the same slide.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nucleiflow.pipeline.batch.claims import Claim, SlideBusy, acquire
from nucleiflow.pipeline.batch.cleanup import clean_partial, tidy_done, unpublish
from nucleiflow.pipeline.batch.guard import check_same_slide, count_files, damage, read_record
from nucleiflow.pipeline.batch.manifest import SlideJob
from nucleiflow.pipeline.batch.tile_parts import TileParts, parts_folder, parts_key, remove_parts
from nucleiflow.pipeline.outputs.overlays import OVERLAY_NAME, nuclei_overlay
from nucleiflow.pipeline.config import SegmentConfig
from nucleiflow.pipeline.infer.pools import TilePools, pool_sizes, usable_cores
from nucleiflow.pipeline.infer.predictor import Predictor
from nucleiflow.pipeline.infer.segment_reader import SegmentStats, segment_reader
from nucleiflow.pipeline.infer.workers import empty_tile_table
from nucleiflow.pipeline.outputs.atomic import write_json_atomic
from nucleiflow.pipeline.postprocess.plausible import REASONS
from nucleiflow.pipeline.outputs.layout import SlideOutputs, slide_paths
from nucleiflow.pipeline.slide.reader import SlideReader, open_slide
from nucleiflow.pipeline.outputs.overlays import overlay_png
from nucleiflow.pipeline.slide.tissue import TissueMask, detect_tissue
from nucleiflow.pipeline.tiles.plan import TilePlan, plan_slide


def run_key(fingerprint: str, model_hash: str, config_key: str) -> dict:
    return {"slide_fingerprint": fingerprint, "model_hash": model_hash, "config_key": config_key}


def is_done(run_json: Path, key: dict) -> bool:
    """Does ``run_json`` record a finished run with this key?"""
    try:
        rec = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return False
    return rec.get("status") == "done" and all(rec.get(k) == v for k, v in key.items())


def segment_slide(
    job: SlideJob,
    out: str | Path,
    cfg: SegmentConfig,
    predictor: Predictor,
    model_hash: str,
    *,
    log=print,
    progress: Callable[[int, int], None] | None = None,
    claim_ttl_s: float | None = None,
    pools: TilePools | None = None,
) -> dict:
    """Segment ``job`` into ``out``; returns the run record (also written as run.json).

    Status "skipped" (done before with this key), "busy" (another live worker holds the
    slide's claim; ``reason`` says who) or "done". Raises SlideError (bad slide) or OSError
    (output) after removing partial outputs. ``progress(done, total)`` is called with the
    tile count once planned and after every tile; without it every 10th tile is logged.
    ``pools``: the batch's reader / post-processing processes; without them the slide
    starts and stops its own (``cfg.readers`` / ``cfg.workers``).
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
            tidy_done(out, job.slide_id, log)
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
            with _own_pools(cfg, predictor) if pools is None else nullcontext(pools) as slide_pools:
                record = _segment_claimed(_Slide(job, out, cfg, predictor, model_hash, reader, key, claim, log, t0,
                                                progress, slide_pools))
            return {**record, "reason": "redone: its outputs were damaged"} if damaged else record


def _intact_done(paths: dict[str, Path], key: dict, log) -> bool:
    """Done with ``key`` and its files still match run.json; logs why a done slide is redone."""
    if not is_done(paths["run_json"], key):
        return False
    why = damage(read_record(paths["run_json"]) or {}, paths)
    if why is not None and log is not None:
        log(f"{paths['run_json'].parent.name}: done before, but its outputs are damaged ({why}); redoing it")
    return why is None


@dataclass
class _Slide:
    """One claimed slide being segmented: what every step below needs."""

    job: SlideJob
    out: Path
    cfg: SegmentConfig
    predictor: Predictor
    model_hash: str
    reader: SlideReader
    key: dict
    claim: Claim
    log: object
    t0: float
    progress: Callable[[int, int], None] | None = None
    pools: TilePools | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def paths(self) -> dict[str, Path]:
        return slide_paths(self.out, self.job.slide_id)


def _segment_claimed(s: _Slide) -> dict:
    clean_partial(s.out, s.job.slide_id, s.claim)
    t = time.perf_counter()
    tissue = detect_tissue(s.reader, mpp=s.cfg.tissue_mpp)
    plan = plan_slide(s.reader.info, tissue, s.predictor.card.mpp, tile_size=s.cfg.tile_size, halo=s.cfg.halo)
    s.timings["tissue"] = time.perf_counter() - t
    info = s.reader.info
    s.log(f"{s.job.slide_id}: {info.width}x{info.height} px at {info.mpp_x:.3f} um/px, "
          f"tissue {tissue.fraction:.1%}, {len(plan)} tiles of {s.cfg.tile_size} px at {plan.mpp} um/px")
    stats = _stream_and_publish(s, tissue, plan)
    if stats.halo_edge_nuclei:
        warnings.warn(f"{s.job.slide_id}: {stats.halo_edge_nuclei} nuclei touch the halo edge; "
                      f"the halo ({s.cfg.halo} px) may be too small for them", stacklevel=4)
    try:
        record = _record(s, tissue, plan, stats)
        s.claim.verify()
        write_json_atomic(s.paths["run_json"], record)
    except BaseException:  # e.g. the disk filled up at the very last write
        unpublish(s.paths, s.claim)
        raise
    remove_parts(parts_folder(s.out, s.job.slide_id))  # done: a kill before this, tidy_done removes them
    # After run.json: drawing takes seconds on a big slide, and before it the final-named
    # table would sit there without run.json all that time. A run killed here leaves a
    # done slide without the picture; the batch summary draws the missing ones.
    _nuclei_overlay(s.reader, s.paths, s.log)
    return record


def _stream_and_publish(s: _Slide, tissue: TissueMask, plan: TilePlan) -> SegmentStats:
    """Every tile through the model into the slide's outputs, then publish them (masks,
    then table); on any failure nothing is left under a final name."""
    info, card = s.reader.info, s.predictor.card
    meta = {"model": s.cfg.model, "model_hash": s.model_hash, "config_hash": s.cfg.key(),
            "slide_fingerprint": info.fingerprint, "source": str(s.job.path)}
    # Tiles a killed run of this slide, model and config finished are taken over, not rerun.
    key = parts_key(s.key, plan, batch_size=s.cfg.batch_size, device=s.predictor.device.type)
    parts = TileParts.open(parts_folder(s.out, s.job.slide_id), key, len(plan))
    if parts.done:
        s.log(f"{s.job.slide_id}: taking over {len(parts.done)}/{len(plan)} tiles of an interrupted run")
    outputs = SlideOutputs(
        s.out, s.job.slide_id, shape=(plan.height, plan.width), mpp=plan.mpp, scale=plan.scale,
        chunk=s.cfg.tile_size, metadata=meta, tissue=tissue.mask, tissue_mpp=tissue.mpp,
    )

    def every_10th(n: int, total: int) -> None:
        if n and n % 10 == 0:
            s.log(f"{s.job.slide_id}: {n}/{total} tiles")

    progress = s.progress or every_10th
    done = 0
    progress(0, len(plan))

    def on_tile(tn, offset: int) -> None:
        nonlocal done
        done += 1
        progress(done, len(plan))

    try:
        t = time.perf_counter()
        stats = segment_reader(s.reader, plan, s.predictor, outputs, batch_size=s.cfg.batch_size,
                               pools=s.pools, on_tile=on_tile, parts=parts)
        s.timings["stream"] = time.perf_counter() - t
        if stats.tiles == 0:
            # No tile wrote a table: give the file the columns every other slide's has.
            # pyarrow, geopandas and DuckDB take a batch's schema from its first file and
            # silently drop columns missing there (touches_halo_edge, class_*).
            outputs.write_table(empty_tile_table(classes=card.has_classes))
        overlay_png(s.reader, tissue, plan, s.paths["run_json"].parent / "overlay.png")
        t = time.perf_counter()
        s.claim.verify()  # never publish over a slide another worker now owns
        outputs.close({"nuclei": stats.nuclei})  # masks first, the table last (see SlideOutputs)
        s.timings["write_close"] = time.perf_counter() - t
    except BaseException:
        outputs.abort()
        unpublish(s.paths, s.claim)
        raise
    return stats


def _record(s: _Slide, tissue: TissueMask, plan: TilePlan, stats: SegmentStats) -> dict:
    """The run record written as run.json."""
    tissue_mm2 = float(tissue.mask.sum()) * (tissue.mpp / 1000) ** 2
    return {
        "slide_id": s.job.slide_id, "status": "done", **s.key, "path": str(s.job.path),
        "model": s.cfg.model, "config": s.cfg.model_dump(), "model_mpp": plan.mpp,
        "slide": s.reader.info.to_dict(), "tissue_fraction": tissue.fraction, "tissue_mm2": tissue_mm2,
        "tiles": stats.tiles, "tiles_resumed": stats.resumed, "nuclei": stats.nuclei,
        "halo_edge_nuclei": stats.halo_edge_nuclei,
        # Objects that were not nuclei (off tissue, too large, ink or black): `postprocess.plausible`.
        "dropped": {k: stats.dropped.get(k, 0) for k in REASONS},
        **({"reason": f"warning: {tissue.warning}"} if tissue.warning else {}),  # shown in the table
        "pools": _pools_record(s),
        "zarr_files": count_files(s.paths["zarr"]),  # lets a later skip notice a lost chunk
        "timings_s": {**s.timings, **{f"tiles_{k}": v for k, v in stats.timer.seconds.items()},
                      "total": time.perf_counter() - s.t0},
        "outputs": {k: str(v) for k, v in s.paths.items()},
        "written_by": {"host": socket.gethostname(), "pid": os.getpid(), "claim": s.claim.token},
        "versions": versions(),
    }


def _own_pools(cfg: SegmentConfig, predictor: Predictor) -> TilePools:
    """Pools for one slide alone, ``auto`` sizes resolved on this process's cores."""
    return TilePools(pool_sizes(usable_cores(), getattr(predictor, "cuda", False), cfg.readers, cfg.workers))


def _pools_record(s: _Slide) -> dict:
    """run.json's ``pools``: the processes used (sizes; ``asked``: as configured, ``auto``
    or a number), their pids, torch's threads in effect, and how many pool starts (and
    seconds in them) this process's batch has had so far."""
    import torch

    pools = s.pools
    return {**pools.sizes.to_dict(), "asked": {"readers": s.cfg.readers, "workers": s.cfg.workers},
            "torch_threads": pools.sizes.torch_threads if getattr(s.predictor, "cuda", False) else torch.get_num_threads(),
            "pids": pools.pids(), "starts": pools.starts, "start_s": round(pools.start_s, 3)}


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
