"""Which slides a batch holds: paths, globs, folders or CSV manifests -> `SlideJob`s."""
from __future__ import annotations

import csv
import glob
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from nucleiflow.pipeline.slide.reader import SlideError, check_mpp

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}


@dataclass(frozen=True)
class SlideJob:
    """One slide of a batch: its path, an optional mpp override, its output id."""

    path: str
    slide_id: str
    mpp: float | None = None


MAX_ID = 128  # hive folder "slide_id=<id>" and temp names must stay under the 255-byte name limit
# Names the batch folder uses itself: a slide there would write into the hive root or a report.
RESERVED_IDS = {"nuclei", "summary.csv", "summary.png"}
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def slide_id_for(path: str | Path) -> str:
    """A folder- and hive-safe id from the file name: 'CMU-1 (copy).svs' -> 'CMU-1_copy_',
    'Ünï.svs' -> 'Uni'. ValueError when the name loses most of itself (non-Latin scripts):
    such ids would be meaningless and collide."""
    stem = Path(path).name
    for suffix in sorted(SLIDE_SUFFIXES, key=len, reverse=True):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    folded = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()  # accents off
    sid = re.sub(r"[^A-Za-z0-9._-]+", "_", folded).lstrip("._-")
    kept = sum(c.isalnum() for c in sid)
    if kept == 0 or kept * 2 < sum(c.isalnum() for c in stem):
        raise ValueError(f"{path}: the file name gives no usable output id (only {sid!r} is left of {stem!r}); "
                         "name the slide in a manifest's slide_id column (A-Z, a-z, 0-9, '.', '_', '-')")
    return sid


def check_id(sid: str, source: str) -> str:
    """``sid`` if it can name the slide's folder and hive partition in a batch, else ValueError."""
    if not ID_RE.fullmatch(sid):
        raise ValueError(f"{source}: slide id {sid!r} must start with a letter or digit and hold only "
                         "A-Z, a-z, 0-9, '.', '_', '-' (no '=', '/', spaces); rename it in the manifest")
    if len(sid) > MAX_ID:
        raise ValueError(f"{source}: slide id {sid[:24]!r}... is {len(sid)} characters, more than {MAX_ID}; "
                         "give a shorter slide_id in a manifest")
    if sid.lower() in RESERVED_IDS:
        raise ValueError(f"{source}: slide id {sid!r} is reserved for the batch's own outputs "
                         f"({', '.join(sorted(RESERVED_IDS))}); give another slide_id in a manifest")
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
        if mpp is not None:
            try:
                check_mpp(mpp, f"{path}:{i}")
            except SlideError as e:
                raise ValueError(str(e)) from None
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
    if mpp is not None:
        try:
            check_mpp(mpp, "--mpp")
        except SlideError as e:
            raise ValueError(str(e)) from None
    jobs: list[SlideJob] = []
    for item in items:
        p = Path(item)
        if p.suffix.lower() == ".csv" and p.is_file():
            jobs += [j if j.mpp is not None else SlideJob(j.path, j.slide_id, mpp) for j in read_manifest(p)]
        elif p.is_dir() and not any(p.name.lower().endswith(s) for s in (".mrxs",)):
            # Not dotfiles: macOS leaves '._name.tif' resource forks beside copied slides.
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in SLIDE_SUFFIXES and not q.name.startswith("."))
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
        check_id(j.slide_id, j.path)
        key = j.slide_id.casefold()  # 'A' and 'a' share a folder on macOS and Windows disks
        if key in seen and seen[key].path != j.path:
            raise ValueError(f"two slides map to the output id {j.slide_id!r}: {seen[key].path} and {j.path}; "
                             "give one a slide_id in a manifest")
        seen.setdefault(key, j)
    return list(seen.values())
