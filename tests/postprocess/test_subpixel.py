"""Outline vertices moved to where the interpolated probability crosses the threshold."""
from __future__ import annotations

import numpy as np
from skimage import measure

from nucleiflow.pipeline.postprocess.subpixel import MARGIN, follow_probability


def _rings(labels: np.ndarray, lab: int) -> np.ndarray:
    padded = np.pad((labels == lab).astype(float), 1)
    return np.concatenate([c[:, ::-1] - 0.5 for c in measure.find_contours(padded, 0.5, fully_connected="high")])


def test_vertices_move_to_the_linear_crossing_and_splits_stay():
    labels = np.array([[0, 0, 0, 0, 0],
                       [0, 1, 1, 2, 0],
                       [0, 0, 0, 0, 0]])
    prob = np.array([[0.1, 0.3, 0.1, 0.1, 0.1],
                     [0.1, 0.9, 0.7, 0.9, 0.49],
                     [0.1, 0.1, 0.1, 0.1, 0.1]])
    xy = _rings(labels, 1)
    moved = follow_probability(xy, np.full(len(xy), 1), labels, prob, 0.5)
    got = {tuple(a): tuple(b) for a, b in zip(np.round(xy, 6), np.round(moved, 6))}
    # Above pixel (1, 1): from its centre (1.5, 1.5) up towards (1.5, 0.5): t = 0.4 / 0.6.
    assert np.allclose(got[(1.5, 1.0)], (1.5, 1.5 - 0.4 / 0.6))
    # Left of (1, 1), towards (1, 0) at 0.1: t = 0.4 / 0.8 = 0.5.
    assert np.allclose(got[(1.0, 1.5)], (1.0, 1.5))
    # Below (1, 2) at 0.7 towards 0.1: t = 0.2 / 0.6.
    assert np.allclose(got[(2.5, 2.0)], (2.5, 1.5 + 0.2 / 0.6))
    # Between object 1 and object 2: the split stays half-way.
    assert np.allclose(got[(3.0, 1.5)], (3.0, 1.5))
    xy2 = _rings(labels, 2)
    moved2 = follow_probability(xy2, np.full(len(xy2), 2), labels, prob, 0.5)
    right = {tuple(a): tuple(b) for a, b in zip(np.round(xy2, 6), np.round(moved2, 6))}
    # Right of (1, 3) towards a background pixel at 0.49 (just below): clipped short of its centre.
    assert np.allclose(right[(4.0, 1.5)], (3.5 + 1 - MARGIN, 1.5))
    assert np.allclose(right[(3.0, 1.5)], (3.0, 1.5))


def test_array_edge_and_weak_pixels():
    labels = np.array([[1, 1], [0, 0]])
    prob = np.array([[0.2, 0.8], [0.0, 0.0]])  # (0, 0) is in the object below the threshold
    xy = _rings(labels, 1)
    moved = follow_probability(xy, np.full(len(xy), 1), labels, prob, 0.5)
    got = {tuple(a): tuple(b) for a, b in zip(np.round(xy, 6), np.round(moved, 6))}
    assert np.allclose(got[(0.0, 0.5)], (0.0, 0.5))  # the array's edge: unchanged
    assert np.allclose(got[(0.5, 1.0)], (0.5, 0.5 + MARGIN))  # a weak object pixel: just out of its centre
    assert np.allclose(got[(1.5, 1.0)], (1.5, 0.5 + 0.3 / 0.8))
    assert follow_probability(np.zeros((0, 2)), np.zeros(0, int), labels, prob, 0.5).shape == (0, 2)


def test_area_follows_the_probability_of_a_disc():
    # A disc's probability falls off linearly with the radius: the 0.5 crossing is at r = 6.
    yy, xx = np.mgrid[:21, :21] + 0.5
    r = np.hypot(xx - 10.5, yy - 10.5)
    prob = np.clip(0.5 + (6 - r) / 4, 0, 1)
    labels = (prob >= 0.5).astype(int)
    xy = _rings(labels, 1)
    moved = follow_probability(xy, np.full(len(xy), 1), labels, prob, 0.5)

    def radius_error(p):
        return np.abs(np.hypot(p[:, 0] - 10.5, p[:, 1] - 10.5) - 6)

    assert radius_error(xy).max() > 0.3  # the mask's outline: the pixel grid's staircase
    assert radius_error(moved).max() <= MARGIN + 1e-9  # the pixel exactly at 0.5: kept MARGIN out


def test_pixels_outside_the_box_do_not_count():
    # A nucleus cut by the slide's right edge at x = 3: past it the window holds no slide.
    labels = np.array([[0, 0, 0, 0, 0],
                       [0, 1, 1, 0, 0],
                       [0, 0, 0, 0, 0]])
    prob = np.array([[0.1, 0.1, 0.1, 0.1, 0.1],
                     [0.1, 0.9, 0.9, 0.45, 0.9],
                     [0.1, 0.1, 0.1, 0.1, 0.1]])
    xy = _rings(labels, 1)
    owner = np.full(len(xy), 1)
    free = {tuple(a): tuple(b) for a, b in zip(np.round(xy, 6), follow_probability(xy, owner, labels, prob, 0.5))}
    cut = {tuple(a): tuple(b)
           for a, b in zip(np.round(xy, 6), follow_probability(xy, owner, labels, prob, 0.5, box=(0, 0, 3, 3)))}
    assert free[(3.0, 1.5)][0] > 3.2  # towards the glass at 0.45
    assert np.allclose(cut[(3.0, 1.5)], (3.0, 1.5))  # at the slide's edge: stays on it
    assert np.allclose(cut[(1.0, 1.5)], free[(1.0, 1.5)])  # inside the box: as without one


def test_a_nucleus_only_in_the_context_stops_the_outline_half_way():
    """Object 2 belongs to a neighbour tile (not in the traced labels, only in ``context``):
    object 1's outline stops half-way to it, as the neighbour's outline of 2 does, instead of
    following the probability into it."""
    traced = np.array([[0, 0, 0, 0],
                       [0, 1, 0, 0],
                       [0, 0, 0, 0]])
    context = np.array([[0, 0, 0, 0],
                        [0, 5, 7, 0],
                        [0, 0, 0, 0]])  # other ids: only zero / non-zero counts
    prob = np.array([[0.1, 0.1, 0.1, 0.1],
                     [0.1, 0.9, 0.8, 0.1],
                     [0.1, 0.1, 0.1, 0.1]])
    xy = _rings(traced, 1)
    alone = follow_probability(xy, np.full(len(xy), 1), traced, prob, 0.5)
    beside = follow_probability(xy, np.full(len(xy), 1), traced, prob, 0.5, context=context)
    a = {tuple(p): tuple(q) for p, q in zip(np.round(xy, 6), np.round(alone, 6))}
    b = {tuple(p): tuple(q) for p, q in zip(np.round(xy, 6), np.round(beside, 6))}
    assert a[(2.0, 1.5)][0] > 2.0 + 0.3  # without context: far into the neighbour's pixel
    assert b[(2.0, 1.5)] == (2.0, 1.5)  # with it: half-way
    for k in a:  # every other vertex moves as before
        if k != (2.0, 1.5):
            assert a[k] == b[k]


def _one_vertex(x: float, y: float, owner: int, labels, prob, threshold, box, context) -> tuple[float, float]:
    """follow_probability's rule for one vertex, written out."""
    h, w = labels.shape
    if round(2 * x) % 2 == 0:  # on a vertical corner line: left and right centres
        (r1, c1), (r2, c2) = (int(y), round(x) - 1), (int(y), round(x))
    else:  # on a horizontal one: above and below
        (r1, c1), (r2, c2) = (round(y) - 1, int(x)), (round(y), int(x))
    bx0, by0, bx1, by1 = (0, 0, w, h) if box is None else box
    if not (r1 >= by0 and c1 >= bx0 and r2 < by1 and c2 < bx1):
        return x, y
    first_in = labels[r1, c1] == owner
    (ri, ci), (ro, co) = ((r1, c1), (r2, c2)) if first_in else ((r2, c2), (r1, c1))
    if (labels if context is None else context)[ro, co] != 0:
        return x, y
    p_in, p_out = max(float(prob[ri, ci]), threshold + 1e-3), min(float(prob[ro, co]), threshold - 1e-3)
    t = min(max((p_in - threshold) / (p_in - p_out), MARGIN), 1 - MARGIN)
    s = t if first_in else 1 - t
    return (c1 + 0.5 + s, y) if c1 != c2 else (x, r1 + 0.5 + s)


def test_every_vertex_follows_the_rule_written_out():
    """Random labels with touching objects, a box, a context: each vertex as the scalar rule."""
    from scipy import ndimage as ndi

    from nucleiflow.pipeline.postprocess.outlines import rings

    rng = np.random.default_rng(1)
    for trial in range(12):
        h, w = rng.integers(5, 40, 2)
        lab, _ = ndi.label(ndi.gaussian_filter(rng.random((h, w)), 1.5) > 0.5, np.ones((3, 3)))
        lab = np.where((lab > 0) & (rng.random(lab.shape) < 0.1), lab + 100, lab).astype(np.int32)
        kept = np.unique(lab[lab > 0])[:: 1 + trial % 2]
        if not len(kept):
            continue
        xy, start, ring_owner = rings(lab, kept)
        owner = kept[np.repeat(ring_owner, np.diff(start))]
        prob = rng.random((h, w)).astype(np.float32 if trial % 2 else np.float64)
        box = None if trial % 3 == 0 else (1, 2, int(w) - 1, int(h) - 2)
        context = None if trial % 4 == 0 else np.where(rng.random(lab.shape) < 0.05, 999, lab)
        got = follow_probability(xy, owner, lab, prob, 0.4, box, context)
        want = [_one_vertex(x, y, o, lab, prob, 0.4, box, context) for (x, y), o in zip(xy, owner)]
        np.testing.assert_array_equal(got, np.array(want))
