"""Instance labels -> one polygon and a row of morphometrics per nucleus.

Conventions (shared with `tiles.plan` and the writers in `outputs`):

* Pixel ``(row, col)`` of an array covers the unit square ``[col, col+1) x [row, row+1)``,
  so its centre is ``(col + 0.5, row + 0.5)``. An array whose origin is model pixel
  ``offset = (x0, y0)`` maps its pixel centre to model point ``(x0 + col + 0.5, y0 + row + 0.5)``
  and to level-0 point ``scale *`` that (``scale`` = level-0 px per model px).
* Output geometry and centroids are in level-0 pixels, x right, y down. Sizes are given in
  um as well, measured on the model-pixel labels with ``mpp = mpp0 * scale`` (model um/px).
* The centroid of a nucleus is the mean of its pixel centres (``moments``; the tile
  ownership rule in `tiles.ownership` decides on the same sums).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import shapely

from nucleiflow.pipeline.postprocess.labels import nucleus_ids, object_pixels
from nucleiflow.pipeline.postprocess.outlines import padded_ranks, rings
from nucleiflow.pipeline.postprocess.polygons import clean_polygons, ring_polygons, scaled_polygons
from nucleiflow.pipeline.postprocess.subpixel import follow_probability

#: Columns of every nuclei table, in order, with their numpy dtypes (geometry: shapely objects).
COLUMNS: dict[str, str] = {
    "nucleus_id": "int64",
    "geometry": "object",
    "centroid_x": "float64",
    "centroid_y": "float64",
    "area_px": "float64",
    "area_um2": "float64",
    "perimeter_um": "float64",
    "equivalent_diameter_um": "float64",
    "eccentricity": "float32",
    "solidity": "float32",
    "major_axis_um": "float64",
    "minor_axis_um": "float64",
    "orientation": "float32",
    "mean_prob": "float32",
}
#: Columns present only when asked for: classes (``type_prob``), halo check (``border_labels``).
OPTIONAL_COLUMNS: dict[str, str] = {
    "class_id": "int32",
    "class_name": "object",
    "touches_halo_edge": "bool",
}

Table = dict[str, np.ndarray]
BoxLike = Any  # tiles.plan.Box or a tuple (x0, y0, x1, y1)


def box_coords(core: BoxLike) -> tuple[int, int, int, int]:
    if hasattr(core, "x0"):
        return core.x0, core.y0, core.x1, core.y1
    x0, y0, x1, y1 = core
    return int(x0), int(y0), int(x1), int(y1)


def moments(labels: np.ndarray, second: bool = False) -> tuple[np.ndarray, ...]:
    """Present labels (> 0), their pixel counts and raw moment sums, all int64.
    (`pixel_moments` when the object pixels are known.)

    Returns ``(present, n, sx, sy)``, plus ``(sxx, syy, sxy)`` when ``second``; x = column
    index, y = row index. Float bincounts of integer weights are exact below 2**53, so the
    sums (and products of them, see ``_shape``) are exact integers.
    """
    fg = object_pixels(labels)
    return pixel_moments(labels.ravel()[fg], fg, labels.shape[1], second)


def pixel_moments(lab: np.ndarray, fg: np.ndarray, width: int, second: bool = False) -> tuple[np.ndarray, ...]:
    """`moments` of the foreground pixels: their labels and raveled indices (ascending)."""
    y, x = np.divmod(fg, width)
    n = np.bincount(lab)
    present = np.flatnonzero(n)

    def total(w: np.ndarray) -> np.ndarray:
        return np.bincount(lab, weights=w, minlength=len(n))[present].astype(np.int64)

    out = [present.astype(np.int64), n[present].astype(np.int64), total(x), total(y)]
    if second:
        x, y = x.astype(np.float64), y.astype(np.float64)
        out += [total(x * x), total(y * y), total(x * y)]
    return tuple(out)


def empty_table(*, classes: bool = False, border: bool = False) -> Table:
    """A table with no rows and the columns ``nuclei_table`` returns for the same options."""
    cols = dict(COLUMNS)
    if classes:
        cols.update(class_id=OPTIONAL_COLUMNS["class_id"], class_name=OPTIONAL_COLUMNS["class_name"])
    if border:
        cols["touches_halo_edge"] = OPTIONAL_COLUMNS["touches_halo_edge"]
    return {k: np.empty(0, dtype=dt) for k, dt in cols.items()}


def _select(present: np.ndarray, keep: Iterable[int] | None) -> np.ndarray:
    return present if keep is None else present[np.isin(present, np.asarray(list(keep), dtype=np.int64))]


def nuclei_table(
    labels: np.ndarray,
    prob: np.ndarray | None = None,
    *,
    mpp0: float,
    offset: tuple[float, float] = (0, 0),
    scale: float = 1.0,
    ids: int | Mapping[int, int] = 1,
    keep: Iterable[int] | None = None,
    type_prob: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    border_labels: Iterable[int] | None = None,
    simplify: float = 0.35,
    threshold: float | None = None,
    box: tuple[int, int, int, int] | None = None,
    context: np.ndarray | None = None,
    pixels: tuple[np.ndarray, np.ndarray] | None = None,
    sums: tuple[np.ndarray, ...] | None = None,
) -> Table:
    """One row per nucleus: a level-0 polygon and morphometrics.

    Args:
        labels: (H, W) int instance labels in model pixels, 0 = background (tile-local values:
            ``np.bincount`` over them must fit in memory).
        prob: (H, W) float NP probability in [0, 1] (or None: ``mean_prob`` is NaN).
        mpp0: level-0 um/px. ``scale``: level-0 px per model px; model mpp = ``mpp0 * scale``.
        offset: model-pixel ``(x0, y0)`` of the array's origin in the slide.
        ids: nucleus ids: a start (kept labels, ascending, get ``start, start+1, ...``) or a
            mapping label -> id. ``relabel`` applies the same rule to the raster.
        keep: label values to keep (e.g. `tiles.ownership.ownership`'s result), None: all.
        type_prob: (k, H, W) class probabilities; adds ``class_id`` (argmax of the per-nucleus
            mean) and ``class_name`` (from ``class_names``, else ``str(class_id)``).
        border_labels: labels touching the read box's outer edge (``touches_border``); adds
            the bool column ``touches_halo_edge``.
        simplify: Douglas-Peucker tolerance in model px (0: none), undone for any polygon it
            would make invalid. On MoNuSeg 0.35 keeps polygon areas within 0.2% of the raw
            outline with 3x fewer vertices; 0.5 already moved small ones by up to 10%.
        threshold: the ``prob_threshold`` the labels were cut at. Given with ``prob``, each
            outline vertex moves from half-way between two pixel centres to where ``prob``,
            interpolated between them, crosses it (`subpixel.follow_probability`); None:
            outlines through the pixel-edge midpoints. ``box``: (x0, y0, x1, y1) of the
            pixels whose probability counts (the slide's part of a tile window), None: all.
            ``context``: (H, W) labels of every object of the window, not only the kept
            ones: outlines stay half-way to those too (`subpixel.follow_probability`).
        pixels: (raveled indices (n,) ascending, their labels (n,)) of the object pixels of
            ``labels`` when the caller has them (`labels.relabel_pixels`); ``sums``: with
            them, `moments(labels, second=True)`. Each spares a pass over the tile.

    Returns:
        dict of 1-D numpy arrays, columns ``COLUMNS`` (+ the optional ones asked for), rows by
        ascending label. geometry: shapely Polygons (always valid, single part: the largest
        part of a multi-part nucleus). centroid_x/y: mean pixel centre, level-0 px. area_px:
        pixel count in level-0 px^2; area_um2, perimeter_um (skimage ``perimeter``, 4-conn.),
        equivalent_diameter_um, major/minor_axis_um: from the model-pixel labels. eccentricity:
        of the moment ellipse. solidity: polygon area / its convex hull's area (before
        simplification; cheaper than skimage's convex image, same meaning). orientation:
        skimage's: angle in radians in [-pi/2, pi/2] between the row (y, down) axis and the
        major axis, counter-clockwise as the array is displayed (x right, y down).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    for name, arr in (("prob", prob), ("type_prob", type_prob)):
        if arr is not None and np.shape(arr)[-2:] != labels.shape:
            raise ValueError(f"{name} shape {np.shape(arr)} does not match labels {labels.shape}")
    classes, border = type_prob is not None, border_labels is not None
    fg, fg_labels = (object_pixels(labels), None) if pixels is None else pixels
    fg_labels = labels.ravel()[fg] if fg_labels is None else fg_labels
    if sums is None:
        sums = pixel_moments(fg_labels, fg, labels.shape[1], second=True)
    elif len(sums) != 7:
        raise ValueError("sums must be moments(labels, second=True): 7 arrays")
    present, *sums = sums
    kept = _select(present, keep)
    if len(kept) == 0:
        return empty_table(classes=classes, border=border)
    rows = np.searchsorted(present, kept)
    n, sx, sy, sxx, syy, sxy = (v[rows] for v in sums)
    shape = _shape(n, sx, sy, sxx, syy, sxy)

    mpp = mpp0 * scale
    ox, oy = offset
    geoms, perim, solidity = _outlines(labels, kept, offset, scale, simplify,
                                       prob=prob if threshold is not None else None, threshold=threshold, box=box,
                                       fg=fg, context=context)

    table: Table = {
        "nucleus_id": nucleus_ids(kept, ids),
        "geometry": geoms,
        "centroid_x": (ox + sx / n + 0.5) * scale,
        "centroid_y": (oy + sy / n + 0.5) * scale,
        "area_px": n * scale**2,
        "area_um2": n * mpp**2,
        "perimeter_um": perim * mpp,
        "equivalent_diameter_um": np.sqrt(4 * n / np.pi) * mpp,
        "eccentricity": shape["eccentricity"].astype(np.float32),
        "solidity": solidity.astype(np.float32),
        "major_axis_um": shape["major"] * mpp,
        "minor_axis_um": shape["minor"] * mpp,
        "orientation": shape["orientation"].astype(np.float32),
        "mean_prob": _region_means(fg_labels, fg, prob, kept, n),
    }
    if classes:
        means = np.stack([_region_means(fg_labels, fg, p, kept, n) for p in type_prob])
        cid = means.argmax(axis=0).astype(np.int32)
        names = list(class_names) if class_names is not None else [str(i) for i in range(len(type_prob))]
        table.update(class_id=cid, class_name=np.array([names[i] for i in cid], dtype=object))
    if border:
        table["touches_halo_edge"] = np.isin(kept, np.fromiter(border_labels, dtype=np.int64))
    return table


def _outlines(labels: np.ndarray, kept: np.ndarray, offset: tuple[float, float], scale: float,
              simplify: float, prob: np.ndarray | None = None,
              threshold: float | None = None,
              box: tuple[int, int, int, int] | None = None,
              fg: np.ndarray | None = None,
              context: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per kept label: level-0 polygon (simplified), perimeter in model px (skimage's
    regionprops perimeter, 4-neighbourhood) and solidity (of the unsimplified outline).
    With ``prob`` and ``threshold``, vertices at the probability's crossing. ``fg``:
    ``np.flatnonzero(labels)`` when the caller has it."""
    pad = padded_ranks(labels, kept)  # one padded copy for the outlines and the perimeters
    xy, ring_start, owner = rings(labels, kept, pad)
    if prob is not None and threshold is not None:
        xy = follow_probability(xy, kept[np.repeat(owner, np.diff(ring_start))], labels, prob, threshold, box,
                                context)
    polys = ring_polygons(xy + np.asarray(offset, dtype=np.float64), ring_start, owner, len(kept))
    perim = perimeters(labels, kept, fg, pad)
    # An outline with a single ring is a simple polygon (valid): each of its segments lies
    # inside its own 2x2 square of pixel centres, touching the square's edges only at its two
    # ends, strictly between two centres (`subpixel.MARGIN`), where the ring's neighbouring
    # segments start and end; a saddle's two segments cut opposite corners of their square.
    # So only objects with holes or several parts need GEOS' validity check (~0.002 s/Mpx),
    # and any with a non-finite vertex (a NaN probability).
    several = np.flatnonzero(np.bincount(owner, minlength=len(kept)) > 1)
    raw = clean_polygons(polys, suspects=several if np.isfinite(xy).all() else None)
    hull = shapely.area(shapely.convex_hull(raw))
    solidity = np.divide(shapely.area(raw), hull, out=np.ones(len(kept)), where=hull > 0)
    return scaled_polygons(clean_polygons(raw, simplify, valid=True), scale), perim, solidity


_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2
_NEIGHBOURS = [(-1, 0, 2), (1, 0, 2), (0, -1, 2), (0, 1, 2), (-1, -1, 10), (-1, 1, 10), (1, -1, 10), (1, 1, 10)]


def perimeters(labels: np.ndarray, kept: np.ndarray, fg: np.ndarray | None = None,
               pad: np.ndarray | None = None) -> np.ndarray:
    """skimage's ``measure.perimeter(labels == k)`` (4-neighbourhood) of every ``k`` in
    ``kept`` (sorted labels), float64, in one pass over ``labels`` (H, W) instead of one per
    nucleus. The same arithmetic: a border pixel (of k, with a 4-neighbour that is not k) is
    classed by its border neighbours of the same k (code 1 + 2 per edge + 10 per corner
    neighbour), and each nucleus' histogram of codes is dotted with skimage's weights.
    ``fg``: ``np.flatnonzero(labels)`` when the caller has it; ``pad``:
    `outlines.padded_ranks(labels, kept)` (the outlines read it too).
    """
    w = labels.shape[1]
    # Zero-padded (outside the array counts as "not k", as binary_erosion's border_value=0),
    # each kept label as its rank 1..K, the others as background: equal neighbours stay equal.
    lab = (padded_ranks(labels, kept) if pad is None else pad).ravel()
    # On the object pixels alone (a tile is mostly background): raveled indices into ``lab``.
    fg = object_pixels(lab) if fg is None else fg + 2 * (fg // w) + w + 3
    own = lab[fg]
    on = own != 0
    if not on.all():  # labels not kept (else every label 1..max is kept: a relabelled window)
        fg, own = fg[on], own[on]
    # Border pixels: a 4-neighbour with another label.
    interior = np.ones(len(fg), bool)
    for dr, dc, _ in _NEIGHBOURS[:4]:
        interior &= lab[fg + dr * (w + 2) + dc] == own
    border = np.zeros(len(lab), bool)
    edge = ~interior
    p, own = fg[edge], own[edge]
    border[p] = True
    code = np.ones(len(p), np.int64)
    for dr, dc, weight in _NEIGHBOURS:
        q = p + dr * (w + 2) + dc
        code += weight * (border[q] & (lab[q] == own))
    rank = own.astype(np.int64) - 1
    hist = np.bincount(rank * 50 + code, minlength=50 * len(kept)).reshape(len(kept), 50)
    # Row by row, as skimage dots one histogram: the same float sums, to the last bit (a
    # matrix-vector product sums in another order). Rows as float64 first: the same values.
    return np.fromiter((np.dot(row, _PERIMETER_WEIGHTS) for row in hist.astype(np.float64)), np.float64, len(hist))


def _shape(
    n: np.ndarray, sx: np.ndarray, sy: np.ndarray, sxx: np.ndarray, syy: np.ndarray, sxy: np.ndarray
) -> dict[str, np.ndarray]:
    """Moment-ellipse descriptors per region (int64 moment sums in), as skimage's regionprops.

    skimage's inertia tensor is ``[[a, b], [b, c]]`` with ``a = var(x)``, ``c = var(y)``,
    ``b = -cov(x, y)`` (x = column, y = row). Central moments times ``n**2`` are exact
    integers here, so the ``a == c`` tie of the orientation is decided exactly as skimage does.
    """
    mxx, myy, mxy = n * sxx - sx * sx, n * syy - sy * sy, n * sxy - sx * sy  # n^2 * (co)variance
    nn = (n * n).astype(np.float64)
    a, c, b = mxx / nn, myy / nn, -mxy / nn
    half_gap = np.sqrt(((a - c) / 2) ** 2 + b**2)
    l1 = np.clip((a + c) / 2 + half_gap, 0, None)
    l2 = np.clip((a + c) / 2 - half_gap, 0, None)
    ecc = np.sqrt(1 - np.divide(l2, l1, out=np.ones_like(l1), where=l1 > 0))
    tie = np.where(b < 0, np.pi / 4, -np.pi / 4)
    orient = np.where(mxx == myy, tie, 0.5 * np.arctan2(-2 * b, c - a))
    return {"eccentricity": ecc, "major": 4 * np.sqrt(l1), "minor": 4 * np.sqrt(l2), "orientation": orient}


def _region_means(lab: np.ndarray, fg: np.ndarray, values: np.ndarray | None, kept: np.ndarray,
                  counts: np.ndarray) -> np.ndarray:
    """float32 mean of ``values`` (H, W) over each kept label; NaN when values is None.
    ``lab``, ``fg``: labels and raveled indices of the foreground pixels, ascending (each
    label's sum adds its pixels in the same order as over the whole array: same bits)."""
    if values is None:
        return np.full(len(kept), np.nan, dtype=np.float32)
    weights = np.asarray(values).ravel()[fg].astype(np.float64)
    sums = np.bincount(lab, weights=weights)
    return (sums[kept] / counts).astype(np.float32)
