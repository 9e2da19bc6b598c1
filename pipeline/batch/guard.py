"""Checks on a slide's existing outputs before a run trusts (skips) or replaces them.

* `check_same_slide`: an output id already holding *another* slide (another file with the
  same stem, or the same file re-scanned) is refused unless the user asked to overwrite:
  a batch never deletes a finished slide's results by accident. A slide that failed
  mid-run has no run.json, so it is redone as before.
* `damage`: a done slide is only skipped when its files still match its run.json (the
  table's footer and row count, every mask file present); a cheap look, no pixel read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from nucleiflow.pipeline.slide.reader import SlideError


class OutputConflict(SlideError):
    """The slide's output id already holds another slide's finished results."""


def read_record(run_json: Path) -> dict | None:
    """The run.json record, None when there is none or it is unreadable."""
    try:
        rec = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def check_same_slide(rec: dict | None, fingerprint: str, path: str, folder: Path, overwrite: bool) -> None:
    """Raise OutputConflict when ``folder`` (a slide's output folder, with run.json record
    ``rec``) holds the results of a slide with another fingerprint and ``overwrite`` is off."""
    if rec is None or overwrite or rec.get("slide_fingerprint") in (None, fingerprint):
        return
    what = "the same file, changed since" if rec.get("path") == str(path) else f"another slide, {rec.get('path')}"
    raise OutputConflict(
        f"{path}: {folder} already holds the results of {what} (fingerprint "
        f"{str(rec.get('slide_fingerprint'))[:12]}); give this slide its own slide_id in a manifest, "
        "use another --out, or pass --overwrite to replace them")


def count_files(folder: Path) -> int:
    """Files under ``folder`` (0 when it does not exist): the zarr chunk count run.json records."""
    return sum(len(files) for _, _, files in os.walk(folder))


def damage(rec: dict, paths: dict[str, Path]) -> str | None:
    """Why the outputs of done record ``rec`` no longer match it, or None when they do."""
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(paths["parquet"]).metadata.num_rows  # the footer only
    except FileNotFoundError:
        return f"{paths['parquet']} is missing"
    except Exception as e:  # noqa: BLE001 - any unreadable footer (ArrowInvalid, OSError) is damage
        return f"{paths['parquet']} is unreadable ({type(e).__name__})"
    if rows != rec.get("nuclei"):
        return f"{paths['parquet']} holds {rows} rows, run.json says {rec.get('nuclei')}"
    zarr = paths["zarr"]
    if not (zarr / ".zgroup").is_file() or not (zarr / "labels" / "nuclei" / "0" / ".zarray").is_file():
        return f"{zarr} is missing or has no labels"
    expected = rec.get("zarr_files")
    if expected is not None and (found := count_files(zarr)) != expected:
        return f"{zarr} holds {found} files, run.json says {expected}"
    return None
