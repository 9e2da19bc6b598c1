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


def _crop(labels: np.ndarray, at: Box, box: Box) -> np.ndarray:
    """The part of ``labels`` (lying at ``at``) inside ``box`` (a view; empty if disjoint)."""
    x0, y0, x1, y1 = max(at.x0, box.x0), max(at.y0, box.y0), min(at.x1, box.x1), min(at.y1, box.y1)
    return labels[max(y0 - at.y0, 0) : max(y1 - at.y0, 0), max(x0 - at.x0, 0) : max(x1 - at.x0, 0)]


def _meet(mine: np.ndarray, mine_at: Box, theirs: np.ndarray, theirs_at: Box, offset: int) -> tuple:
    """(my local ids, their slide ids) at every pixel where both label arrays hold a nucleus."""
    a, b = _crop(mine, mine_at, theirs_at), _crop(theirs, theirs_at, mine_at)
    both = (a > 0) & (b > 0)
    return a[both], b[both].astype(np.int64) + offset


def _keep_only(tn: TileNuclei, drop: np.ndarray) -> None:
    """Remove the local ids in ``drop`` from ``tn`` (in place: callers' ``on_tile`` sees what
    was stitched), the others renumbered 1..k in order."""
    lut = np.zeros(tn.n + 1, np.int32)
    kept = np.setdiff1d(np.arange(1, tn.n + 1), drop)
    lut[kept] = np.arange(1, len(kept) + 1, dtype=np.int32)
    spills = [Spill(sp.cell, sp.box, lut[sp.labels]) for sp in tn.spills]
    table = tn.table
    if table is not None:
        rows = lut[table["nucleus_id"]] > 0
        table = {k: np.asarray(v)[rows] for k, v in table.items()}
        table["nucleus_id"] = lut[table["nucleus_id"]].astype(np.asarray(tn.table["nucleus_id"]).dtype)
    tn.core_labels, tn.spills, tn.n, tn.table = lut[tn.core_labels], [sp for sp in spills if sp.labels.any()], \
        len(kept), table
    if tn.areas is not None:
        tn.areas = tn.areas[np.r_[0, kept]]


def _areas(tn: TileNuclei) -> np.ndarray:
    """Pixels of each local id of ``tn`` (index 0: background, or 0 when the worker counted
    them: ``tn.areas``), core and spills together."""
    if tn.areas is not None:
        return tn.areas
    area = np.bincount(tn.core_labels.ravel(), minlength=tn.n + 1)
    for sp in tn.spills:
        area += np.bincount(sp.labels.ravel(), minlength=tn.n + 1)
    return area[: tn.n + 1]


class LabelStitcher:
    """Feed TileNuclei in tile order; ids become ``offset + local id``, unique in the slide,
    in the raster and in the table alike.

    Two tiles segment a nucleus on a seam in their own windows, so their outlines (and
    centroids) can differ enough that both own it (CMU-1: a 191 px nucleus above row 1024,
    a 146 px one inside it below). A tile's nucleus that overlaps a nucleus stitched before
    by more than ``DUPLICATE`` of the smaller of the two is that nucleus again: it is dropped,
    and the first one stays whole in raster and table.
    """

    DUPLICATE = 0.1

    def __init__(self, plan: TilePlan, merger: Merger) -> None:
        self.plan = plan
        self.merger = merger
        self.next_id = 1
        self._area = np.zeros(1, np.int64)  # pixels of each stitched nucleus, by slide id
        self._written: set[tuple[int, int]] = set()
        self._pending: dict[tuple[int, int], list[tuple[Spill, int]]] = defaultdict(list)

    def _duplicates(self, tn: TileNuclei, targets: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
        """Local ids of ``tn`` that repeat a nucleus stitched before (see the class doc)."""
        core, cell = tn.tile.core, (tn.tile.row, tn.tile.col)
        met = [_meet(tn.core_labels, core, sp.labels, sp.box, off) for sp, off in self._pending.get(cell, [])]
        for sp in tn.spills:
            if sp.cell in targets:  # written (or never planned) cells: what the raster holds
                met.append(_meet(sp.labels, sp.box, targets[sp.cell], self.plan.cell_box(*sp.cell), 0))
            else:  # cells still to come: the spills other tiles left for them
                met += [_meet(sp.labels, sp.box, other.labels, other.box, off)
                        for other, off in self._pending.get(sp.cell, [])]
        mine = np.concatenate([m for m, _ in met]) if met else np.zeros(0, np.int64)
        if mine.size == 0:
            return mine
        theirs = np.concatenate([t for _, t in met])
        pairs, overlap = np.unique(np.stack([mine.astype(np.int64), theirs]), axis=1, return_counts=True)
        smaller = np.minimum(_areas(tn)[pairs[0]], self._area[pairs[1]])
        return np.unique(pairs[0][overlap > self.DUPLICATE * smaller])

    def add(self, tn: TileNuclei) -> int:
        """Write a tile's chunk, spills and rows; returns the id offset given to its nuclei."""
        cell = (tn.tile.row, tn.tile.col)
        targets = {sp.cell: self.merger.read_labels(self.plan.cell_box(*sp.cell)) for sp in tn.spills
                   if sp.cell in self._written or not self.plan.is_planned(*sp.cell)}
        drop = self._duplicates(tn, targets)
        if drop.size:
            _keep_only(tn, drop)
        offset = self.next_id - 1
        self.next_id += tn.n
        if len(self._area) < self.next_id:  # grow by doubling: one copy per doubling, not per tile
            self._area = np.concatenate([self._area, np.zeros(max(self.next_id, len(self._area)), np.int64)])
        self._area[offset + 1 : self.next_id] = _areas(tn)[1:]
        chunk = np.zeros(tn.core_labels.shape, np.int32)  # ids + offset on the nuclei: 2 passes, not 4
        np.add(tn.core_labels, offset, out=chunk, where=tn.core_labels > 0, casting="unsafe")
        for spill, off in self._pending.pop(cell, []):
            _paint(chunk, tn.tile.core, spill, off)
        self.merger.write_labels(tn.tile.core, chunk)
        self.merger.write_prob(tn.tile.core, tn.prob)
        self._written.add(cell)
        for spill in tn.spills:
            if spill.cell in targets:
                box = self.plan.cell_box(*spill.cell)
                _paint(targets[spill.cell], box, spill, offset)
                self.merger.write_labels(box, targets[spill.cell])
            else:
                self._pending[spill.cell].append((spill, offset))
        if tn.table is not None:
            self.merger.write_table({**tn.table, "nucleus_id": tn.table["nucleus_id"] + offset})
        return offset

    @property
    def count(self) -> int:
        """Nuclei stitched so far."""
        return self.next_id - 1
