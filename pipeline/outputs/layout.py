"""Where a slide's nuclei go: one small interface, an in-memory writer, the file writers.

Like MONAI's merger: the flow pushes each tile's owned output through ``write_tile`` in
any order, then ``close(meta)`` finalises (or ``abort()`` drops everything). Tests use
``MemoryWriter``; production fans out to ``GeoParquetWriter`` (the nuclei table) and
``OmeZarrWriter`` (the rasters), both of which only show a final file name once complete.

Output paths of a batch in ``<out>``::

    nuclei/slide_id=<id>/part-0.parquet    GeoParquet (hive partition: one load per batch)
    <id>/masks.ome.zarr                    OME-Zarr masks
    <id>/run.json                          written last by the flow (``write_json_atomic``)
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from nucleiflow.pipeline.outputs.geoparquet import GeoParquetWriter, table_columns
from nucleiflow.pipeline.outputs.omezarr import OmeZarrWriter, prob_to_uint8
from nucleiflow.pipeline.postprocess.morphometry import empty_table

__all__ = [
    "FanOutWriter",
    "GeoParquetWriter",
    "MemoryWriter",
    "NucleiWriter",
    "OmeZarrWriter",
    "open_slide_writers",
    "slide_paths",
    "write_json_atomic",
]


class NucleiWriter(Protocol):
    """Receives each tile's owned output once; ``close`` or ``abort`` ends it."""

    def write_tile(self, tile_core: Any, labels_core: np.ndarray, prob_core: np.ndarray, table: Any) -> None:
        """tile_core: ``tiling.Box`` (model px, chunk-aligned); labels_core: (h, w) int32
        nucleus ids; prob_core: (h, w) uint8 NP probability; table: the owned nuclei rows."""

    def close(self, meta: Mapping[str, Any] | None = None) -> Any:
        """Finalise; ``meta`` (JSON-able) is stored with the output."""

    def abort(self) -> None:
        """Drop the partial output; leave no file under a final name."""


class MemoryWriter:
    """Keeps a slide's rasters in numpy and its rows in pandas (for tests and small slides).

    After ``close``: ``labels`` (H, W) int32, ``prob`` (H, W) uint8, ``table`` DataFrame
    (geometry as shapely objects), ``meta``. Raises like the file writers on duplicate ids.
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self.labels = np.zeros(shape, dtype=np.int32)
        self.prob = np.zeros(shape, dtype=np.uint8)
        self.tiles: list[Any] = []
        self._tables: list[dict[str, np.ndarray]] = []
        self.table: pd.DataFrame | None = None
        self.meta: dict[str, Any] | None = None
        self.closed = self.aborted = False

    def write_tile(self, tile_core: Any, labels_core: np.ndarray | None, prob_core: np.ndarray | None, table: Any) -> None:
        x0, y0, x1, y1 = (tile_core.x0, tile_core.y0, tile_core.x1, tile_core.y1) if hasattr(tile_core, "x0") else tile_core
        if labels_core is not None:
            self.labels[y0:y1, x0:x1] = labels_core
        if prob_core is not None:
            self.prob[y0:y1, x0:x1] = prob_to_uint8(prob_core)
        self._tables.append(table_columns(table))
        self.tiles.append(tile_core)

    def close(self, meta: Mapping[str, Any] | None = None) -> pd.DataFrame:
        tables = self._tables or [empty_table()]
        self.table = pd.concat([pd.DataFrame(t) for t in tables], ignore_index=True)
        if self.table["nucleus_id"].duplicated().any():
            raise ValueError("nucleus_id is not unique in the slide")
        self.meta, self.closed = dict(meta or {}), True
        return self.table

    def abort(self) -> None:
        self.aborted = True
        self._tables, self.table = [], None


class FanOutWriter:
    """Sends every call to several writers; if any fails, all are aborted."""

    def __init__(self, writers: Sequence[NucleiWriter]) -> None:
        self.writers = list(writers)

    def write_tile(self, tile_core: Any, labels_core: np.ndarray, prob_core: np.ndarray, table: Any) -> None:
        try:
            for w in self.writers:
                w.write_tile(tile_core, labels_core, prob_core, table)
        except BaseException:
            self.abort()
            raise

    def close(self, meta: Mapping[str, Any] | None = None) -> list[Any]:
        # Each writer renames its own output on close; if a later one fails, the earlier
        # outputs exist but run.json (written after) does not, so the slide is not "done".
        try:
            return [w.close(meta) for w in self.writers]
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for w in self.writers:
            w.abort()


def check_slide_id(slide_id: str) -> str:
    """A slide id usable as a folder name and a hive partition value, else ValueError."""
    bad = not slide_id or slide_id.startswith((".", "_")) or any(c in slide_id for c in "/\\=%:*?\"<>|\n")
    if bad:
        raise ValueError(f"slide id {slide_id!r} cannot name a folder / hive partition")
    return slide_id


def slide_paths(out: str | os.PathLike, slide_id: str) -> dict[str, Path]:
    """Final output paths of one slide: ``parquet``, ``zarr``, ``run_json``."""
    out = Path(out)
    sid = check_slide_id(slide_id)
    return {
        "parquet": out / "nuclei" / f"slide_id={sid}" / "part-0.parquet",
        "zarr": out / sid / "masks.ome.zarr",
        "run_json": out / sid / "run.json",
    }


def open_slide_writers(
    out: str | os.PathLike,
    slide_id: str,
    *,
    shape: tuple[int, int],
    mpp: float,
    scale: float,
    chunk: int,
    metadata: Mapping[str, Any] | None = None,
    tissue: np.ndarray | None = None,
    tissue_mpp: float | None = None,
    row_group_rows: int | None = None,
) -> FanOutWriter:
    """GeoParquet + OME-Zarr writers of one slide at the contract's paths.

    shape: (H, W) model px; mpp: model um/px; scale: level-0 px per model px; chunk: the
    tile core size. ``metadata`` (model, model_hash, config_hash, ...) goes into both files.
    """
    paths = slide_paths(out, slide_id)
    meta = {**(metadata or {}), "slide_id": slide_id, "mpp": mpp, "scale": scale}
    extent = (shape[1] * scale, shape[0] * scale)
    kw = {} if row_group_rows is None else {"row_group_rows": row_group_rows}
    table = GeoParquetWriter(paths["parquet"], meta, extent=extent, **kw)
    masks = OmeZarrWriter(paths["zarr"], shape, mpp=mpp, chunk=chunk, tissue=tissue, tissue_mpp=tissue_mpp, metadata=meta)
    return FanOutWriter([table, masks])


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` via a temp file, fsync and rename: all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def _json_default(obj: Any) -> Any:
    """JSON for the few non-JSON types run records hold: numpy scalars/arrays and paths."""
    if isinstance(obj, np.generic | np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
