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
