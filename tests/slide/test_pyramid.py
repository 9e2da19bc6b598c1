"""The lazy slide pyramid: indexing reads exactly what numpy slicing of the whole level gives."""
from __future__ import annotations

import numpy as np
import pytest

from nucleiflow.pipeline.slide.pyramid import SlideLevel, pyramid_mpps, slide_pyramid
from nucleiflow.pipeline.slide.reader import ArraySlide, open_slide


@pytest.fixture(scope="module")
def array_slide() -> tuple[np.ndarray, ArraySlide]:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    return a, ArraySlide(a, mpp=0.25)


@pytest.mark.parametrize("key", [
    (slice(None),), (slice(10, 50), slice(7, 400)), (slice(3, 200, 7), slice(None, None, 3), 1),
    (5,), (-1, slice(-20, None)), (slice(290, 400), slice(480, 999)), (slice(50, 10), slice(None)),
    (0, 0, 0), (slice(1, 2), 499, slice(0, 2)),
])
def test_level_0_indexes_like_the_array(array_slide, key):
    a, slide = array_slide
    level = SlideLevel(slide, 0.25)
    assert level.shape == a.shape and level.dtype == np.uint8
    got = level[key]
    np.testing.assert_array_equal(got, a[key])


def test_bad_indices_raise(array_slide):
    _, slide = array_slide
    level = SlideLevel(slide, 0.25)
    for key in [(300,), (slice(None), -501), (slice(None, None, -1),), (Ellipsis,), ([1, 2],)]:
        with pytest.raises(IndexError):
            level[key]


def test_coarser_level_is_the_reader_at_that_mpp(array_slide):
    a, slide = array_slide
    level = SlideLevel(slide, 1.0)  # 4x coarser: 75 x 125 px
    assert level.shape == (75, 125, 3)
    np.testing.assert_array_equal(level[10:30, 20:60], slide.read(80, 40, 40, 20, 1.0))


def test_pyramid_of_the_real_slide(cmu_slide):
    with open_slide(cmu_slide) as reader:
        info = reader.info
        # One scanned level (0.499 um/px, 2220 x 2967 px), then halvings until <= 2048 px.
        assert pyramid_mpps(reader) == [info.mpp_x, 2 * info.mpp_x]
        levels = slide_pyramid(reader)
        assert [lv.shape for lv in levels] == [(2967, 2220, 3), (1484, 1110, 3)]
        region = np.asarray(levels[0][1000:1600, 700:1500])  # crosses dask chunk borders
        np.testing.assert_array_equal(region, reader.read(700, 1000, 800, 600, info.mpp_x))
        assert region.std() > 10  # tissue, not white glass
