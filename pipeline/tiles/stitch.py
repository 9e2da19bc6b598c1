"""Stitch tiles into one slide: label raster and nuclei table, numbered once, chunk by chunk.

Like MONAI's splitter/merger: the tile plan splits, a `Merger` takes the stitched pieces
(`MemoryMerger` in memory, `outputs.layout.SlideOutputs` to OME-Zarr + GeoParquet). The
`LabelStitcher` is the only place nucleus ids are given: each tile's owned nuclei become
``offset + local id`` in its raster chunk *and* in its table rows, so the two always agree.

Each tile writes its own core chunk once. Pixels of owned nuclei that reach into a
neighbour's core ("spills") are painted into that neighbour's chunk where it is still
background: at once (read-modify-write of the whole chunk) when the neighbour is already
written or never planned, else when it is. Only the main process writes, in tile order, so
the result is deterministic and no chunk is written by two writers at once.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import pandas as pd

from nucleiflow.pipeline.tiles.ownership import Spill, TileNuclei
from nucleiflow.pipeline.tiles.plan import Box, TilePlan


class Merger(Protocol):
    """Where a stitched slide goes. Boxes are whole grid cells in model px; labels (h, w)
    int32 nucleus ids; prob (h, w) uint8 (NP probability x 255); tables are nuclei tables
    (`postprocess.morphometry`) whose ``nucleus_id`` matches the labels."""

    def read_labels(self, box: Box) -> np.ndarray: ...

    def write_labels(self, box: Box, labels: np.ndarray) -> None: ...

    def write_prob(self, box: Box, prob: np.ndarray) -> None: ...

    def write_table(self, table: Mapping[str, np.ndarray]) -> None: ...

    def close(self, meta: Mapping[str, Any] | None = None) -> Any:
        """Finalise; ``meta`` (JSON-able) is stored with the output."""

    def abort(self) -> None:
        """Drop the partial output; leave nothing under a final name."""


class MemoryMerger:
    """A slide in memory (`evaluate`, tuning, tests): ``labels`` (H, W) int32, ``prob`` (H, W)
    uint8, and after ``close`` the rows as ``table`` (DataFrame) and ``meta``. Raises like
    the file outputs on duplicate nucleus ids."""

    def __init__(self, height: int, width: int) -> None:
        self.labels = np.zeros((height, width), np.int32)
        self.prob = np.zeros((height, width), np.uint8)
        self._tables: list[Mapping[str, np.ndarray]] = []
        self.table: pd.DataFrame | None = None
        self.meta: dict[str, Any] | None = None
        self.closed = self.aborted = False

    def read_labels(self, box: Box) -> np.ndarray:
        return self.labels[box.y0 : box.y1, box.x0 : box.x1].copy()

    def write_labels(self, box: Box, labels: np.ndarray) -> None:
        self.labels[box.y0 : box.y1, box.x0 : box.x1] = labels

    def write_prob(self, box: Box, prob: np.ndarray) -> None:
        self.prob[box.y0 : box.y1, box.x0 : box.x1] = prob

    def write_table(self, table: Mapping[str, np.ndarray]) -> None:
        self._tables.append(table)

    def close(self, meta: Mapping[str, Any] | None = None) -> pd.DataFrame:
        from nucleiflow.pipeline.postprocess.morphometry import empty_table

        self.table = pd.concat([pd.DataFrame(dict(t)) for t in self._tables or [empty_table()]], ignore_index=True)
        if self.table["nucleus_id"].duplicated().any():
            raise ValueError("nucleus_id is not unique in the slide")
        self.meta, self.closed = dict(meta or {}), True
        return self.table

    def abort(self) -> None:
        self.aborted = True
        self._tables, self.table = [], None


def _paint(chunk: np.ndarray, chunk_box: Box, spill: Spill, offset: int) -> None:
    """Paint ``spill`` (local ids + offset) into ``chunk`` where it is background."""
    b = spill.box
    region = chunk[b.y0 - chunk_box.y0 : b.y1 - chunk_box.y0, b.x0 - chunk_box.x0 : b.x1 - chunk_box.x0]
    fill = (region == 0) & (spill.labels > 0)
    region[fill] = spill.labels[fill] + offset


class LabelStitcher:
    """Feed TileNuclei in tile order; ids become ``offset + local id``, unique in the slide,
    in the raster and in the table alike."""

    def __init__(self, plan: TilePlan, merger: Merger) -> None:
        self.plan = plan
        self.merger = merger
        self.next_id = 1
        self._written: set[tuple[int, int]] = set()
        self._pending: dict[tuple[int, int], list[tuple[Spill, int]]] = defaultdict(list)

    def add(self, tn: TileNuclei) -> int:
        """Write a tile's chunk, spills and rows; returns the id offset given to its nuclei."""
        offset = self.next_id - 1
        self.next_id += tn.n
        cell = (tn.tile.row, tn.tile.col)
        chunk = np.where(tn.core_labels > 0, tn.core_labels + offset, 0).astype(np.int32)
        for spill, off in self._pending.pop(cell, []):
            _paint(chunk, tn.tile.core, spill, off)
        self.merger.write_labels(tn.tile.core, chunk)
        self.merger.write_prob(tn.tile.core, tn.prob)
        self._written.add(cell)
        for spill in tn.spills:
            if spill.cell in self._written or not self.plan.is_planned(*spill.cell):
                box = self.plan.cell_box(*spill.cell)
                target = self.merger.read_labels(box)
                _paint(target, box, spill, offset)
                self.merger.write_labels(box, target)
            else:
                self._pending[spill.cell].append((spill, offset))
        if tn.table is not None:
            self.merger.write_table({**tn.table, "nucleus_id": tn.table["nucleus_id"] + offset})
        return offset

    @property
    def count(self) -> int:
        """Nuclei stitched so far."""
        return self.next_id - 1
