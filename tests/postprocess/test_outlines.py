"""`outlines.rings` traces what skimage's find_contours traces, object by object, to the bit."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import measure

from nucleiflow.pipeline.postprocess.outlines import padded_ranks, rings


def skimage_rings(labels: np.ndarray, kept: np.ndarray) -> list[list[np.ndarray]]:
    """Per label: find_contours at 0.5 ("high") on its zero-padded crop, in (x, y) corners."""
    out = []
    for lab in kept:
        sl = ndi.find_objects((labels == lab).astype(np.int32))[0]
        mask = np.pad(labels[sl] == lab, 1).astype(float)
        origin = np.array([sl[1].start - 0.5, sl[0].start - 0.5])
        out.append([c[:, ::-1] + origin for c in measure.find_contours(mask, 0.5, fully_connected="high")])
    return out


def by_label(labels: np.ndarray, kept: np.ndarray) -> list[list[np.ndarray]]:
    xy, start, owner = rings(labels, kept)
    out: list[list[np.ndarray]] = [[] for _ in kept]
    for i in range(len(start) - 1):
        out[owner[i]].append(xy[start[i] : start[i + 1]])
    return out


@pytest.mark.parametrize("seed", range(4))
def test_rings_match_find_contours_vertex_for_vertex(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        h, w = rng.integers(1, 14, 2)
        labels = rng.integers(0, 4, (h, w)).astype(np.int32)  # saddles, holes, touching objects
        if rng.random() < 0.5:
            labels = ndi.label(labels > 0)[0].astype(np.int32)
        kept = np.unique(labels[labels > 0])
        if len(kept) > 1 and rng.random() < 0.3:
            kept = kept[::2]  # the others count as background
        if not len(kept):
            continue
        for want, got in zip(skimage_rings(labels, kept), by_label(labels, kept)):
            assert len(want) == len(got)
            for a, b in zip(want, got):
                np.testing.assert_array_equal(a, b)


def test_padded_ranks_and_rings_from_them():
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 9, (17, 23)).astype(np.int32)
    for kept in (np.arange(1, 9), np.array([2, 3, 7]), np.array([1, 8, 12])):  # 12: beyond every label
        pad = padded_ranks(labels, kept)
        want = np.zeros((19, 25), np.int32)
        for rank, k in enumerate(kept, 1):
            want[1:-1, 1:-1][labels == k] = rank
        np.testing.assert_array_equal(pad, want)
        present = kept[np.isin(kept, labels)]
        for a, b in zip(rings(labels, present), rings(labels, present, padded_ranks(labels, present))):
            np.testing.assert_array_equal(a, b)


def test_ring_of_a_ring_shaped_nucleus_and_its_hole():
    labels = np.zeros((7, 7), np.int32)
    labels[1:6, 1:6] = 5
    labels[3, 3] = 0
    xy, start, owner = rings(labels, np.array([5]))
    assert len(start) == 3 and owner.tolist() == [0, 0]
    outer, hole = xy[start[0] : start[1]], xy[start[1] : start[2]]
    assert np.array_equal(outer[0], outer[-1]) and np.array_equal(hole[0], hole[-1])
    assert outer[:, 0].min() == 1.0 and outer[:, 0].max() == 6.0  # along the pixels' edges (corners cut)


def test_no_objects_no_rings():
    xy, start, owner = rings(np.zeros((3, 4), np.int32), np.array([], np.int64))
    assert xy.shape == (0, 2) and start.tolist() == [0] and owner.size == 0


def test_more_objects_than_16_bits_of_ranks():
    """70,225 single-pixel objects: past the 16-bit radix sort, each still its own diamond."""
    labels = np.zeros((530, 530), np.int32)
    labels[::2, ::2] = np.arange(1, 265 * 265 + 1).reshape(265, 265)
    kept = np.arange(1, 265 * 265 + 1)
    xy, start, owner = rings(labels, kept)
    one, _, _ = rings(np.ones((1, 1), np.int32), np.array([1]))
    np.testing.assert_array_equal(start, np.arange(len(kept) + 1) * len(one))
    np.testing.assert_array_equal(owner, np.arange(len(kept)))
    r, c = np.divmod(np.flatnonzero(labels), 530)
    want = one[None] + np.stack([c, r], 1)[:, None, :]
    np.testing.assert_array_equal(xy.reshape(len(kept), len(one), 2), want)
