"""Training targets on arrays small enough to check by eye."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.draw import disk

from nucleiflow.pipeline.train.targets import (
    dihedral,
    dihedral_hv,
    dihedral_targets,
    hv_maps,
    make_targets,
    shape_markers,
    type_map,
)


def test_hv_horizontal_bar():
    inst = np.array([[0, 0, 0, 0, 0],
                     [0, 1, 1, 1, 0],
                     [0, 0, 0, 0, 0]])
    hv = hv_maps(inst)
    assert hv.shape == (2, 3, 5) and hv.dtype == np.float32
    np.testing.assert_array_equal(hv[0, 1], [0, -1, 0, 1, 0])
    np.testing.assert_array_equal(hv[1], 0)  # one row: no vertical offsets
    np.testing.assert_array_equal(hv[:, 0], 0)  # background
    np.testing.assert_array_equal(hv[:, 2], 0)


def test_hv_square_3x3():
    inst = np.zeros((5, 5), int)
    inst[1:4, 1:4] = 7
    hv = hv_maps(inst)
    np.testing.assert_array_equal(hv[0, 1:4, 1:4], [[-1, 0, 1]] * 3)
    np.testing.assert_array_equal(hv[1, 1:4, 1:4], [[-1] * 3, [0] * 3, [1] * 3])
    assert (hv[:, inst == 0] == 0).all()


def test_hv_uses_exact_centroid_and_scales_sides_separately():
    # Two pixels: the centroid lies between them (HoVer-Net would round it onto one).
    np.testing.assert_array_equal(hv_maps(np.array([[2, 2]]))[0], [[-1, 1]])
    # L shape: pixels (0,0), (0,1), (1,0); centroid (1/3, 1/3); offsets -1/3 and 2/3
    # each scale to magnitude 1 on their own side.
    inst = np.array([[1, 1],
                     [1, 0]])
    hv = hv_maps(inst)
    np.testing.assert_allclose(hv[0], [[-1, 1], [-1, 0]])
    np.testing.assert_allclose(hv[1], [[-1, -1], [1, 0]])


def test_hv_nuclei_are_independent():
    inst = np.array([[1, 1, 1, 2, 2]])
    np.testing.assert_array_equal(hv_maps(inst)[0], [[-1, 0, 1, -1, 1]])
    single = hv_maps(np.array([[0, 0, 0, 3]]))
    np.testing.assert_array_equal(single, 0)  # a 1-pixel nucleus sits on its centroid


def _two_touching_discs(r1=6, r2=9):
    inst = np.zeros((30, 40), np.int32)
    inst[disk((15, 10), r1)] = 1
    inst[disk((15, 10 + r1 + r2 - 1), r2)] = 2  # overlaps disc 1: shares a border
    return inst


def test_markers_inside_and_separate_for_touching_discs():
    inst = _two_touching_discs()
    assert ndi.label(inst > 0)[1] == 1  # the discs touch
    m = shape_markers(inst)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
    assert (inst[m == 1] > 0).all()
    lab, n = ndi.label(m, structure=np.ones((3, 3)))
    assert n == 2
    for i in (1, 2):  # one marker per disc, inside it
        assert len(np.unique(lab[inst == i])) == 2


def test_markers_erode_in_proportion_to_size():
    inst = _two_touching_discs(r1=5, r2=12)
    m = shape_markers(inst, fraction=0.4)
    depth = ndi.distance_transform_edt(inst == 1), ndi.distance_transform_edt(inst == 2)
    # Smallest kept distance to the nucleus edge = erosion depth; bigger disc erodes deeper.
    d1 = depth[0][(m == 1) & (inst == 1)].min()
    d2 = depth[1][(m == 1) & (inst == 2)].min()
    assert d2 > d1 >= 2
    assert 0 < m[inst == 2].sum() < (inst == 2).sum()


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 2), (1, 5)])
def test_tiny_nucleus_keeps_a_marker(shape):
    inst = np.zeros((5, 7), np.int32)
    inst[2:2 + shape[0], 1:1 + shape[1]] = 4
    m = shape_markers(inst)
    assert m.sum() >= 1 and (inst[m == 1] == 4).all()
    assert ndi.label(m, structure=np.ones((3, 3)))[1] == 1


def test_dumbbell_gets_one_marker():
    inst = np.zeros((20, 40), np.int32)
    inst[disk((10, 9), 7)] = 1
    inst[disk((10, 30), 8)] = 1
    inst[9:12, 9:31] = 1  # thin waist that erosion cuts
    m = shape_markers(inst)
    assert ndi.label(m, structure=np.ones((3, 3)))[1] == 1


def test_make_targets_keys_and_dtypes():
    inst = _two_touching_discs()
    t = make_targets(inst.astype(np.uint16), types={1: 2, 2: 1})
    assert t["inst"].dtype == np.int32 and t["mask"].dtype == np.uint8
    assert t["hv"].shape == (2,) + inst.shape and t["hv"].dtype == np.float32
    assert t["marker"].dtype == np.uint8 and t["type"].dtype == np.int64
    np.testing.assert_array_equal(t["mask"], inst > 0)
    assert np.abs(t["hv"]).max() == 1
    assert (t["type"][inst == 1] == 2).all() and (t["type"][inst == 0] == 0).all()
    assert "type" not in make_targets(inst)


def test_type_map_from_pixels_zeroes_background():
    inst = np.array([[0, 1, 1]])
    np.testing.assert_array_equal(type_map(inst, np.array([[3, 3, 2]])), [[0, 3, 2]])
    with pytest.raises(ValueError, match="shape"):
        type_map(inst, np.zeros((2, 2)))


def test_rotating_hv_turns_the_vectors():
    hv = hv_maps(np.array([[1, 1, 1]]))
    r = dihedral_hv(hv, 1, False)  # rot90: the right end (x offset +1) goes to the top
    np.testing.assert_array_equal(r[0], [[0], [0], [0]])
    np.testing.assert_array_equal(r[1], [[-1], [0], [1]])
    f = dihedral_hv(hv, 0, True)  # flip x: offsets mirror
    np.testing.assert_array_equal(f[0], [[-1, 0, 1]])


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_hv_of_augmented_labels_is_augmented_hv(k, flip):
    inst = _two_touching_discs()
    inst[2:5, 30:36] = 3  # a non-square box, off-centre
    inst[20:28, 2:4] = 4
    inst[0, 0] = 5
    t = dihedral_targets(make_targets(inst), k, flip)
    aug = dihedral(inst, k, flip)
    np.testing.assert_array_equal(t["inst"], aug)
    np.testing.assert_allclose(t["hv"], hv_maps(aug), atol=1e-6)
    np.testing.assert_array_equal(t["marker"], shape_markers(aug))
