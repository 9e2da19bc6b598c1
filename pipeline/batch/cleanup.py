"""Leftovers of killed or failed runs of a slide, and who may remove them.

A run killed at any moment leaves only temp names (`outputs.atomic.TEMP_PATTERN`), claims
broken half-way (``.claim.stale-<random>``), or final-named outputs without run.json. Only
the holder of the slide's claim (`claims`) removes anything: another live worker's temp
files are its work in progress.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from nucleiflow.pipeline.batch.claims import Claim, ClaimLost, SlideBusy, acquire
from nucleiflow.pipeline.batch.tile_parts import parts_folder, remove_parts
from nucleiflow.pipeline.outputs.overlays import OVERLAY_NAME
from nucleiflow.pipeline.outputs.atomic import TEMP_PATTERN
from nucleiflow.pipeline.outputs.layout import slide_paths

TEMP_PATTERNS = (TEMP_PATTERN, ".claim.stale-*")


def clean_partial(out: Path, slide_id: str, claim: Claim) -> None:
    """Remove a previous run's leftovers of this slide: run.json first, then temp files of
    any process (killed runs), then stale final outputs. Raises ClaimLost unless ``claim``
    still holds the slide. Its finished tiles (`tile_parts`) stay: the run takes them over
    if they match its key."""
    claim.verify()
    paths = slide_paths(out, slide_id)
    paths["run_json"].unlink(missing_ok=True)
    remove_temps(out, slide_id)
    paths["parquet"].unlink(missing_ok=True)
    shutil.rmtree(paths["zarr"], ignore_errors=True)
    (paths["run_json"].parent / OVERLAY_NAME).unlink(missing_ok=True)


def remove_temps(out: Path, slide_id: str) -> None:
    """Delete every temp file / folder and broken claim of the slide (claim holder only)."""
    paths = slide_paths(out, slide_id)
    for folder in (paths["parquet"].parent, paths["zarr"].parent):
        if folder.is_dir():
            for pattern in TEMP_PATTERNS:
                for p in folder.glob(pattern):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def tidy_done(out: Path, slide_id: str, log: Callable[[str], None] | None = None) -> None:
    """Remove what a run killed after its run.json left beside a done slide (a dead
    worker's claim, a half-drawn overlay, its tile parts); left alone while another worker
    holds it."""
    folder = slide_paths(out, slide_id)["run_json"].parent
    if not any(folder.glob(".*")):
        return
    try:
        with acquire(folder) as claim:
            claim.verify()
            remove_temps(out, slide_id)
            remove_parts(parts_folder(out, slide_id))
    except (SlideBusy, ClaimLost):
        pass  # another live worker holds the folder: its files are its business
    except OSError as e:  # the slide is done; leftovers are untidy, not wrong: say so, go on
        if log is not None:
            log(f"{slide_id}: leftovers of an earlier run not removed: {e}")


def unpublish(paths: dict[str, Path], claim: Claim) -> None:
    """After a failure: remove what this run renamed to final names already (a writer that
    closed before another failed, a run.json whose folder sync failed), so a failed slide
    leaves nothing a batch read picks up. clean_partial removed older outputs of the slide
    before this run began; while we hold the claim these are this run's."""
    if claim.owned():
        paths["run_json"].unlink(missing_ok=True)
        paths["parquet"].unlink(missing_ok=True)
        shutil.rmtree(paths["zarr"], ignore_errors=True)
