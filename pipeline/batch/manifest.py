"""Which slides a batch holds: paths, globs, folders or CSV manifests -> `SlideJob`s."""
from __future__ import annotations

import csv
import glob
import re
from dataclasses import dataclass
from pathlib import Path

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}


@dataclass(frozen=True)
class SlideJob:
    """One slide of a batch: its path, an optional mpp override, its output id."""

    path: str
    slide_id: str
    mpp: float | None = None


def slide_id_for(path: str | Path) -> str:
    """A folder- and hive-safe id from the file name: 'CMU-1 (copy).svs' -> 'CMU-1_copy_'."""
    stem = Path(path).name
    for suffix in sorted(SLIDE_SUFFIXES, key=len, reverse=True):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    sid = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip("._") or "slide"
    return sid


def read_manifest(path: Path) -> list[SlideJob]:
    """CSV with a ``path`` column (relative paths are relative to the CSV), optional ``mpp``
    and ``slide_id`` columns. Header names are case- and space-insensitive, a spreadsheet's
    byte-order mark is ignored, blank lines are skipped."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        rows = [(i, dict(zip(header, (c.strip() for c in r)))) for i, r in enumerate(reader, start=2)
                if any(c.strip() for c in r)]
    if "path" not in header:
        raise ValueError(f"{path}: a manifest needs a header with a 'path' column (optional: mpp, slide_id)")
    jobs = []
    for i, r in rows:
        if not r.get("path"):
            raise ValueError(f"{path}:{i}: empty path")
        p = Path(r["path"])
        p = p if p.is_absolute() else path.parent / p
        mpp_text = r.get("mpp") or ""
        try:
            mpp = float(mpp_text) if mpp_text else None
        except ValueError:
            raise ValueError(f"{path}:{i}: mpp {mpp_text!r} is not a number") from None
        if mpp is not None and not mpp > 0:
            raise ValueError(f"{path}:{i}: mpp must be positive, got {mpp_text}")
        jobs.append(SlideJob(str(p), r.get("slide_id") or slide_id_for(p), mpp))
    return jobs


def expand_slides(items: list[str] | str, mpp: float | None = None) -> list[SlideJob]:
    """Paths, globs, folders (their slide files) and .csv manifests -> jobs, in order, unique.

    A path that does not exist is kept as a job (it fails on its own, with a clear reason,
    without stopping the batch); a glob that matches nothing raises ValueError.
    ``mpp`` applies to every slide without a manifest mpp.
    """
    if isinstance(items, str):
        items = [items]
    jobs: list[SlideJob] = []
    for item in items:
        p = Path(item)
        if p.suffix.lower() == ".csv" and p.is_file():
            jobs += [j if j.mpp is not None else SlideJob(j.path, j.slide_id, mpp) for j in read_manifest(p)]
        elif p.is_dir() and not any(p.name.lower().endswith(s) for s in (".mrxs",)):
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in SLIDE_SUFFIXES)
            jobs += [SlideJob(str(q), slide_id_for(q), mpp) for q in found]
        elif glob.has_magic(item):
            found = sorted(glob.glob(item))
            if not found:
                raise ValueError(f"{item}: the pattern matches no file")
            jobs += [SlideJob(q, slide_id_for(q), mpp) for q in found]
        else:
            jobs.append(SlideJob(item, slide_id_for(item), mpp))
    seen: dict[str, SlideJob] = {}
    for j in jobs:
        if j.slide_id in seen and seen[j.slide_id].path != j.path:
            raise ValueError(f"two slides map to the output id {j.slide_id!r}: {seen[j.slide_id].path} and {j.path}; "
                             "give one a slide_id in a manifest")
        seen.setdefault(j.slide_id, j)
    return list(seen.values())
