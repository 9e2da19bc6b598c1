"""Label-array helpers: one relabel and one nearest resampler for every caller."""
from __future__ import annotations

import numpy as np

from nucleiflow.pipeline.postprocess.labels import relabel_consecutive, resample_nearest


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
