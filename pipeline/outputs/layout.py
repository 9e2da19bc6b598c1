"""Where a slide's outputs go: the paths of a batch folder and `SlideOutputs`.

Output paths of a batch in ``<out>``::

    nuclei/slide_id=<id>/part-0.parquet    GeoParquet (hive partition: one load per batch)
    <id>/masks.ome.zarr                    OME-Zarr masks
    <id>/run.json                          written last (``atomic.write_json_atomic``): the slide is done

`SlideOutputs` is the production `tiles.stitch.Merger`: rasters to OME-Zarr, rows to
GeoParquet, each under a temp name (`atomic`) until ``close`` publishes it.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nucleiflow.pipeline.outputs.geoparquet import GeoParquetWriter
from nucleiflow.pipeline.outputs.omezarr import OmeZarrWriter


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


class SlideOutputs:
    """A slide's GeoParquet table and OME-Zarr masks at the layout's paths: the production
    `Merger`. If any call fails, both are aborted (no temp file, no final file left).

    shape: (H, W) model px; mpp: model um/px; scale: level-0 px per model px; chunk: the
    tile core size. ``metadata`` (model, model_hash, config_hash, ...) goes into both files.
    """

    def __init__(self, out: str | os.PathLike, slide_id: str, *, shape: tuple[int, int], mpp: float,
                 scale: float, chunk: int, metadata: Mapping[str, Any] | None = None,
                 tissue: np.ndarray | None = None, tissue_mpp: float | None = None,
                 row_group_rows: int | None = None) -> None:
        paths = slide_paths(out, slide_id)
        meta = {**(metadata or {}), "slide_id": slide_id, "mpp": mpp, "scale": scale}
        kw = {} if row_group_rows is None else {"row_group_rows": row_group_rows}
        self.table = GeoParquetWriter(paths["parquet"], meta, extent=(shape[1] * scale, shape[0] * scale), **kw)
        try:
            self.masks = OmeZarrWriter(paths["zarr"], shape, mpp=mpp, chunk=chunk, tissue=tissue,
                                       tissue_mpp=tissue_mpp, metadata=meta)
        except BaseException:
            self.table.abort()
            raise

    def _guard(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except BaseException:
            self.abort()
            raise

    def read_labels(self, box: Any) -> np.ndarray:
        return self.masks.read_labels(box)

    def write_labels(self, box: Any, labels: np.ndarray) -> None:
        self._guard(self.masks.write_labels, box, labels)

    def write_prob(self, box: Any, prob: np.ndarray) -> None:
        self._guard(self.masks.write_prob, box, prob)

    def write_table(self, table: Mapping[str, np.ndarray]) -> None:
        self._guard(self.table.write, table)

    def close(self, meta: Mapping[str, Any] | None = None) -> list[Path]:
        """Masks first (the slow pyramid), the table last: a batch read of ``nuclei/`` sees a
        final-named table only in the ms before run.json lands. If the table fails after the
        masks were published, run.json (written after) does not exist: the slide is not done."""
        return [self._guard(self.masks.close, meta), self._guard(self.table.close, meta)]

    def abort(self) -> None:
        self.table.abort()
        self.masks.abort()
