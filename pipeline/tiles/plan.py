"""Tile geometry: which regions of a slide the model sees, and which tile owns each pixel.

All boxes are in *model pixels*: the pixel grid of the slide resampled to the model's mpp,
with (0, 0) at the slide's level-0 origin. ``TilePlan.scale`` converts to level-0 pixels.

Each tile has a **core**, the region it owns (a cell of a fixed grid of ``tile_size`` px,
so cores line up with Zarr chunks), and a **read** box, the core grown by ``halo`` px on
every side for context. Cores of planned tiles never overlap, and every point of a planned
core has exactly one owner (``TilePlan.owner``). A nucleus is kept by the tile whose core
holds its centroid, so it is produced exactly once and whole, provided ``halo`` is at least
the largest nucleus radius plus the model's context needs.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi

if TYPE_CHECKING:
    from nucleiflow.pipeline.slide.reader import SlideInfo
    from nucleiflow.pipeline.slide.tissue import TissueMask


@dataclass(frozen=True, order=True)
class Box:
    """Half-open integer box ``[x0, x1) x [y0, y1)`` in model pixels."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return max(self.width, 0) * max(self.height, 0)

    def contains(self, x: float, y: float) -> bool:
        return self.x0 <= x < self.x1 and self.y0 <= y < self.y1

    def grow(self, px: int) -> Box:
        return Box(self.x0 - px, self.y0 - px, self.x1 + px, self.y1 + px)


@dataclass(frozen=True)
class Tile:
    """One unit of work. ``core`` is owned; ``read`` = core + halo is what the model sees."""

    index: int
    row: int
    col: int
    core: Box
    read: Box


@dataclass(frozen=True, eq=False)
class Region:
    """Where nuclei may lie on a slide: a bool mask whose pixel is ``factor`` model px wide,
    aligned with the slide's origin, held bit-packed (``np.packbits``) because every
    post-processing job carries the plan (about 0.7 MB for a 25 x 15 mm slide at 8 um/px).
    Points past the mask's edges are outside."""

    bits: bytes
    shape: tuple[int, int]
    factor: float

    @classmethod
    def of(cls, mask: np.ndarray, factor: float) -> Region:
        """``mask`` (h, w) bool; ``factor``: model px per mask px (mask mpp / model mpp)."""
        mask = np.asarray(mask, bool)
        return cls(np.packbits(mask, axis=None).tobytes(), (int(mask.shape[0]), int(mask.shape[1])), float(factor))

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Are model-pixel points (x, y) (float arrays, same shape) in the region? bool array."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        col, row = np.floor(x / self.factor).astype(np.int64), np.floor(y / self.factor).astype(np.int64)
        h, w = self.shape
        if h * w == 0:
            return np.zeros(x.shape, bool)
        inside = (row >= 0) & (row < h) & (col >= 0) & (col < w)
        flat = np.where(inside, row * w + col, 0)
        byte = np.frombuffer(self.bits, np.uint8)[flat >> 3]
        return inside & (((byte >> (7 - (flat & 7))) & 1) == 1)


@dataclass(frozen=True)
class TilePlan:
    """Tiles of one slide at the model's resolution.

    Attributes:
        width, height: slide size in model pixels (ceil of level-0 size / scale).
        mpp: model resolution, um/px. ``scale`` = level-0 pixels per model pixel.
        tile_size: core edge in model px (the chunk grid); ``halo``: context px per side.
        origin: offset of the core grid in model px, in ``[0, tile_size)``; 0 aligns cores
            with Zarr chunks. A non-zero origin exists to test seams with a shifted grid.
        tiles: planned tiles (cores holding tissue), row-major.
        region: where nuclei may lie (`plan_slide`: tissue, not ink or borders); objects
            whose centroid is outside are dropped (`postprocess.plausible`). None: anywhere.
    """

    width: int
    height: int
    mpp: float
    scale: float
    tile_size: int
    halo: int
    origin: tuple[int, int] = (0, 0)
    tiles: tuple[Tile, ...] = ()
    region: Region | None = field(default=None, compare=False, repr=False)
    _by_cell: dict[tuple[int, int], Tile] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_cell.update({(t.row, t.col): t for t in self.tiles})

    def __len__(self) -> int:
        return len(self.tiles)

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of the full core grid, planned or not."""
        return _n_cells(self.height, self.tile_size, self.origin[1]), _n_cells(
            self.width, self.tile_size, self.origin[0]
        )

    def cell_of(self, x: float, y: float) -> tuple[int, int]:
        """(row, col) of the grid cell holding model-pixel point (x, y)."""
        ox, oy = self.origin
        # Cells are shifted by one when the origin is non-zero: cell 0 is [0, origin).
        col = math.floor((x - ox) / self.tile_size) + (1 if ox else 0)
        row = math.floor((y - oy) / self.tile_size) + (1 if oy else 0)
        return row, col

    def cell_box(self, row: int, col: int) -> Box:
        """Core box of grid cell (row, col), planned or not, clipped to the slide."""
        ox, oy = self.origin
        x0 = 0 if col == 0 else (ox + (col - 1) * self.tile_size if ox else col * self.tile_size)
        y0 = 0 if row == 0 else (oy + (row - 1) * self.tile_size if oy else row * self.tile_size)
        x1 = ox + col * self.tile_size if ox else (col + 1) * self.tile_size
        y1 = oy + row * self.tile_size if oy else (row + 1) * self.tile_size
        return Box(x0, y0, min(x1, self.width), min(y1, self.height))

    def is_planned(self, row: int, col: int) -> bool:
        return (row, col) in self._by_cell

    def owner(self, x: float, y: float) -> Tile | None:
        """The planned tile whose core holds model-pixel point (x, y), or None."""
        if not (0 <= x < self.width and 0 <= y < self.height):
            return None
        return self._by_cell.get(self.cell_of(x, y))

    def planned_area(self) -> int:
        """Model pixels covered by planned cores."""
        return sum(t.core.area for t in self.tiles)


SNAP_TOL = 0.01  # relative: a model mpp this close to an integer multiple of the slide's snaps to it


def _n_cells(length: int, size: int, origin: int) -> int:
    return math.ceil((length - origin) / size) + (1 if origin else 0)


def _edges(length: int, size: int, origin: int) -> list[int]:
    """Grid lines along one axis, clipped to [0, length]: the cell edges of the cores."""
    first = origin if origin else size
    inner = list(range(first, length, size))
    return [0, *inner, length]


def _has_tissue(core: Box, tissue: np.ndarray, factor: float) -> bool:
    """Does ``tissue`` (a mask whose pixel is ``factor`` model px wide) hit ``core``?"""
    h, w = tissue.shape
    y0 = min(max(int(math.floor(core.y0 / factor)), 0), h)
    x0 = min(max(int(math.floor(core.x0 / factor)), 0), w)
    y1 = min(max(int(math.ceil(core.y1 / factor)), 0), h)
    x1 = min(max(int(math.ceil(core.x1 / factor)), 0), w)
    return bool(tissue[y0:y1, x0:x1].any())


def plan_tiles(
    width0: int,
    height0: int,
    mpp0: float,
    mpp: float,
    tile_size: int = 1024,
    halo: int = 64,
    tissue: np.ndarray | None = None,
    tissue_mpp: float | None = None,
    origin: tuple[int, int] = (0, 0),
) -> TilePlan:
    """Plan tiles over a slide.

    Args:
        width0, height0: slide size in level-0 pixels; ``mpp0``: its level-0 um/px.
        mpp: the model's um/px; within 1% of an integer multiple of ``mpp0`` it snaps to that
            multiple (``TilePlan.mpp`` is the mpp actually used). tile_size: core edge in model px (> 0). halo: context per
            side in model px (>= 0).
        tissue: optional bool mask (h, w) at ``tissue_mpp`` um/px, aligned to the slide's
            origin. Cores without a single tissue pixel are not planned. None plans all.
        origin: grid offset in model px, each in ``[0, tile_size)``.
    """
    if tile_size <= 0 or halo < 0:
        raise ValueError(f"tile_size must be > 0 and halo >= 0, got {tile_size}, {halo}")
    if mpp <= 0 or mpp0 <= 0:
        raise ValueError(f"mpp must be > 0, got model {mpp}, slide {mpp0}")
    if not all(0 <= o < tile_size for o in origin):
        raise ValueError(f"origin must lie in [0, tile_size), got {origin}")
    if tissue is not None and tissue_mpp is None:
        raise ValueError("tissue_mpp is required with a tissue mask")
    scale = mpp / mpp0
    snapped = round(scale)
    if snapped >= 1 and abs(scale - snapped) <= SNAP_TOL * scale:
        # 0.499 vs 0.5 um/px: run the model at the slide's own grid (or an exact 2x, 4x ...)
        # rather than resample by 0.2%, which would shift pixels by up to a few px per tile.
        scale, mpp = float(snapped), mpp0 * snapped
    width, height = math.ceil(width0 / scale), math.ceil(height0 / scale)
    xs, ys = _edges(width, tile_size, origin[0]), _edges(height, tile_size, origin[1])
    factor = (tissue_mpp / mpp) if tissue is not None else 1.0
    tiles: list[Tile] = []
    for row, (y0, y1) in enumerate(zip(ys[:-1], ys[1:])):
        for col, (x0, x1) in enumerate(zip(xs[:-1], xs[1:])):
            core = Box(x0, y0, x1, y1)
            if core.area == 0:
                continue
            if tissue is not None and not _has_tissue(core, tissue, factor):
                continue
            tiles.append(Tile(len(tiles), row, col, core, core.grow(halo)))
    return TilePlan(width, height, mpp, scale, tile_size, halo, tuple(origin), tuple(tiles))


def plan_slide(info: SlideInfo, tissue: TissueMask, model_mpp: float, *, tile_size: int, halo: int) -> TilePlan:
    """The tile plan of a slide: the one function `segment` and `inspect` both use, so
    inspect's ``tile_count`` is the number of tiles segment runs.

    info: the slide's level-0 size (px) and mpp; tissue: its thumbnail mask; model_mpp:
    the model card's um/px. The mask is grown by one mask pixel first: edge pixels that are
    only partly tissue still get tiles. The plan's ``region`` is ``tissue.region`` (`tissue.nuclei_region`).
    """
    planning_mask = ndi.binary_dilation(tissue.mask, iterations=1)
    plan = plan_tiles(info.width, info.height, info.mpp_x, model_mpp, tile_size=tile_size, halo=halo,
                      tissue=planning_mask, tissue_mpp=tissue.mpp)
    # Tiles are chosen by the tissue mask, but everything in a chosen tile is segmented:
    # nuclei off the tissue (on glass, ink or a black border) are dropped by this region.
    if tissue.region is None:
        return plan
    return dataclasses.replace(plan, region=Region.of(tissue.region, tissue.mpp / plan.mpp))
