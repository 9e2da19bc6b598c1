"""Which tile owns each nucleus, and the pixels owned nuclei spill into neighbouring cores.

Runs in post-processing worker processes, so it takes and returns plain arrays. A tile's
window is its core plus ``halo`` px per side. A nucleus is *owned* iff its centroid lies in
the core; owned nuclei are kept whole, including the pixels that lie in a neighbour's core
("spills"), which the stitcher paints into that neighbour's chunk.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nucleiflow.pipeline.postprocess.labels import relabel, relabel_pixels
from nucleiflow.pipeline.postprocess.morphometry import BoxLike, box_coords, moments
from nucleiflow.pipeline.tiles.plan import Box, Tile, TilePlan


@dataclass
class Spill:
    """Pixels of owned nuclei lying in grid cell ``cell``: ``labels`` (h, w) at ``box``."""

    cell: tuple[int, int]
    box: Box
    labels: np.ndarray


@dataclass
class TileNuclei:
    """What one tile contributes. Label ids are local (1..n); the stitcher offsets them.

    core_labels: (core h, core w) int32 owned nuclei inside the core; prob: same shape uint8
    (NP probability x 255); spills: owned pixels outside the core; window_labels: (W, W)
    int32 owned nuclei on the whole window (for polygons); n: owned count; n_halo_edge: owned
    nuclei touching the window border (halo too small); seconds: post-processing time;
    dropped: objects this tile would have owned that were not nuclei, per reason
    (`postprocess.plausible.REASONS`); areas: (n + 1,) int64 pixels of each local id, core
    and spills together (index 0 unused, 0), or None (the stitcher counts them).
    """

    tile: Tile
    core_labels: np.ndarray
    prob: np.ndarray
    spills: list[Spill]
    n: int
    n_halo_edge: int
    table: dict | None = None
    seconds: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    areas: np.ndarray | None = None


def ownership(labels: np.ndarray, core_in_array: BoxLike) -> np.ndarray:
    """Labels whose centroid lies in ``core_in_array``.

    Args:
        labels: (H, W) non-negative int instance labels, 0 = background.
        core_in_array: half-open box ``(x0, y0, x1, y1)`` (or a `plan.Box`) in the
            array's own pixel coordinates (pixel ``(r, c)`` spans ``[c, c+1) x [r, r+1)``).

    Returns:
        Sorted int64 array of kept label values. The centroid is the mean of pixel centres,
        ``(mean(c) + 0.5, mean(r) + 0.5)``; the test ``x0 <= cx < x1`` is done in integers
        (``2*x0*n <= 2*sum(c) + n < 2*x1*n``), so it does not depend on the array's offset.

    >>> lab = np.zeros((4, 6), np.int32); lab[1:3, 2:4] = 1; lab[1:3, 4:6] = 2
    >>> ownership(lab, (0, 0, 4, 4)).tolist()   # centroid x: 3.0 and 5.0
    [1]
    """
    present, n, sx, sy = moments(np.asarray(labels))
    return present[centroid_in(n, sx, sy, core_in_array)].astype(np.int64)


def centroid_in(n: np.ndarray, sx: np.ndarray, sy: np.ndarray, box: BoxLike) -> np.ndarray:
    """bool per region (`moments`' n, sx, sy): mean pixel centre in the half-open ``box``."""
    x0, y0, x1, y1 = box_coords(box)
    tx, ty = 2 * sx + n, 2 * sy + n  # 2 * n * centroid
    return (2 * x0 * n <= tx) & (tx < 2 * x1 * n) & (2 * y0 * n <= ty) & (ty < 2 * y1 * n)


def touches_border(labels: np.ndarray) -> np.ndarray:
    """Sorted labels (> 0) with at least one pixel on the outer edge of ``labels`` (H, W)."""
    labels = np.asarray(labels)
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    u = np.unique(edge)
    return u[u > 0].astype(np.int64)


def owned_labels(labels: np.ndarray, core: Box) -> np.ndarray:
    """Keep the instances whose centroid lies in ``core`` (window px), relabelled 1..n.

    The rule is `ownership` (mean pixel centre in the half-open core, decided in
    exact integers), so exactly one of two abutting cores owns each nucleus. Returns int32
    (H, W); instances are numbered in order of their original label.
    """
    return relabel(labels, ownership(labels, core), 1)


def split_spills(window: np.ndarray, tile: Tile, plan: TilePlan) -> list[Spill]:
    """Owned pixels of ``window`` outside the tile's core, cut along the grid cells they fall in.

    ``window`` (W, W) starts at the read box's origin. Every cell the window covers is
    visited, not only the 8 neighbours of the core and not only the read box: a small core
    (slide edge, shifted grid) has a window reaching past its read box, and a halo larger than
    a cell reaches two cells away. Pixels the polygon table holds all reach the raster.
    """
    x0w, y0w = tile.read.x0, tile.read.y0
    x1w, y1w = min(x0w + window.shape[1], plan.width), min(y0w + window.shape[0], plan.height)
    x0w, y0w = max(x0w, 0), max(y0w, 0)
    if x0w >= x1w or y0w >= y1w:
        return []
    rows, cols = plan.grid_shape
    r0, c0 = plan.cell_of(x0w, y0w)
    r1, c1 = plan.cell_of(x1w - 1, y1w - 1)
    spills = []
    for row in range(max(r0, 0), min(r1, rows - 1) + 1):
        for col in range(max(c0, 0), min(c1, cols - 1) + 1):
            if (row, col) == (tile.row, tile.col):
                continue
            cell = plan.cell_box(row, col)
            x0, x1 = max(cell.x0, x0w), min(cell.x1, x1w)
            y0, y1 = max(cell.y0, y0w), min(cell.y1, y1w)
            if x0 >= x1 or y0 >= y1:
                continue
            crop = window[y0 - tile.read.y0 : y1 - tile.read.y0, x0 - tile.read.x0 : x1 - tile.read.x0]
            if crop.any():
                spills.append(Spill((row, col), Box(x0, y0, x1, y1), crop.copy()))
    return spills


def slide_box(tile: Tile, plan: TilePlan, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the part of a tile's window array of ``shape`` (H, W) that lies in the
    slide, in the window's pixels (empty when x0 >= x1 or y0 >= y1)."""
    h, w = shape
    x0, y0 = tile.read.x0, tile.read.y0
    return max(0, -x0), max(0, -y0), min(w, plan.width - x0), min(h, plan.height - y0)


def inside_slide(labels: np.ndarray, tile: Tile, plan: TilePlan) -> np.ndarray:
    """``labels`` (window) with the pixels past the slide's edges set to 0 (a copy if any are).

    Nothing exists outside the slide: a model may still paint blobs on the white glass that
    readers return there. Clipped, a nucleus' table row (area, centroid, polygon) describes
    exactly the pixels the label raster, which ends at the slide's edge, can hold.
    """
    h, w = labels.shape
    cx0, cy0, cx1, cy1 = slide_box(tile, plan, labels.shape)
    if (cx0, cy0, cx1, cy1) == (0, 0, w, h):
        return labels
    out = np.zeros_like(labels)
    if cx0 < cx1 and cy0 < cy1:
        out[cy0:cy1, cx0:cx1] = labels[cy0:cy1, cx0:cx1]
    return out


def inside_slide_pixels(labels: np.ndarray, fg: np.ndarray, lab: np.ndarray, tile: Tile,
                        plan: TilePlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`inside_slide` of ``labels`` (H, W) whose object pixels are ``fg`` (n,) (raveled
    indices, ascending) with labels ``lab`` (n,), and the object pixels and labels left.
    ``labels`` is given up by the caller: cleared in place past the slide's edges (no copy
    of the whole window; its object pixels found without a pass over it)."""
    h, w = labels.shape
    cx0, cy0, cx1, cy1 = slide_box(tile, plan, labels.shape)
    if (cx0, cy0, cx1, cy1) == (0, 0, w, h):
        return labels, fg, lab
    cx0, cy0, cx1, cy1 = max(cx0, 0), max(cy0, 0), max(min(cx1, w), 0), max(min(cy1, h), 0)
    if cx0 >= cx1 or cy0 >= cy1:
        labels[:] = 0
        return labels, fg[:0], lab[:0]
    labels[:cy0] = 0
    labels[cy1:] = 0
    labels[:, :cx0] = 0
    labels[:, cx1:] = 0
    lo, hi = np.searchsorted(fg, [cy0 * w, cy1 * w])  # the rows inside: a run of ``fg``
    fg, lab = fg[lo:hi], lab[lo:hi]
    if cx0 > 0 or cx1 < w:
        col = fg % w
        on = (col >= cx0) & (col < cx1)
        fg, lab = fg[on], lab[on]
    return labels, fg, lab


def own_tile(tile: Tile, labels: np.ndarray, prob: np.ndarray, plan: TilePlan,
             sums: tuple[np.ndarray, ...] | None = None,
             pixels: tuple[np.ndarray, np.ndarray] | None = None) -> TileNuclei:
    """Ownership + spills for a tile whose window instance labels are ``labels`` (W, W).
    ``sums``: `morphometry.moments` of ``labels`` when the caller has them, ``labels`` then
    already inside the slide (`inside_slide`). ``pixels``: with ``sums``, the object pixels of
    ``labels`` (raveled indices ascending, their labels): the owned window is then relabelled
    on them alone, and ``extra`` also holds its pixels ("window_pixels") and which of
    ``sums``' labels it kept ("owned", bool)."""
    h = plan.halo
    core_in_window = Box(h, h, h + tile.core.width, h + tile.core.height)
    if sums is None:
        labels = inside_slide(labels, tile, plan)
        sums = moments(labels)
    present, n, sx, sy = sums[:4]
    owned = centroid_in(n, sx, sy, core_in_window)
    extra: dict = {}
    if pixels is None:
        window = relabel(labels, present[owned], 1)  # `owned_labels`, reusing the moments
    else:
        window, *window_pixels = relabel_pixels(labels.shape, *pixels, present[owned], 1)
        extra.update(window_pixels=tuple(window_pixels), owned=owned)
    core = window[h : h + tile.core.height, h : h + tile.core.width]
    # clip(rint(prob * 255), 0, 255) as uint8, in place on one temporary: 2.5x faster (issue 13).
    prob_core = np.multiply(prob[h : h + tile.core.height, h : h + tile.core.width], 255.0)
    np.rint(prob_core, out=prob_core)
    return TileNuclei(
        tile=tile,
        core_labels=np.ascontiguousarray(core),
        prob=np.clip(prob_core, 0, 255, out=prob_core).astype(np.uint8),
        spills=split_spills(window, tile, plan),
        n=int(window.max()),
        n_halo_edge=int(touches_border(window).size),
        extra={"window_labels": window, **extra},
        areas=np.r_[0, n[owned]].astype(np.int64),
    )
