"""Macenko stain normalisation and stain augmentation, on real MoNuSeg tiles and on glass."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from nucleiflow.pipeline.slide.stain import (
    StainReference,
    TooLittleTissue,
    fit_macenko,
    normalise,
    stain_augment,
)


def _crop(shared_data, name, size=400):
    with Image.open(shared_data / "monuseg" / "images" / f"{name}.png") as im:
        return np.array(im.convert("RGB"))[:size, :size]


@pytest.fixture(scope="module")
def tile(shared_data):
    return _crop(shared_data, "TCGA-18-5592-01Z-00-DX1")


@pytest.fixture(scope="module")
def other(shared_data):
    return _crop(shared_data, "TCGA-21-5784-01Z-00-DX1")


def test_fit_on_real_tile_orders_h_before_e(tile):
    ref = fit_macenko(tile)
    h, e = ref.stains[:, 0], ref.stains[:, 1]
    np.testing.assert_allclose(np.linalg.norm(ref.stains, axis=0), 1, atol=1e-6)
    # Haematoxylin (blue-purple) absorbs red more than eosin does; eosin (pink) absorbs green most.
    assert h[0] > e[0] + 0.1
    assert h[0] / h[1] > e[0] / e[1]
    assert np.argmax(e) == 1
    assert (ref.max_c > 0.3).all()


def test_reference_round_trips_through_json(tile):
    ref = fit_macenko(tile)
    back = StainReference.from_dict(json.loads(json.dumps(ref.to_dict())))
    np.testing.assert_allclose(back.stains, ref.stains, atol=1e-6)
    np.testing.assert_allclose(back.max_c, ref.max_c, atol=1e-6)
    assert back.io == ref.io
    with pytest.raises(ValueError, match="stains"):
        StainReference.from_dict({"stains": [[1, 2]], "max_c": [1, 1]})


def test_normalising_to_own_reference_changes_little(tile):
    ref = fit_macenko(tile)
    out = normalise(tile, ref)
    assert out.dtype == np.uint8 and out.shape == tile.shape
    own = np.abs(out.astype(int) - tile).mean()
    assert own < 4
    # The same image sent to a clearly different reference moves far more.
    pale = StainReference(ref.stains, ref.max_c / 3, ref.io)
    assert np.abs(normalise(tile, pale).astype(int) - tile).mean() > 3 * own


def test_normalising_undoes_a_stain_change(tile):
    ref = fit_macenko(tile)
    restained = stain_augment(tile, np.random.default_rng(3), sigma1=0.4, sigma2=0.0)
    before = np.abs(restained.astype(int) - tile).mean()
    after = np.abs(normalise(restained, ref).astype(int) - tile).mean()
    assert after < 0.6 * before


def test_normalised_tile_has_the_reference_stains(tile, other):
    ref = fit_macenko(tile)
    src = fit_macenko(other)
    out = fit_macenko(normalise(other, ref))
    before = np.abs(src.stains - ref.stains).sum()
    assert np.abs(out.stains - ref.stains).sum() < 0.2 * before
    np.testing.assert_allclose(out.max_c, ref.max_c, rtol=0.1)


@pytest.mark.parametrize("level", [255, 238])
def test_glass_comes_back_unchanged_without_warnings(level):
    glass = np.full((200, 300, 3), level, np.uint8)
    glass[::7, ::5] -= 6  # a little noise, still far below the tissue threshold
    ref = StainReference.default()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalise(glass, ref)
        with pytest.raises(TooLittleTissue):
            fit_macenko(glass)
    np.testing.assert_array_equal(out, glass)


def test_stain_augment_keeps_shape_dtype_and_is_seeded(tile):
    a = stain_augment(tile, np.random.default_rng(0))
    assert a.dtype == np.uint8 and a.shape == tile.shape
    np.testing.assert_array_equal(a, stain_augment(tile, np.random.default_rng(0)))
    assert not np.array_equal(a, stain_augment(tile, np.random.default_rng(1)))
    assert np.abs(a.astype(int) - tile).mean() > 1


def test_stain_augment_with_zero_sigma_is_identity(tile):
    np.testing.assert_array_equal(stain_augment(tile, np.random.default_rng(0), 0.0, 0.0), tile)


def test_stain_augment_on_tiny_input():
    px = np.array([[[200, 100, 180]]], np.uint8)
    out = stain_augment(px, np.random.default_rng(0))
    assert out.shape == (1, 1, 3) and out.dtype == np.uint8
