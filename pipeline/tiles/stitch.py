"""Stitch tiles into a label raster whose ids match the nuclei table, chunk by chunk.

Each tile writes its own core chunk once: its owned nuclei, ids offset to be unique in the
slide. Pixels of owned nuclei that reach into a neighbour's core ("spills") are painted into
that neighbour's chunk where it is still background: at once (read-modify-write of the
whole chunk) when the neighbour is already written or never planned, else when it is. Only
the main process writes, in tile order, so the result is deterministic and no chunk is
written by two writers at once.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Protocol

import numpy as np

from nucleiflow.pipeline.tiles.plan import Box, TilePlan
from nucleiflow.pipeline.tiles.ownership import Spill, TileNuclei


class ChunkStore(Protocol):
    """Where stitched chunks go. Boxes are whole grid cells in model px."""

    def read_labels(self, box: Box) -> np.ndarray: ...

    def write_labels(self, box: Box, labels: np.ndarray) -> None: ...

    def write_prob(self, box: Box, prob: np.ndarray) -> None: ...


class MemoryChunks:
    """In-memory ChunkStore over whole arrays (tests, `evaluate`): labels int32, prob uint8."""

    def __init__(self, height: int, width: int) -> None:
        self.labels = np.zeros((height, width), np.int32)
        self.prob = np.zeros((height, width), np.uint8)

    def read_labels(self, box: Box) -> np.ndarray:
        return self.labels[box.y0 : box.y1, box.x0 : box.x1].copy()

    def write_labels(self, box: Box, labels: np.ndarray) -> None:
        self.labels[box.y0 : box.y1, box.x0 : box.x1] = labels

    def write_prob(self, box: Box, prob: np.ndarray) -> None:
        self.prob[box.y0 : box.y1, box.x0 : box.x1] = prob


def _paint(chunk: np.ndarray, chunk_box: Box, spill: Spill, offset: int) -> None:
    """Paint ``spill`` (local ids + offset) into ``chunk`` where it is background."""
    b = spill.box
    region = chunk[b.y0 - chunk_box.y0 : b.y1 - chunk_box.y0, b.x0 - chunk_box.x0 : b.x1 - chunk_box.x0]
    fill = (region == 0) & (spill.labels > 0)
    region[fill] = spill.labels[fill] + offset


class LabelStitcher:
    """Feed TileNuclei in tile order; ids become ``offset + local id``, unique in the slide."""

    def __init__(self, plan: TilePlan, store: ChunkStore) -> None:
        self.plan = plan
        self.store = store
        self.next_id = 1
        self._written: set[tuple[int, int]] = set()
        self._pending: dict[tuple[int, int], list[tuple[Spill, int]]] = defaultdict(list)

    def add(self, tn: TileNuclei) -> int:
        """Write a tile's chunk and spills; returns the id offset given to its nuclei."""
        offset = self.next_id - 1
        self.next_id += tn.n
        cell = (tn.tile.row, tn.tile.col)
        chunk = np.where(tn.core_labels > 0, tn.core_labels + offset, 0).astype(np.int32)
        for spill, off in self._pending.pop(cell, []):
            _paint(chunk, tn.tile.core, spill, off)
        self.store.write_labels(tn.tile.core, chunk)
        self.store.write_prob(tn.tile.core, tn.prob)
        self._written.add(cell)
        for spill in tn.spills:
            if spill.cell in self._written or not self.plan.is_planned(*spill.cell):
                box = self.plan.cell_box(*spill.cell)
                target = self.store.read_labels(box)
                _paint(target, box, spill, offset)
                self.store.write_labels(box, target)
            else:
                self._pending[spill.cell].append((spill, offset))
        return offset

    @property
    def count(self) -> int:
        """Nuclei stitched so far."""
        return self.next_id - 1
