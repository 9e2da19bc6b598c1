"""Segment one slide reader into a merger: stream tiles -> stitch (raster and table).

This is the one code path behind `nucleiflow segment` (`outputs.layout.SlideOutputs`) and
`nucleiflow evaluate` / the training flow's evaluation (`MemoryMerger` on an ArraySlide).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Collection
from contextlib import closing
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from nucleiflow.pipeline.infer.pools import TilePools
from nucleiflow.pipeline.infer.predictor import Predictor
from nucleiflow.pipeline.infer.stream import StageTimer, stream_tiles
from nucleiflow.pipeline.postprocess.labels import upsample_labels
from nucleiflow.pipeline.postprocess.watershed import mask_threshold
from nucleiflow.pipeline.slide.reader import SlideReader
from nucleiflow.pipeline.tiles.stitch import LabelStitcher, MemoryMerger, Merger
from nucleiflow.pipeline.tiles.plan import Tile, TilePlan, plan_tiles
from nucleiflow.pipeline.tiles.ownership import TileNuclei


@dataclass
class SegmentStats:
    """Counts and timings of one segmented slide."""

    tiles: int = 0
    resumed: int = 0  # of ``tiles``: taken over from an earlier run's parts, not run again
    nuclei: int = 0
    halo_edge_nuclei: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # not nuclei, per reason (`postprocess.plausible`)
    timer: StageTimer = field(default_factory=StageTimer)


class TileStore(Protocol):
    """Tiles' post-processed results kept across runs (`batch.tile_parts.TileParts`)."""

    done: Collection[int]  # tile indices whose stored result ``load`` returns

    def load(self, tile: Tile) -> TileNuclei: ...

    def save(self, tn: TileNuclei) -> None: ...


class WithImages:
    """A predictor whose maps also hold the images it was given (``"rgb"``, (B, H, W, 3)
    uint8): post-processing judges objects by their colour too (`infer.workers.drop_implausible`)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor, self.card = predictor, predictor.card

    def __getattr__(self, name: str):  # device, cuda, ...: the wrapped predictor's
        return getattr(self.predictor, name)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return {**self.predictor(images), "rgb": images}


def segment_reader(
    reader: SlideReader,
    plan: TilePlan,
    predictor: Predictor,
    merger: Merger,
    *,
    batch_size: int = 4,
    readers: int = 0,
    workers: int = 0,
    pools: TilePools | None = None,
    on_tile: Callable[[TileNuclei, int], None] | None = None,
    parts: TileStore | None = None,
) -> SegmentStats:
    """Run every planned tile into ``merger`` (labels, prob and the nuclei rows, numbered
    once by the stitcher); ``on_tile(tile_nuclei, id_offset)`` is called after each tile.
    ``pools`` (a batch's, kept running) replaces ``readers`` / ``workers`` (this slide's own).

    With ``parts``, the tiles in ``parts.done`` are loaded instead of run, every other tile
    is saved as it comes, and all go through the stitcher in tile order: the merger gets
    exactly what an uninterrupted run gives it, provided ``parts.done`` is made of whole
    model batches (plan positions ``j * batch_size`` on), so the rest batch as they did."""
    stats = SegmentStats()
    stitcher = LabelStitcher(plan, merger)
    done = parts.done if parts is not None else ()
    computed = stream_tiles(
        reader, plan, WithImages(predictor), predictor.card.postprocess, batch_size=batch_size, readers=readers, workers=workers,
        pools=pools, timer=stats.timer, tiles=[t for t in plan if t.index not in done],
    )
    with closing(computed):  # cancels the slide's queued jobs if a tile fails
        for tile in plan:
            if tile.index in done:
                t0 = time.perf_counter()
                tn = parts.load(tile)
                stats.timer.add("parts", time.perf_counter() - t0)
                stats.resumed += 1
            else:
                tn = next(computed)
                if parts is not None:
                    t0 = time.perf_counter()
                    parts.save(tn)  # before `add`, which renumbers tn in place
                    stats.timer.add("parts", time.perf_counter() - t0)
            offset = stitcher.add(tn)
            stats.tiles += 1
            stats.halo_edge_nuclei += tn.n_halo_edge
            for reason, k in tn.dropped.items():
                stats.dropped[reason] = stats.dropped.get(reason, 0) + k
            if on_tile is not None:
                on_tile(tn, offset)
    stats.nuclei = stitcher.count
    return stats


def segment_array(
    reader: SlideReader, predictor: Predictor, *, tile_size: int = 512, halo: int = 64, batch_size: int = 2
) -> np.ndarray:
    """Instance labels (H, W) int32 of a small in-memory slide at its *native* resolution.

    Tiles at the model's mpp (from its card) with no tissue filter, stitches in memory, then
    maps labels back to the slide's pixel grid, which is where ground truth lives: nearest,
    with outlines re-drawn on the interpolated probability where that grid is finer
    (`postprocess.labels.upsample_labels`), as the GeoParquet polygons are drawn
    (`postprocess.subpixel`).
    """
    info = reader.info
    plan = plan_tiles(info.width, info.height, info.mpp_x, predictor.card.mpp, tile_size=tile_size, halo=halo)
    merger = MemoryMerger(plan.height, plan.width)
    segment_reader(reader, plan, predictor, merger, batch_size=batch_size)
    threshold = mask_threshold(predictor.card.postprocess)
    return upsample_labels(merger.labels, merger.prob, info.height, info.width, plan.scale, threshold)
