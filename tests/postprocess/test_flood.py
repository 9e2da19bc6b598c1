"""`flood.seeded_flood`: scikit-image's watershed, flooded only where seeds compete."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from nucleiflow.pipeline.postprocess import flood
from nucleiflow.pipeline.postprocess.flood import seeded_flood
from nucleiflow.pipeline.postprocess.labels import relabel_consecutive

CONN8 = np.ones((3, 3), bool)


def reference(energy: np.ndarray, seeds: np.ndarray, components: np.ndarray) -> np.ndarray:
    """The whole-tile flood `seeded_flood` replaces."""
    mask = components > 0
    out = watershed(energy, markers=np.where(mask, seeds, 0), mask=mask, connectivity=2).astype(np.int32)
    seedless = mask & (out == 0)
    out[seedless] = components[seedless] + out.max()
    return relabel_consecutive(out)


def test_components_by_seed_count():
    # Component A (left) has two seeds, B (middle) one, C (right) none.
    comps = np.zeros((5, 12), np.int32)
    comps[1:4, 0:5], comps[1:4, 6:8], comps[1:4, 9:11] = 1, 2, 3
    seeds = np.zeros_like(comps)
    seeds[2, 0], seeds[2, 4], seeds[2, 7] = 5, 9, 7
    seeds[0, 9] = 4  # outside every component: ignored
    energy = np.zeros(comps.shape)
    energy[:, 2] = 1.0  # a ridge through A's middle column
    got = seeded_flood(energy, seeds, comps)
    # Values before relabelling: A split 5 | 9, B = 7, C = 3 + max seed (9) = 12 -> 1, 3, 2, 4.
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got[2], [1, 1, 1, 3, 3, 0, 2, 2, 0, 4, 4, 0])
    assert set(np.unique(got[1:4, 0:2])) == {1} and set(np.unique(got[1:4, 3:5])) == {3}
    np.testing.assert_array_equal(got, reference(energy, seeds, comps))


def test_empty_and_seedless():
    comps = np.zeros((4, 4), np.int32)
    assert not seeded_flood(np.zeros((4, 4)), np.zeros((4, 4), np.int32), comps).any()
    comps[1:3, 1:3] = 1
    got = seeded_flood(np.zeros((4, 4)), np.zeros((4, 4), np.int32), comps)
    np.testing.assert_array_equal(got, comps)


@pytest.mark.parametrize("seed", range(4))
def test_same_labels_as_the_whole_tile_flood(seed, monkeypatch):
    """Random blobs with random seeds and energy: labels equal the whole-tile watershed's,
    also when the boxes fill several shelves of the canvas."""
    monkeypatch.setattr(flood, "CANVAS_WIDTH", 40)
    rng = np.random.default_rng(seed)
    mask = ndi.gaussian_filter(rng.random((120, 150)), 3) > 0.5
    comps, _ = ndi.label(mask, structure=CONN8)
    seeds, _ = ndi.label(rng.random(mask.shape) > 0.97, structure=CONN8)
    energy = ndi.gaussian_filter(rng.random(mask.shape), 1.5).astype(np.float32)
    got = seeded_flood(energy, seeds, comps)
    np.testing.assert_array_equal(got, reference(energy, seeds, comps))
    assert got.max() > comps.max()  # some components were split


def test_a_seed_cut_in_two_by_the_mask():
    # Seed 3 lies in components 1 and 2 (its pixels between them are outside the mask):
    # component 1 holds it alone (all 3's), component 2 holds it and seed 4 (flooded).
    comps = np.zeros((3, 9), np.int32)
    comps[:, 0:3], comps[:, 4:9] = 1, 2
    seeds = np.zeros_like(comps)
    seeds[1, 2:5] = 3  # (1, 3) is background
    seeds[1, 8] = 4
    # A ridge at column 6 on a gentle slope: no two pixels tie (ties among seeds are
    # ordered by the heap's history, which packing changes: see the module doc).
    energy = np.tile(np.array([0, 0, 0, 0, 0, 0, 1, 0, 0], float), (3, 1)) + np.arange(27).reshape(3, 9) * 1e-3
    got = seeded_flood(energy, seeds, comps)
    np.testing.assert_array_equal(got, reference(energy, seeds, comps))
    assert (got[:, 0:3] == got[1, 4]).all() and (got[:, 7:9] != got[1, 4]).all()


@pytest.mark.parametrize("seed", range(3))
def test_seed_interior_is_the_seeded_pixels_with_nothing_to_flood(seed):
    """seed_interior = seeded pixels whose 3x3 neighbourhood is all seeded or off the mask,
    outside the array counting as off the mask (scipy's erosion with border_value=1)."""
    rng = np.random.default_rng(seed)
    mask = ndi.gaussian_filter(rng.random((60, 70)), 2) > 0.45
    seeded = mask & (ndi.gaussian_filter(rng.random(mask.shape), 2) > 0.5)
    want = seeded & ndi.binary_erosion(seeded | ~mask, structure=CONN8, border_value=1)
    got = flood.seed_interior(seeded, mask)
    np.testing.assert_array_equal(got, want)
    assert got.any() and (seeded & ~got).any()


@pytest.mark.parametrize("seed", range(3))
def test_large_seeds_flood_as_the_whole_tile(seed):
    """Seeds large enough to have interiors (left out of the heap): the same labels."""
    rng = np.random.default_rng(seed)
    mask = ndi.gaussian_filter(rng.random((150, 160)), 4) > 0.48
    comps, _ = ndi.label(mask, structure=CONN8)
    energy = ndi.gaussian_filter(rng.random(mask.shape), 2).astype(np.float32)
    seeds, _ = ndi.label(ndi.binary_erosion(energy < np.quantile(energy, 0.3), iterations=1), structure=CONN8)
    assert flood.seed_interior(seeds > 0, mask).sum() > 100
    got = seeded_flood(energy, seeds, comps)
    np.testing.assert_array_equal(got, reference(energy, seeds, comps))
