"""Outlines at sub-pixel precision: vertices moved to where the probability crosses its threshold.

Outlines traced at 0.5 on a label mask (marching squares) put every vertex half-way between
the centres of an object's pixel and a pixel outside it. The model's probability says more:
linearly interpolated between the two centres, it crosses the post-processing's threshold
somewhere on that segment, and that is where the nucleus ends. `follow_probability` moves
each vertex there, as `labels.upsample_labels` draws the same outline on a finer pixel grid
(`evaluate`), so the GeoParquet polygons and the scores agree.
"""
from __future__ import annotations

import numpy as np

#: Vertices stay this far (as a fraction of the segment) from either pixel centre, so that
#: neighbouring vertices never meet at a centre and pinch the outline.
MARGIN = 0.1


def follow_probability(xy: np.ndarray, owner: np.ndarray, labels: np.ndarray, prob: np.ndarray,
                       threshold: float, box: tuple[int, int, int, int] | None = None,
                       context: np.ndarray | None = None) -> np.ndarray:
    """Vertices of mask outlines moved along their pixel-centre segment to the threshold.

    Args:
        xy: (V, 2) float64 vertices (x, y) in pixel-corner coordinates of ``labels`` (pixel
            ``(r, c)`` spans ``[c, c+1) x [r, r+1)``), each half-way between two 4-neighbour
            pixel centres, as marching squares at 0.5 leaves them.
        owner: (V,) int label of the object each vertex outlines.
        labels: (H, W) int labels the outlines were traced on; prob: (H, W) float NP
            probability in [0, 1]; threshold: the mask threshold it was cut at.
        box: (x0, y0, x1, y1) pixels of ``labels`` whose probability counts (e.g. the part
            of a tile's window inside the slide: past its edge there is nothing); None: all.
        context: (H, W) int labels of *every* object of the window, ``labels``' ones among
            them (e.g. the tile's nuclei that a neighbour tile owns): a vertex next to any of
            them stays half-way too. Without it an outline traced here would bulge into a
            neighbour tile's nucleus, whose own outline stops half-way. None: ``labels``.

    Returns:
        (V, 2) float64: a vertex between an object pixel (value p_in, at least just above the
        threshold) and a background pixel (p_out, at most just below) sits at the fraction
        ``(p_in - threshold) / (p_in - p_out)`` of the way out, clipped to [MARGIN, 1 - MARGIN].
        Vertices between two objects (the watershed's split) or at the edge of ``box`` stay
        half-way, so touching outlines neither overlap nor part.
    """
    xy = np.asarray(xy, np.float64)
    if len(xy) == 0:
        return xy.copy()
    h, w = labels.shape
    x2, y2 = np.rint(2 * xy).astype(np.int64).T  # doubled: >= 0, exactly one of them odd
    across = (x2 & 1) == 0  # x on a pixel corner line: the segment joins a left and a right centre
    # The two pixels: (r1, c1) above / left of the vertex, (r2, c2) below / right;
    # (y2 - 1) // 2 and x2 // 2 - 1 across, y2 // 2 - 1 and (x2 - 1) // 2 else.
    r1 = (y2 >> 1) - 1 + across
    c1 = (x2 >> 1) - across
    r2, c2 = r1 + (~across), c1 + across
    bx0, by0, bx1, by1 = (0, 0, w, h) if box is None else box
    inside = (r1 >= by0) & (c1 >= bx0) & (r2 < by1) & (c2 < bx1)
    # Raveled indices of the two pixels (clipped: outside ``box`` their values are not used).
    i1 = np.clip(r1, 0, h - 1) * w + np.clip(c1, 0, w - 1)
    i2 = np.clip(r2, 0, h - 1) * w + np.clip(c2, 0, w - 1)
    # Which one is the object's (outside ``box`` either: the vertex stays half-way anyway).
    first_in = labels.ravel()[i1] == owner
    i_in, i_out = np.where(first_in, i1, i2), np.where(first_in, i2, i1)
    other = (labels if context is None else context).ravel()[i_out]
    flat_prob = prob.ravel()
    eps = 1e-3
    p_in = np.maximum(flat_prob[i_in].astype(np.float64), threshold + eps)
    p_out = np.minimum(flat_prob[i_out].astype(np.float64), threshold - eps)
    t = np.clip((p_in - threshold) / (p_in - p_out), MARGIN, 1 - MARGIN)
    t[~(inside & (other == 0))] = 0.5
    # The coordinate along the segment (x across, y else), from the first centre: t out of
    # it when it is the object's, else 1 - t.
    moved = np.where(across, c1, r1) + 0.5
    moved += np.where(first_in, t, 1 - t)
    out = xy.copy()
    at = np.arange(1, 2 * len(xy), 2)  # raveled (vertex, 1); (vertex, 0) across
    at -= across
    out.ravel()[at] = moved
    return out
