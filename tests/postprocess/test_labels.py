"""Label-array helpers: one relabel and one nearest resampler for every caller."""
from __future__ import annotations

import numpy as np
import pytest

from nucleiflow.pipeline.postprocess.labels import (object_pixels, relabel, relabel_consecutive, relabel_pixels,
                                                     resample_nearest, upsample_labels)


def test_relabel_consecutive_dtypes_and_paths():
    lab = np.array([[0, 7, 7], [3, 0, 9]])
    np.testing.assert_array_equal(relabel_consecutive(lab), [[0, 2, 2], [1, 0, 3]])
    assert relabel_consecutive(lab).dtype == np.int32 and relabel_consecutive(lab, np.int64).dtype == np.int64
    huge = lab * 10**9  # past the lookup-table range: the np.unique path, same answer
    np.testing.assert_array_equal(relabel_consecutive(huge), relabel_consecutive(lab))
    np.testing.assert_array_equal(relabel_consecutive(np.array([[True, False]])), [[1, 0]])
    np.testing.assert_array_equal(relabel_consecutive(np.array([[5, 5]])), [[1, 1]])  # no background


def test_resample_nearest_by_scale_and_by_shape_agree():
    lab = np.arange(12).reshape(3, 4)
    up = resample_nearest(lab, 6, 8, scale=2.0)
    np.testing.assert_array_equal(up, np.kron(lab, np.ones((2, 2), int)))
    np.testing.assert_array_equal(resample_nearest(lab, 6, 8), up)
    np.testing.assert_array_equal(resample_nearest(up, 3, 4, scale=0.5), lab)
    assert resample_nearest(lab.astype(np.int32), 5, 7, scale=1.7).dtype == np.int32


def test_remove_unsure_by_mean_probability():
    from nucleiflow.pipeline.postprocess.labels import remove_unsure

    labels = np.array([[1, 1, 0, 2, 2], [1, 1, 0, 2, 2], [0, 0, 0, 3, 0]], np.int32)
    prob = np.array([[0.9, 0.8, 0, 0.5, 0.6], [0.7, 0.8, 0, 0.6, 0.7], [0, 0, 0, 0.7, 0]], np.float32)
    # means: 1 -> 0.80, 2 -> 0.60, 3 -> 0.70
    out = remove_unsure(labels, prob, 0.65)
    np.testing.assert_array_equal(out, [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 2, 0]])
    assert out.dtype == np.int32
    np.testing.assert_array_equal(remove_unsure(labels, prob, 0.0), labels)
    assert not remove_unsure(np.zeros((2, 2), np.int32), np.zeros((2, 2)), 0.5).any()


def test_remove_unsure_is_the_whole_array_formula():
    """It works on the object pixels alone; same output as the whole-array bincount and
    relabel it replaced, gaps in the ids included."""
    from nucleiflow.pipeline.postprocess.labels import remove_unsure

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 60, (97, 83)).astype(np.int32)
    labels[labels == 17] = 0  # an id absent from the tile
    labels[rng.random(labels.shape) < 0.6] = 0
    prob = rng.random(labels.shape).astype(np.float32)
    for t in (0.45, 0.5, 0.52):
        area = np.bincount(labels.ravel(), minlength=60)
        total = np.bincount(labels.ravel(), weights=prob.astype(np.float64).ravel(), minlength=60)
        keep = total >= t * area
        keep[0] = False
        want = relabel_consecutive(np.where(keep[labels], labels, 0))
        got = remove_unsure(labels, prob, t)
        assert got.dtype == np.int32 and 0 < got.max() < 58  # some dropped, the rest renumbered
        np.testing.assert_array_equal(got, want)


def test_remove_unsure_pixels_is_remove_unsure_with_its_pixels():
    from nucleiflow.pipeline.postprocess.labels import remove_unsure, remove_unsure_pixels

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 40, (61, 73)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.7] = 0
    prob = rng.random(labels.shape).astype(np.float32)
    fg = object_pixels(labels)
    for t in (0.0, 0.3, 0.5, 0.55):
        out, got_fg, got_lab = remove_unsure_pixels(labels, fg, labels.ravel()[fg], prob, t)
        np.testing.assert_array_equal(out, remove_unsure(labels, prob, t))
        np.testing.assert_array_equal(got_fg, object_pixels(out))
        np.testing.assert_array_equal(got_lab, out.ravel()[got_fg])
        assert out.dtype == got_lab.dtype == np.int32
    empty = np.zeros((3, 4), np.int32)
    out, got_fg, got_lab = remove_unsure_pixels(empty, np.zeros(0, np.int64), np.zeros(0, np.int32), empty, 0.5)
    assert not out.any() and got_fg.size == got_lab.size == 0


def _blobs(scale: float, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Two touching elliptic blobs sampled at pixel centres of an (n*scale)^2 grid:
    (probability float (H, W), the label of the nearer blob centre (H, W) where prob >= 0.5)."""
    size = int(n * scale)
    y, x = (np.mgrid[:size, :size] + 0.5) / scale  # coarse-grid coordinates of the pixel centres
    d1 = np.hypot((x - 15.3) / 7.1, (y - 20.2) / 5.4)
    d2 = np.hypot((x - 26.9) / 6.2, (y - 19.1) / 6.6)
    prob = np.clip(1.4 - np.minimum(d1, d2), 0, 1)
    return prob, np.where(prob >= 0.5, np.where(d1 < d2, 1, 2), 0).astype(np.int32)


def test_upsample_labels_follows_the_probability_not_the_coarse_staircase():
    prob, labels = _blobs(1.0)
    fine_prob, truth = _blobs(2.0)
    near = resample_nearest(labels, 80, 80, scale=2.0)
    up = upsample_labels(labels, prob, 80, 80, 2.0, 0.5)
    assert up.dtype == np.int32 and up.shape == (80, 80)
    wrong_near, wrong_up = int((near != truth).sum()), int((up != truth).sum())
    assert wrong_up < 0.5 * wrong_near, (wrong_up, wrong_near)
    # The split between the touching blobs is the coarse labels' own: no pixel changes owner.
    both = (up > 0) & (near > 0)
    np.testing.assert_array_equal(up[both], near[both])
    # uint8 probability (x 255, as the stitched raster stores it) draws the same outlines.
    q = np.rint(prob * 255).astype(np.uint8)
    assert int((upsample_labels(labels, q, 80, 80, 2.0, 0.5) != up).sum()) <= 4


def test_upsample_labels_is_nearest_when_not_finer():
    prob, labels = _blobs(1.0)
    np.testing.assert_array_equal(upsample_labels(labels, prob, 40, 40, 1.0, 0.5), labels)
    np.testing.assert_array_equal(upsample_labels(labels, prob, 20, 20, 0.5, 0.5),
                                  resample_nearest(labels, 20, 20, 0.5))
    empty = np.zeros_like(labels)
    assert not upsample_labels(empty, prob, 80, 80, 2.0, 0.5).any()  # no object, nothing grows


def test_remove_small_fg_gives_the_object_pixels_left():
    from nucleiflow.pipeline.postprocess.labels import remove_small, remove_small_fg

    lab = np.zeros((6, 7), np.int64)
    lab[0, 0] = 3  # 1 px: goes
    lab[2:4, 2:5] = 5  # 6 px: stays
    lab[5, 5:7] = 1  # 2 px: goes at min_size 3
    for min_size in (0, 1, 3, 7):
        out, fg = remove_small_fg(lab, min_size)
        assert out.dtype == np.int32 and fg.dtype == np.int64
        np.testing.assert_array_equal(out, remove_small(lab, min_size))
        np.testing.assert_array_equal(fg, np.flatnonzero(out))
    assert set(np.unique(remove_small_fg(lab, 3)[0])) == {0, 5}


def test_remove_small_fg_in_place_on_a_fresh_labelling():
    """Given the bool mask it labels (``where``), the labelling is cleaned in place: the same
    result as the copying path; anything but a C-contiguous int32 labelling is refused."""
    from scipy import ndimage as ndi

    from nucleiflow.pipeline.postprocess.labels import remove_small_fg

    mask = np.random.default_rng(6).random((40, 50)) < 0.3
    for min_size in (1, 3, 5):
        lab, _ = ndi.label(mask, structure=np.ones((3, 3)))
        want, want_fg = remove_small_fg(lab, min_size)
        out, fg = remove_small_fg(lab, min_size, where=mask)
        assert out is lab
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(fg, want_fg)
    lab, _ = ndi.label(mask)
    with pytest.raises(ValueError):
        remove_small_fg(lab.astype(np.int64), 3, where=mask)
    with pytest.raises(ValueError):
        remove_small_fg(lab[:, ::2], 3, where=mask[:, ::2])


def test_object_pixels_is_flatnonzero():
    from nucleiflow.pipeline.postprocess.labels import object_pixels

    lab = np.random.default_rng(7).integers(-1, 3, (9, 11)) * (np.arange(11) % 3 > 0)
    for a in (lab, lab.astype(np.int32), lab > 0, lab[:, ::2], np.zeros((0, 4), np.int32)):
        got = object_pixels(a)
        assert got.dtype == np.intp
        np.testing.assert_array_equal(got, np.flatnonzero(a))


def test_relabel_pixels_is_relabel_on_the_object_pixels():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 9, (23, 17)).astype(np.int32) * (rng.random((23, 17)) < 0.4)
    fg = object_pixels(labels)
    for kept, ids in (([2, 5, 8], 1), ([1, 3], {1: 40, 3: 7}), ([], 1), ([9, 12], 100)):
        out, wfg, wlab = relabel_pixels(labels.shape, fg, labels.ravel()[fg], np.array(kept, np.int64), ids)
        want = relabel(labels, np.array(kept, np.int64), ids)
        assert out.dtype == np.int32
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(wfg, np.flatnonzero(want))
        np.testing.assert_array_equal(wlab, want.ravel()[wfg])
