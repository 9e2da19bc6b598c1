"""Tile geometry, StarDist `test_big.py` style: cores partition the planned area, one owner per point."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nucleiflow.pipeline.tiles.plan import Box, plan_tiles


def coverage(plan) -> np.ndarray:
    """How many planned cores cover each model pixel: (height, width) int."""
    cov = np.zeros((plan.height, plan.width), dtype=np.int32)
    for t in plan:
        cov[t.core.y0 : t.core.y1, t.core.x0 : t.core.x1] += 1
    return cov


def test_small_hand_example():
    # 10x7 level-0 px at 0.5 um/px, model at 1.0 um/px -> 5x4 model px; tiles of 2 -> 3x2 cores.
    plan = plan_tiles(10, 7, 0.5, 1.0, tile_size=2, halo=1)
    assert (plan.width, plan.height, plan.scale) == (5, 4, 2.0)
    assert [t.core for t in plan] == [
        Box(0, 0, 2, 2), Box(2, 0, 4, 2), Box(4, 0, 5, 2),
        Box(0, 2, 2, 4), Box(2, 2, 4, 4), Box(4, 2, 5, 4),
    ]
    assert plan.tiles[0].read == Box(-1, -1, 3, 3)
    assert plan.grid_shape == (2, 3)
    assert plan.owner(4.5, 3.9).core == Box(4, 2, 5, 4)
    assert plan.owner(5, 0) is None  # past the right edge


@settings(max_examples=150, deadline=None)
@given(
    w=st.integers(1, 300),
    h=st.integers(1, 300),
    tile=st.integers(1, 97),
    halo=st.integers(0, 40),
    ox=st.integers(0, 96),
    oy=st.integers(0, 96),
    scale=st.sampled_from([1.0, 2.0, 0.5, 1.996]),
)
def test_cores_partition_the_slide(w, h, tile, halo, ox, oy, scale):
    origin = (ox % tile, oy % tile)
    plan = plan_tiles(w, h, 0.25, 0.25 * scale, tile_size=tile, halo=halo, origin=origin)
    cov = coverage(plan)
    assert (cov == 1).all(), "every model pixel lies in exactly one core"
    assert plan.planned_area() == plan.width * plan.height
    for t in plan:
        assert 0 < t.core.width <= tile and 0 < t.core.height <= tile
        assert t.read == t.core.grow(halo)
        assert plan.cell_box(t.row, t.col) == t.core
    # The owner of every pixel centre is the tile whose core holds it.
    ys, xs = np.mgrid[0 : plan.height, 0 : plan.width]
    for y, x in zip(ys.ravel()[::7], xs.ravel()[::7]):
        owner = plan.owner(x + 0.5, y + 0.5)
        assert owner is not None and owner.core.contains(x + 0.5, y + 0.5)


@settings(max_examples=60, deadline=None)
@given(
    w=st.integers(40, 400),
    h=st.integers(40, 400),
    tile=st.integers(8, 64),
    seed=st.integers(0, 1000),
)
def test_tissue_filter_keeps_exactly_the_cores_with_tissue(w, h, tile, seed):
    rng = np.random.default_rng(seed)
    # Tissue mask at 4x the model's mpp: each mask pixel is 4 model px.
    tissue = rng.random((-(-h // 4), -(-w // 4))) > 0.9
    full = plan_tiles(w, h, 1.0, 1.0, tile_size=tile, halo=3)
    plan = plan_tiles(w, h, 1.0, 1.0, tile_size=tile, halo=3, tissue=tissue, tissue_mpp=4.0)
    kept = {(t.row, t.col) for t in plan}
    for t in full:
        sub = tissue[t.core.y0 // 4 : -(-t.core.y1 // 4), t.core.x0 // 4 : -(-t.core.x1 // 4)]
        assert ((t.row, t.col) in kept) == bool(sub.any())
    cov = coverage(plan)
    assert cov.max() <= 1, "planned cores never overlap"
    # A point in an unplanned core has no owner; a point in a planned core has exactly that one.
    for t in full:
        owner = plan.owner(t.core.x0, t.core.y0)
        assert (owner is not None) == ((t.row, t.col) in kept)
    assert [t.index for t in plan] == list(range(len(plan)))


def test_no_tissue_plans_nothing():
    plan = plan_tiles(1000, 1000, 0.5, 0.5, tile_size=256, tissue=np.zeros((10, 10), bool), tissue_mpp=50.0)
    assert len(plan) == 0 and plan.owner(10, 10) is None


@pytest.mark.parametrize(
    "kwargs",
    [dict(tile_size=0), dict(halo=-1), dict(origin=(256, 0)), dict(mpp=0.0)],
)
def test_bad_arguments_raise(kwargs):
    args = dict(width0=100, height0=100, mpp0=0.25, mpp=0.5, tile_size=256, halo=8)
    args.update(kwargs)
    with pytest.raises(ValueError):
        plan_tiles(**args)


def test_model_mpp_snaps_to_the_slide_grid_when_within_one_percent():
    # CMU-1 is 0.499 um/px; a 0.5 um/px model runs on its own pixels, not a 0.2% resample.
    plan = plan_tiles(2220, 2967, 0.499, 0.5, tile_size=1024)
    assert (plan.scale, plan.mpp, plan.width) == (1.0, 0.499, 2220)
    plan = plan_tiles(4000, 4000, 0.2497, 0.5, tile_size=1024)
    assert plan.scale == 2.0 and plan.mpp == pytest.approx(0.4994)
    plan = plan_tiles(4000, 4000, 0.3, 0.5, tile_size=1024)  # 1.67x: no snapping
    assert plan.scale == pytest.approx(0.5 / 0.3) and plan.mpp == 0.5
