"""Stream nuclei tables into one GeoParquet 1.1 file per slide.

File layout (the batch contract): ``<out>/nuclei/slide_id=<id>/part-0.parquet``. geometry is
WKB Polygons in level-0 pixels, with a ``bbox`` struct column declared as its covering;
``crs`` is null (pixels, not a map). Other key-value metadata: ``nucleiflow``, a JSON object
naming the model, its hash, the config hash and the slide.

``slide_id`` is *not* a column in the file: it is the hive partition key of the folder.
A column of the same name makes pyarrow (hence ``geopandas.read_parquet(<out>/nuclei)``)
fail to merge it with the partition field; DuckDB's ``hive_partitioning=true`` and
geopandas both give the ``slide_id`` column from the path. Reading one file alone gives no
``slide_id`` column (it is in the ``nucleiflow`` metadata).

Order: rows are buffered; once ``row_group_rows`` are buffered, the buffer is sorted by the
Hilbert index of the nucleus centroid (over the whole slide) and its first
``row_group_rows`` rows become one row group; the rest wait for the next group. So every
row group holds exactly ``row_group_rows`` rows (the last fewer), rows are in Hilbert order
within a row group, and row groups follow the tile stream (row-major tiles): each group
covers a compact patch of the band of tiles buffered, which keeps bbox statistics useful.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from nucleiflow.pipeline.outputs.atomic import publish, temp_path
from nucleiflow.pipeline.postprocess.morphometry import COLUMNS, OPTIONAL_COLUMNS, empty_table

ROW_GROUP_ROWS = 100_000
_ARROW = {
    "int64": pa.int64(),
    "int32": pa.int32(),
    "float64": pa.float64(),
    "float32": pa.float32(),
    "bool": pa.bool_(),
    "object": pa.string(),
}
_BBOX = pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])


def hilbert_index(x: np.ndarray, y: np.ndarray, order: int = 16) -> np.ndarray:
    """int64 position of integer cells (x, y) in ``[0, 2**order)^2`` along a Hilbert curve.

    Consecutive indices are edge-adjacent cells. Coordinates outside the grid are clipped.
    """
    n = 1 << order
    x = np.clip(np.asarray(x, dtype=np.int64), 0, n - 1)
    y = np.clip(np.asarray(y, dtype=np.int64), 0, n - 1)
    d = np.zeros(np.broadcast(x, y).shape, dtype=np.int64)
    s = n >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx) ^ ry)
        # Rotate the quadrant so the sub-curve is entered where the parent curve arrives.
        flip = ~ry & rx
        x = np.where(flip, n - 1 - x, x)
        y = np.where(flip, n - 1 - y, y)
        x, y = np.where(~ry, y, x), np.where(~ry, x, y)
        s >>= 1
    return d


def spatial_key(x: np.ndarray, y: np.ndarray, extent: tuple[float, float] | None = None) -> np.ndarray:
    """Hilbert index of level-0 points on a 2**16-cell grid spanning ``extent`` (w, h) px.

    Without an extent the grid spans 2**18 px (4 px cells), more than any slide.
    """
    cell = max(1.0, float(max(extent)) / 2**16) if extent else 4.0
    return hilbert_index(np.asarray(x) // cell, np.asarray(y) // cell)


def table_columns(table: Any) -> dict[str, np.ndarray]:
    """Columns of a nuclei table given as a dict of arrays or a (Geo)DataFrame."""
    if hasattr(table, "columns") and hasattr(table, "to_numpy"):  # pandas / geopandas
        return {c: np.asarray(table[c].array if c == "geometry" else table[c].to_numpy()) for c in table.columns}
    return {k: np.asarray(v) for k, v in table.items()}


def to_arrow(table: Any, schema: pa.Schema | None = None) -> pa.Table:
    """Nuclei table -> Arrow: geometry as WKB, ``bbox`` struct appended, ``slide_id`` dropped."""
    cols = table_columns(table)
    cols.pop("slide_id", None)
    geoms = np.asarray(cols["geometry"], dtype=object)
    known = COLUMNS | OPTIONAL_COLUMNS
    arrays, fields = [], []
    for name, values in cols.items():
        if name == "geometry":
            arr = pa.array(shapely.to_wkb(geoms), type=pa.binary())
        elif name in known:
            arr = pa.array(values, type=_ARROW[known[name]])
        else:
            arr = pa.array(values)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    b = shapely.bounds(geoms).reshape(-1, 4)
    arrays.append(pa.StructArray.from_arrays([pa.array(b[:, i], pa.float64()) for i in range(4)], fields=list(_BBOX)))
    fields.append(pa.field("bbox", _BBOX))
    out = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    if schema is not None:
        if out.schema.names != schema.names:
            raise ValueError(f"table columns {out.schema.names} differ from the file's {schema.names}")
        out = out.cast(schema)
    return out


def geo_metadata(bbox: list[float] | None) -> dict:
    """The GeoParquet 1.1 ``geo`` file metadata for our single WKB Polygon column."""
    col: dict[str, Any] = {
        "encoding": "WKB",
        "geometry_types": ["Polygon"],
        "crs": None,  # pixel coordinates: no CRS (GeoParquet: null = undefined)
        "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}},
    }
    if bbox is not None:
        col["bbox"] = bbox
    return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": col}}


class GeoParquetWriter:
    """Streams nuclei rows to ``path`` through a hidden temp file renamed on ``close``.

    Args:
        path: final file, e.g. ``<out>/nuclei/slide_id=<id>/part-0.parquet``.
        metadata: JSON-able facts stored under the ``nucleiflow`` key (model, model_hash,
            config_hash, slide_id, ...); ``close(meta)`` adds to them.
        row_group_rows: rows per row group (the contract asks 50k-150k; tests use fewer).
        extent: (width, height) of the slide in level-0 px, for the Hilbert grid (default
            2**18 px, more than any slide; only the sort order depends on it).

    The temp file is `atomic.temp_path` (hidden, in the same folder): the leading dot keeps
    pyarrow/geopandas folder reads from ever seeing it, and the same folder makes the
    rename atomic. ``abort`` removes it; the final name only ever holds a complete file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: Mapping[str, Any] | None = None,
        *,
        row_group_rows: int = ROW_GROUP_ROWS,
        extent: tuple[float, float] | None = None,
    ) -> None:
        if row_group_rows < 1:
            raise ValueError(f"row_group_rows must be >= 1, got {row_group_rows}")
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.metadata = dict(metadata or {})
        self.row_group_rows = row_group_rows
        self.extent = extent
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._rows = 0
        self._ids: list[np.ndarray] = []
        self._bbox = np.array([np.inf, np.inf, -np.inf, -np.inf])
        self._done = False

    def write(self, table: Any) -> None:
        """Append rows (a nuclei table: dict of columns or DataFrame)."""
        if self._done:
            raise RuntimeError(f"{self.path}: writer already closed or aborted")
        t = to_arrow(table, self._schema)
        if self._writer is None:
            self._open(t.schema)
        if t.num_rows == 0:
            return
        self._ids.append(t.column("nucleus_id").to_numpy())
        bb = t.column("bbox").combine_chunks().flatten()
        lo = [np.min(bb[i].to_numpy()) for i in (0, 1)]
        hi = [np.max(bb[i].to_numpy()) for i in (2, 3)]
        self._bbox = np.r_[np.minimum(self._bbox[:2], lo), np.maximum(self._bbox[2:], hi)]
        self._buffer.append(t)
        self._buffered += t.num_rows
        while self._buffered >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def _open(self, schema: pa.Schema) -> None:
        self._schema = schema
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        # No stored Arrow schema: its copy of the metadata would shadow the "geo" key that
        # can only be written at close (the overall bbox is known then). All our types are
        # native Parquet types, so nothing is lost.
        # Dictionary pages only for the one low-cardinality column: tried on unique WKB and
        # floats they cost half the write time and made the file ~10% larger (issue 13).
        self._writer = pq.ParquetWriter(self.tmp, schema, compression="zstd", store_schema=False,
                                        use_dictionary=[n for n in schema.names if n == "class_name"])

    def _flush(self, n: int) -> None:
        """Write the ``n`` Hilbert-first buffered rows (all if fewer) as one row group."""
        t = pa.concat_tables(self._buffer)
        cx = t.column("centroid_x").to_numpy() if "centroid_x" in t.column_names else np.zeros(t.num_rows)
        cy = t.column("centroid_y").to_numpy() if "centroid_y" in t.column_names else np.zeros(t.num_rows)
        order = np.argsort(spatial_key(cx, cy, self.extent), kind="stable")
        t = t.take(order)
        self._writer.write_table(t.slice(0, n), row_group_size=n)
        rest = t.slice(n)
        self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows
        self._rows += min(n, t.num_rows)

    def close(self, meta: Mapping[str, Any] | None = None) -> Path:
        """Flush, write the ``geo`` and ``nucleiflow`` metadata, rename to the final name."""
        if self._done:
            raise RuntimeError(f"{self.path}: writer already closed or aborted")
        try:
            if self._writer is None:
                self._open(to_arrow(empty_table()).schema)
            while self._buffered:
                self._flush(self.row_group_rows)
            ids = np.concatenate(self._ids) if self._ids else np.empty(0, np.int64)
            if len(np.unique(ids)) != len(ids):
                raise ValueError(f"{self.path}: nucleus_id is not unique in the slide")
            bbox = self._bbox.tolist() if self._rows else None
            info = {**self.metadata, **(meta or {}), "rows": self._rows, "row_order": "hilbert within row group"}
            self._writer.add_key_value_metadata({"geo": json.dumps(geo_metadata(bbox)), "nucleiflow": json.dumps(info)})
            self._writer.close()
            publish(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; the final name is never touched."""
        self._done = True
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # already failing or half-written: the temp file goes anyway
                pass
        self.tmp.unlink(missing_ok=True)
        self._buffer, self._buffered = [], 0

