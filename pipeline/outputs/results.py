"""A finished slide's results opened for reading: run.json, the slide it came from, and the
mask pyramids of ``masks.ome.zarr`` as lazy dask arrays with their um/px.

What `nucleiflow view` shows, without any viewer: every raster here is lazy (nothing is
read until a region is computed) and carries its level-0 um/px, so a viewer places the
H&E, the labels and the probability in one physical (micrometre) frame.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import zarr

from nucleiflow.pipeline.outputs.layout import slide_paths
from nucleiflow.pipeline.slide.pyramid import pyramid_mpps, slide_pyramid
from nucleiflow.pipeline.slide.reader import SlideError, SlideReader, open_slide


class ResultsError(SlideError):
    """The results cannot be opened. One line: the path, the reason, what to do."""


@dataclass(frozen=True)
class Pyramid:
    """Levels finest first, (H_k, W_k[, 3]); ``mpp`` = level-0 um/px (square pixels);
    level k's um/px is ``mpp`` times level 0's shape over level k's."""

    levels: list[da.Array]
    mpp: float

    def level_mpp(self, k: int) -> float:
        return self.mpp * self.levels[0].shape[1] / self.levels[k].shape[1]


@dataclass
class SlideResults:
    """One slide's results. ``reader`` stays open for ``he`` (close it when done)."""

    slide_dir: Path
    record: dict
    reader: SlideReader
    he: Pyramid               # (H, W, 3) uint8 RGB, the slide's own levels
    nuclei: Pyramid           # int32 label = nucleus_id of the table row
    probability: Pyramid      # uint8, 0-255 = nuclear probability 0-1
    tissue: Pyramid | None    # uint8, 1 = tissue
    label_colors: dict[str, dict[int, tuple[int, ...]]]  # NGFF image-label colours (RGBA 0-255)

    @property
    def parquet(self) -> Path:
        return slide_paths(self.slide_dir.parent, self.slide_dir.name)["parquet"]

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> SlideResults:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_run(slide_dir: Path) -> dict:
    """run.json of a done slide, or ResultsError naming what is wrong with ``slide_dir``."""
    run_json = slide_dir / "run.json"
    if not run_json.is_file():
        inside = sorted(p.parent.name for p in slide_dir.glob("*/run.json")) if slide_dir.is_dir() else []
        if inside:  # the batch folder itself
            raise ResultsError(f"{slide_dir}: a batch folder; pass one of its slides, e.g. "
                               f"{slide_dir / inside[0]} ({len(inside)} in all)")
        what = "no such folder" if not slide_dir.exists() else "no run.json"
        raise ResultsError(f"{slide_dir}: {what}; pass a finished slide's folder <out>/<slide_id> "
                           "of `nucleiflow segment`")
    try:
        rec = json.loads(run_json.read_text())
    except (OSError, ValueError) as e:
        raise ResultsError(f"{run_json}: unreadable ({e}); segment the slide again") from None
    if not isinstance(rec, dict) or rec.get("status") != "done" or "slide" not in rec:
        raise ResultsError(f"{run_json}: not a finished run (status {rec.get('status') if isinstance(rec, dict) else None!r}); "
                           "segment the slide again")
    return rec


def slide_candidates(recorded: str, slide_dir: Path) -> list[Path]:
    """Where the slide of run.json's ``path`` may be: as written (absolute, or relative to
    this process's folder), then relative to the batch folder's parent (the folder
    `segment` usually ran in, `out/..`)."""
    p = Path(recorded)
    if p.is_absolute():
        return [p]
    return list(dict.fromkeys([Path.cwd() / p, slide_dir.resolve().parent.parent / p]))


def open_source_slide(rec: dict, slide_dir: Path, slide: str | os.PathLike | None = None) -> SlideReader:
    """The slide the results came from, checked by fingerprint; ``slide`` overrides the
    run.json path (a moved slide). The mpp the run used is kept (an ``--mpp`` override too)."""
    facts = rec["slide"]
    mpp = facts["mpp_x"] if facts.get("mpp_source") == "override" else None
    if slide is None:
        found = [p for p in slide_candidates(rec["path"], slide_dir) if p.is_file()]
        if not found:
            raise ResultsError(f"{rec['path']}: the slide of {slide_dir} is not there (moved or renamed?); "
                               "pass its new path with --slide PATH")
        slide = found[0]
    try:
        reader = open_slide(slide, mpp=mpp)
    except SlideError:
        if mpp is not None:
            raise
        # No (or implausible) mpp tags: not the slide the run read them from, unless its
        # fingerprint says so; open it at the run's mpp so the check below can say which.
        reader = open_slide(slide, mpp=facts["mpp_x"])
    if reader.info.fingerprint != rec.get("slide_fingerprint"):
        reader.close()
        raise ResultsError(f"{slide}: not the slide segmented into {slide_dir} (fingerprint "
                           f"{reader.info.fingerprint[:12]}, run.json has {str(rec.get('slide_fingerprint'))[:12]}); "
                           "pass the right file with --slide PATH")
    return reader


def mask_pyramid(group: zarr.Group, where: Path) -> Pyramid:
    """An NGFF 0.4 multiscale group's levels (dask, the store's chunks) and level-0 um/px."""
    try:
        ms = group.attrs["multiscales"][0]
        paths = [d["path"] for d in ms["datasets"]]
        scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
        levels = [da.from_zarr(group[p]) for p in paths]
    except (KeyError, IndexError, TypeError) as e:
        raise ResultsError(f"{where}: not an NGFF multiscale image ({type(e).__name__}: {e}); "
                           "segment the slide again") from None
    if abs(scale[-1] - scale[-2]) > 1e-9 * scale[-1]:
        raise ResultsError(f"{where}: non-square pixels {scale} um; not written by nucleiflow")
    return Pyramid(levels, float(scale[-1]))


def _colors(group: zarr.Group) -> dict[int, tuple[int, ...]]:
    entries = (group.attrs.get("image-label") or {}).get("colors") or []
    return {int(c["label-value"]): tuple(int(v) for v in c["rgba"]) for c in entries}


def open_results(slide_dir: str | os.PathLike, slide: str | os.PathLike | None = None) -> SlideResults:
    """Open ``<out>/<slide_id>``: run.json, the slide (``slide`` overrides its path), masks.

    Raises ResultsError (or SlideError for an unreadable slide) with one line to show.
    """
    slide_dir = Path(slide_dir)
    rec = read_run(slide_dir)
    store = slide_dir / "masks.ome.zarr"
    try:
        root = zarr.open_group(str(store), mode="r")
        labels = root["labels"]
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise ResultsError(f"{store}: missing or not a zarr group ({type(e).__name__}); "
                           "segment the slide again") from None
    names = labels.attrs.get("labels", [])
    if "nuclei" not in names:
        raise ResultsError(f"{store}/labels: no nuclei labels; segment the slide again")
    probability = mask_pyramid(root, store)
    nuclei = mask_pyramid(labels["nuclei"], store / "labels" / "nuclei")
    tissue = mask_pyramid(labels["tissue"], store / "labels" / "tissue") if "tissue" in names else None
    colors = {n: _colors(labels[n]) for n in names}
    reader = open_source_slide(rec, slide_dir, slide)
    he = Pyramid(slide_pyramid(reader), pyramid_mpps(reader)[0])
    return SlideResults(slide_dir, rec, reader, he, nuclei, probability, tissue, colors)
