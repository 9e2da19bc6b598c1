"""Sub-pixel outlines of every object of a label array at once: marching squares in NumPy.

`rings` gives, for each chosen label, the closed rings that scikit-image's
``measure.find_contours(mask, 0.5, fully_connected="high")`` traces on that label's
zero-padded mask, with the same vertices, the same starting vertex, the same direction and
the rings in the same order, so what is built from them (polygons, their simplification) is
bit-identical. One pass over the whole array replaces one ``find_contours`` per object,
whose contour assembly is a Python loop over segments (the cost that mattered).

How skimage's result is reproduced (its ``_get_contour_segments`` + ``_assemble_contours``):

* A 2x2 square of pixel centres is classed by which corners belong to the object (bits ul 1,
  ur 2, ll 4, lr 8), and emits 0-2 segments between edge midpoints (`_SEGMENTS`: skimage's
  table for a binary image at level 0.5, saddles joined as "high" does). Squares are visited
  row by row; within a square, segments in table order: that is the "scan order".
* Each edge midpoint of an object is the end of exactly one of its segments and the start of
  exactly one, so its segments form disjoint cycles (the rings).
* skimage grows chains segment by segment in scan order; a ring closes at its last segment
  in scan order, and the closed ring starts at that segment's end point. Rings are listed in
  the order of their first segment in scan order.
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, depth_first_order

# Per case (bits: ul 1, ur 2, ll 4, lr 8): segments (from, to) as doubled (row, col) offsets
# inside the square, 0 = top / left corner, 2 = bottom / right: skimage's (0.26) with
# vertex_connect_high=True at level 0.5 on 0/1 values (checked in tests/postprocess).
_T, _B, _L, _R = (0, 1), (2, 1), (1, 0), (1, 2)
_SEGMENTS: dict[int, list[tuple[tuple[int, int], tuple[int, int]]]] = {
    1: [(_T, _L)], 2: [(_R, _T)], 3: [(_R, _L)], 4: [(_L, _B)], 5: [(_T, _B)],
    6: [(_L, _T), (_R, _B)], 7: [(_R, _B)], 8: [(_B, _R)], 9: [(_T, _R), (_B, _L)],
    10: [(_B, _T)], 11: [(_B, _L)], 12: [(_L, _R)], 13: [(_T, _R)], 14: [(_L, _T)],
}
_NSEG = np.zeros(16, np.int64)
_SIDES = {_T: 0, _B: 1, _L: 2, _R: 3}
_FROM, _TO = np.zeros((2, 32), np.int8)  # [2 * case + j] -> the side a segment starts / ends on
_FROM_R, _FROM_C = np.zeros((2, 32), np.int64)  # [2 * case + j] -> its start's doubled offsets
for _case, _segs in _SEGMENTS.items():
    _NSEG[_case] = len(_segs)
    for _j, (_f, _t) in enumerate(_segs):
        _FROM[2 * _case + _j], _TO[2 * _case + _j] = _SIDES[_f], _SIDES[_t]
        _FROM_R[2 * _case + _j], _FROM_C[2 * _case + _j] = _f
_OPPOSITE = np.array([1, 0, 3, 2], np.int8)  # the side a neighbour square shares: T <-> B, L <-> R


def padded_ranks(labels: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """(H + 2, W + 2) int32: ``labels`` (H, W) int zero-padded by one pixel, each label of
    ``kept`` (sorted) replaced by its rank 1..K in it, every other label by 0. When ``kept``
    is 1..K and holds every label (a relabelled window), the labels themselves."""
    kept = np.asarray(kept, dtype=np.int64)
    h, w = labels.shape
    top = int(labels.max(initial=0))
    pad = np.zeros((h + 2, w + 2), np.int32)
    if top <= len(kept) and (len(kept) == 0 or kept[-1] == len(kept)):
        pad[1:-1, 1:-1] = labels  # kept is 1..K and holds every label: ranks are the labels
    else:
        lut = np.zeros(max(top, int(kept.max(initial=0))) + 1, np.int32)
        lut[kept] = np.arange(1, len(kept) + 1, dtype=np.int32)
        pad[1:-1, 1:-1] = lut[labels]  # ranks 1..K; labels not kept -> background
    return pad


def rings(labels: np.ndarray, kept: np.ndarray,
          pad: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outline rings of each label in ``kept``, as skimage's ``find_contours`` traces them.

    Args:
        labels: (H, W) int labels, 0 = background.
        kept: sorted int labels to outline (each must occur in ``labels``).
        pad: `padded_ranks(labels, kept)` when the caller has it (`morphometry.perimeters`
            reads it too).

    Returns:
        ``(xy, ring_start, ring_owner)``: xy (V, 2) float64 closed rings one after the other
        (each repeats its first vertex at its end), in pixel-corner coordinates of
        ``labels`` (pixel ``(r, c)`` spans ``[c, c+1) x [r, r+1)``; x = column); ring_start
        (R + 1,) int64 offsets of the rings in ``xy``; ring_owner (R,) int64 index into
        ``kept`` of each ring's label. Rings are grouped by label (in ``kept``'s order) and,
        within a label, in skimage's order.
    """
    kept = np.asarray(kept, dtype=np.int64)
    w = labels.shape[1]
    pad = padded_ranks(labels, kept) if pad is None else pad

    # Squares whose four corners are not all one value: the only ones with segments. A square
    # is named by its top-left pixel's raveled index in ``pad``; on the flat array, "right"
    # and "below" are offsets 1 and w + 2 (contiguous comparisons, ~2x cheaper than of 2-D
    # slices). The squares of the last column would wrap to the next row, but their corners
    # are all padding (0): never picked.
    flat = pad.ravel()
    stride = w + 2
    right = flat[:-1] != flat[1:]  # pixel i differs from i + 1
    below = flat[:-stride] != flat[stride:]  # pixel i differs from i + stride
    m = len(below) - 1  # squares with a pixel below-right
    at = np.flatnonzero(right[:m] | right[stride : stride + m] | below[:m] | below[1 : m + 1])
    a, b, c, d = flat[at], flat[at + 1], flat[at + stride], flat[at + stride + 1]
    # One entry per (square, object among its corners): the object's first corner names it;
    # its case from the six pairwise equalities, computed once (not per corner).
    ab, ac, ad, bc, bd, cd = (x.view(np.uint8) for x in (a == b, a == c, a == d, b == c, b == d, c == d))
    firsts = (a > 0, (b > 0) & (ab == 0), (c > 0) & ((ac | bc) == 0), (d > 0) & ((ad | bd | cd) == 0))
    cases = (1 | (ab << 1) | (ac << 2) | (ad << 3), ab | 2 | (bc << 2) | (bd << 3),
             ac | (bc << 1) | 4 | (cd << 3), ad | (bd << 1) | (cd << 2) | 8)
    # Entries in scan order: by square, then corner (the (m, 4) stacks, raveled).
    entry = np.flatnonzero(np.stack(firsts, 1))
    owner = np.stack((a, b, c, d), 1).ravel()[entry]
    case = np.stack(cases, 1).ravel()[entry]
    # Segments: each entry's first, then a saddle's second right after it; then sorted by
    # object, stably (an object has one entry per square): (object, scan order). By radix
    # on 16 bits when the objects' ranks fit, ~2x cheaper than sorting unique int64 keys.
    nseg = _NSEG[case]
    rep = np.repeat(np.arange(len(entry)), nseg)
    cj = 2 * case[rep].astype(np.int64)
    cj[np.cumsum(nseg)[nseg == 2] - 1] += 1  # 2 * case + j
    owner = owner[rep]
    order = np.argsort(owner.astype(np.uint16 if len(kept) < 2**16 else np.int64), kind="stable")
    owner, square, cj = owner[order].astype(np.int64), at[entry[rep[order]] >> 2], cj[order]
    r0, c0 = np.divmod(square, stride)
    fr, fc = 2 * r0 + _FROM_R[cj], 2 * c0 + _FROM_C[cj]  # doubled padded (row, col) of the start
    # A segment's successor starts where it ends: in the square across its end side, for the
    # same object, on the side that square shares. An object has at most one segment per
    # square ending on a given side and one starting on it, so the segments ending on B, in
    # (object, square) order, and those starting on T, in (object, square) order, are the
    # same list of squares one row apart: matched in order, without a search (and T <-> B,
    # L <-> R, R <-> L likewise).
    start, end = _FROM[cj], _TO[cj]
    succ = np.empty(len(cj), np.int64)
    for side in range(4):
        succ[end == side] = np.flatnonzero(start == _OPPOSITE[side])
    n = len(succ)
    if n == 0:
        return np.zeros((0, 2)), np.zeros(1, np.int64), np.zeros(0, np.int64)
    walk, ring_first, lengths = _walk(succ)
    # Vertices: each segment's start, then the ring's first vertex again.
    rows = np.insert(fr[walk], ring_first + lengths, fr[walk][ring_first])
    cols = np.insert(fc[walk], ring_first + lengths, fc[walk][ring_first])
    # Doubled padded index -> pixel-corner coordinate: / 2 - 1 (padding) + 0.5 (centre -> corner).
    xy = np.stack([cols / 2 - 0.5, rows / 2 - 0.5], axis=1)
    ring_start = np.r_[ring_first + np.arange(len(ring_first)), len(xy)].astype(np.int64)
    return xy, ring_start, owner[walk][ring_first] - 1


def _walk(succ: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rings of the permutation ``succ`` (n,) int64 (segment -> next segment), walked:
    (walk (n,) the segments ring after ring, rings by their first (min) segment, each from
    the segment after its last (max) one; ring_first (R,) and lengths (R,) of the rings in
    ``walk``). In C: the cycles are the graph's components; cut each after its last segment
    and chain the rings in order, and one depth-first walk of that path visits them all."""
    n = len(succ)
    idx = np.arange(n)
    k, ring = connected_components(csr_matrix((np.ones(n, bool), succ, np.arange(n + 1)), shape=(n, n)),
                                   directed=True, connection="weak")
    lo, hi = np.full(k, n), np.zeros(k, np.int64)
    np.minimum.at(lo, ring, idx)
    np.maximum.at(hi, ring, idx)
    order = np.argsort(lo)
    last = hi[order]
    first = succ[last]  # a ring starts after its last segment
    nxt = succ.copy()
    nxt[last[:-1]] = first[1:]  # ... and its last segment leads to the next ring's start
    rows = np.delete(idx, last[-1])  # the very last segment leads nowhere
    path = csr_matrix((np.ones(n - 1, bool), (rows, nxt[rows])), shape=(n, n))
    walk = depth_first_order(path, int(first[0]), directed=True, return_predecessors=False)
    lengths = np.bincount(ring, minlength=k)[order]
    ring_first = np.r_[0, np.cumsum(lengths)[:-1]]
    return walk.astype(np.int64), ring_first, lengths
