"""Polygons, morphometrics and ownership on tiny hand-made label images (plus MoNuSeg)."""
from __future__ import annotations

import numpy as np
import pytest
import shapely
from skimage import draw, measure

from nucleiflow.pipeline.postprocess import labels as L
from nucleiflow.pipeline.postprocess import morphometry as P
from nucleiflow.pipeline.postprocess.outlines import padded_ranks
from nucleiflow.pipeline.postprocess.polygons import ring_polygons, scaled_polygons
from nucleiflow.pipeline.tiles import ownership as O
from nucleiflow.pipeline.tiles.plan import Box


def square(h: int = 8, w: int = 10, rows=slice(2, 6), cols=slice(3, 7), value: int = 5) -> np.ndarray:
    lab = np.zeros((h, w), np.int32)
    lab[rows, cols] = value
    return lab


def ellipses() -> np.ndarray:
    """A few rotated ellipses, an L and a diagonal bar: shapes with every orientation sign."""
    lab = np.zeros((60, 80), np.int32)
    for i, (r, c, a, b, rot) in enumerate([(12, 12, 8, 4, 0.3), (14, 40, 9, 3, -1.0), (40, 15, 5, 5, 0), (42, 45, 10, 6, 1.4)]):
        rr, cc = draw.ellipse(r, c, a, b, rotation=rot, shape=lab.shape)
        lab[rr, cc] = i + 1
    lab[30:40, 62:65] = 5
    lab[37:40, 65:72] = 5  # an L
    for k in range(8):  # a diagonal bar, top-left to bottom-right
        lab[5 + k, 60 + k : 63 + k] = 6
    return lab


def test_square_polygon_centroid_and_units():
    lab = square()  # 4x4 pixels at rows 2-5, cols 3-6
    t = P.nuclei_table(lab, mpp0=0.25, scale=2.0, offset=(100, 50), simplify=0)
    assert t["nucleus_id"].tolist() == [1]
    # Centre of pixels 3..6 is 5.0 (+ offset 100) model px = 210 level-0 px; y: 4 + 50 -> 108.
    assert t["centroid_x"][0] == 210.0 and t["centroid_y"][0] == 108.0
    assert t["area_px"][0] == 16 * 2**2  # model px^2 -> level-0 px^2 scales by scale**2
    assert t["area_um2"][0] == pytest.approx(16 * 0.5**2)  # model mpp = 0.25 * 2
    poly = t["geometry"][0]
    assert poly.is_valid and isinstance(poly, shapely.Polygon)
    # The outline runs along pixel edges with the 4 corners cut by 1/8 px^2 each.
    assert poly.area == pytest.approx((16 - 4 / 8) * 4)
    assert poly.bounds == (206.0, 104.0, 214.0, 112.0)  # model x 103-107, y 52-56, times 2
    assert t["eccentricity"][0] == 0 and t["solidity"][0] == 1
    assert t["major_axis_um"][0] == pytest.approx(t["minor_axis_um"][0])
    assert t["equivalent_diameter_um"][0] == pytest.approx(np.sqrt(4 * 16 / np.pi) * 0.5)


def test_default_simplify_keeps_area_and_validity():
    lab = ellipses()
    raw = P.nuclei_table(lab, mpp0=1.0, simplify=0)
    simple = P.nuclei_table(lab, mpp0=1.0)
    assert shapely.is_valid(simple["geometry"]).all()
    assert (shapely.get_num_coordinates(simple["geometry"]) < shapely.get_num_coordinates(raw["geometry"])).all()
    np.testing.assert_allclose(shapely.area(simple["geometry"]), shapely.area(raw["geometry"]), rtol=0.02)


def test_l_shape_is_valid_with_exact_area():
    lab = np.zeros((9, 9), np.int32)
    lab[1:7, 1:3] = 1
    lab[5:7, 3:7] = 1  # L: 12 + 8 = 20 px, 5 convex and 1 concave corner
    poly = P.nuclei_table(lab, mpp0=1.0, simplify=0)["geometry"][0]
    assert poly.is_valid and isinstance(poly, shapely.Polygon)
    assert poly.area == pytest.approx(20 - 5 / 8 + 1 / 8)
    assert poly.contains(shapely.Point(1.5, 1.5)) and not poly.contains(shapely.Point(5.5, 2.5))


def test_diagonal_pixels_make_one_polygon_and_parts_keep_the_largest():
    lab = np.zeros((10, 10), np.int32)
    lab[1, 1] = lab[2, 2] = 1  # diagonal neighbours: one part
    lab[5:8, 1:4] = 2
    lab[5, 8] = 2  # a stray pixel of label 2: its largest part is the 3x3 block
    t = P.nuclei_table(lab, mpp0=1.0, simplify=0)
    g1, g2 = t["geometry"]
    assert g1.is_valid and isinstance(g1, shapely.Polygon) and g1.contains(shapely.Point(1.5, 1.5))
    assert g1.contains(shapely.Point(2.5, 2.5))
    assert g2.area == pytest.approx(9 - 0.5) and not g2.contains(shapely.Point(8.5, 5.5))
    assert t["area_px"][1] == 10  # sizes count every pixel of the label


def test_nucleus_with_a_hole_keeps_it():
    lab = np.zeros((7, 7), np.int32)
    lab[1:6, 1:6] = 3
    lab[3, 3] = 0
    poly = P.nuclei_table(lab, mpp0=1.0, simplify=0)["geometry"][0]
    assert poly.is_valid and len(poly.interiors) == 1
    assert not poly.contains(shapely.Point(3.5, 3.5))


def test_morphometrics_match_regionprops():
    lab = ellipses()
    t = P.nuclei_table(lab, mpp0=0.5, scale=1.0)
    props = measure.regionprops(lab)
    assert t["nucleus_id"].tolist() == [1, 2, 3, 4, 5, 6]
    for key, prop, unit in [
        ("area_um2", "area", 0.25),
        ("perimeter_um", "perimeter", 0.5),
        ("equivalent_diameter_um", "equivalent_diameter_area", 0.5),
        ("major_axis_um", "axis_major_length", 0.5),
        ("minor_axis_um", "axis_minor_length", 0.5),
        ("eccentricity", "eccentricity", 1),
        ("orientation", "orientation", 1),
    ]:
        np.testing.assert_allclose(t[key], [getattr(r, prop) * unit for r in props], rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(t["centroid_x"], [r.centroid[1] + 0.5 for r in props])
    np.testing.assert_allclose(t["solidity"], [r.solidity for r in props], atol=0.08)
    # Orientation convention: a bar running from top-left to bottom-right is at +pi/4.
    assert t["orientation"][5] == pytest.approx(np.pi / 4, abs=0.05)


def test_mean_prob_classes_ids_and_border():
    lab = np.zeros((6, 8), np.int32)
    lab[0:2, 0:2] = 4  # touches the border
    lab[3:5, 4:7] = 9
    prob = np.zeros(lab.shape, np.float32)
    prob[lab == 4] = 0.5
    prob[lab == 9] = [0.2, 0.4, 0.6] * 2
    types = np.stack([lab == 4, lab == 9, np.zeros_like(lab, bool)]).astype(np.float32)
    t = P.nuclei_table(
        lab, prob, mpp0=1.0, ids={4: 70, 9: 71}, type_prob=types, class_names=["a", "b", "c"],
        border_labels=O.touches_border(lab),
    )
    assert t["nucleus_id"].tolist() == [70, 71]
    np.testing.assert_allclose(t["mean_prob"], [0.5, 0.4], rtol=1e-6)
    assert t["class_id"].tolist() == [0, 1] and t["class_name"].tolist() == ["a", "b"]
    assert t["touches_halo_edge"].tolist() == [True, False]
    assert O.touches_border(lab).tolist() == [4]


def test_keep_forms_and_relabel_agree_with_ids():
    lab = ellipses()
    kept = np.array([2, 4, 6])
    for keep in (kept, kept.tolist()):
        t = P.nuclei_table(lab, mpp0=1.0, ids=100, keep=keep)
        assert t["nucleus_id"].tolist() == [100, 101, 102]
    assert P.nuclei_table(lab, mpp0=1.0, ids={2: 7, 4: 9, 6: 11}, keep=kept)["nucleus_id"].tolist() == [7, 9, 11]
    ids = L.relabel(lab, kept, 100)
    assert ids.dtype == np.int32 and set(np.unique(ids)) == {0, 100, 101, 102}
    assert (ids[lab == 4] == 101).all() and (ids[lab == 1] == 0).all()


def test_empty_labels_give_an_empty_typed_table():
    t = P.nuclei_table(np.zeros((5, 5), np.int32), mpp0=0.5)
    assert list(t) == list(P.COLUMNS)
    assert all(len(v) == 0 and v.dtype == np.dtype(P.COLUMNS[k]) for k, v in t.items())
    t = P.nuclei_table(square(), mpp0=0.5, keep=[], type_prob=np.zeros((2, 8, 10)), border_labels=[])
    assert list(t) == [*P.COLUMNS, "class_id", "class_name", "touches_halo_edge"]
    assert t["touches_halo_edge"].dtype == bool and t["class_id"].dtype == np.int32


def test_ownership_on_hand_made_arrays():
    lab = np.zeros((6, 8), np.int32)
    lab[1:3, 2:4] = 1  # centroid x = 3.0
    lab[1:3, 3:5] = 2  # centroid x = 4.0: on the core edge, belongs to [4, ...)
    lab[4, 0:5] = 3  # centroid (2.5, 4.5)
    assert O.ownership(lab, (0, 0, 4, 6)).tolist() == [1, 3]
    assert O.ownership(lab, Box(4, 0, 8, 6)).tolist() == [2]
    assert O.ownership(lab, (0, 0, 8, 4)).tolist() == [1, 2]
    assert O.ownership(np.zeros((3, 3), np.int32), (0, 0, 3, 3)).size == 0


@pytest.mark.parametrize("split", [17, 20, 23, 31, 32, 40])
def test_two_tiles_own_every_nucleus_exactly_once(split):
    rng = np.random.default_rng(split)
    lab = np.zeros((40, 64), np.int32)
    for k in range(1, 40):  # random small blobs; later ones overwrite earlier pixels
        r, c = rng.integers(0, 40), rng.integers(0, 64)
        rr, cc = draw.ellipse(r, c, rng.integers(1, 4), rng.integers(1, 4), shape=lab.shape)
        lab[rr, cc] = k
    halo = 8  # > the largest blob: both tiles see any nucleus near the seam whole
    owned = []
    for core in (Box(0, 0, split, 40), Box(split, 0, 64, 40)):
        x0, x1 = max(core.x0 - halo, 0), min(core.x1 + halo, 64)
        crop = lab[:, x0:x1]  # each tile sees the image from its own origin
        local = (core.x0 - x0, 0, core.x1 - x0, 40)
        owned += O.ownership(crop, local).tolist()
    assert sorted(owned) == sorted(set(np.unique(lab)) - {0})  # each exactly once


def test_monuseg_tile_polygons_are_valid(shared_data):
    from PIL import Image

    path = sorted((shared_data / "monuseg" / "labels").glob("*.png"))[0]
    lab = np.array(Image.open(path)).astype(np.int32)
    t = P.nuclei_table(lab, mpp0=0.25, scale=2.0)
    assert len(t["nucleus_id"]) == lab.max()
    assert shapely.is_valid(t["geometry"]).all()
    assert (shapely.get_type_id(t["geometry"]) == 3).all()  # Polygon, never Multi
    ratio = shapely.area(t["geometry"]) / t["area_px"]
    assert 0.9 < ratio.min() and ratio.max() < 1.05  # outlines hug the pixels


def test_perimeters_of_all_nuclei_match_skimage_to_the_bit():
    """One pass over touching labels (an L, a diagonal bar, a hole, single pixels, array edges)
    gives each nucleus exactly what skimage's perimeter gives its mask alone."""
    lab = ellipses()
    lab[0:4, 0:3] = 7  # on the array's corner
    lab[50, 79] = 8  # a single pixel on the right edge
    lab[44:50, 20:26] = 9
    lab[46, 22] = 0  # a hole
    lab[20:30, 38:42] = 10  # touches ellipse 2 with no background between
    kept = np.unique(lab[lab > 0])
    assert kept.tolist() == list(range(1, 11))  # all of 1..max kept (no filtering), then half
    expected = [measure.perimeter(lab == k, neighborhood=4) for k in kept]
    assert P.perimeters(lab, kept).tolist() == expected
    assert P.perimeters(lab, kept[::2]).tolist() == expected[::2]
    fg = np.flatnonzero(lab)  # the caller's foreground indices: same answer
    assert P.perimeters(lab, kept, fg).tolist() == expected
    assert P.perimeters(lab, kept[::2], fg).tolist() == expected[::2]
    # With the padded ranks the outlines read too: same answer.
    for k in (kept, kept[::2], kept[1::3]):
        pad = padded_ranks(lab, k)
        assert P.perimeters(lab, k, fg, pad).tolist() == [expected[i - 1] for i in k]


def test_scaled_is_shapelys_transform():
    polys = np.array([shapely.box(0, 0, 1, 2), shapely.Polygon(),
                      shapely.Polygon([(0, 0), (4, 0), (4, 4), (0, 4)], [[(1, 1), (2, 1), (2, 2), (1, 1)]])],
                     dtype=object)
    got = scaled_polygons(polys, 2.5)
    assert got.dtype == object and all(shapely.equals_exact(got, shapely.transform(polys, lambda xy: xy * 2.5), 0))
    assert got[1].is_empty and len(got[2].interiors) == 1
    assert len(scaled_polygons(np.empty(0, object), 2.0)) == 0


def test_nuclei_table_with_the_callers_pixels_and_moments_is_the_same():
    labels = np.zeros((40, 50), np.int32)
    labels[draw.disk((12, 14), 7, shape=labels.shape)] = 3
    labels[draw.disk((26, 33), 9, shape=labels.shape)] = 5
    labels[30:36, 2:9] = 6
    prob = np.random.default_rng(1).uniform(0.3, 1, labels.shape).astype(np.float32)
    kw = dict(mpp0=0.25, scale=2.0, offset=(4, 8), threshold=0.5)
    plain = P.nuclei_table(labels, prob, **kw)
    fg = np.flatnonzero(labels)
    given = P.nuclei_table(labels, prob, **kw, pixels=(fg, labels.ravel()[fg]), sums=P.moments(labels, second=True))
    for k, v in plain.items():
        if k == "geometry":
            assert all(a.equals_exact(b, 0) for a, b in zip(v, given[k]))
        else:
            np.testing.assert_array_equal(v, given[k])
    with pytest.raises(ValueError):
        P.nuclei_table(labels, prob, **kw, sums=P.moments(labels))


def test_single_ring_outlines_are_valid_polygons():
    """Why `_outlines` checks only objects with several rings: a single ring, moved to the
    probability's crossing or not, is always a valid polygon (saddles, touching objects,
    array edges, probabilities on the threshold included)."""
    from scipy import ndimage as ndi

    from nucleiflow.pipeline.postprocess.outlines import rings
    from nucleiflow.pipeline.postprocess.subpixel import follow_probability

    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(150):
        h, w = rng.integers(4, 40, 2)
        if trial % 3 == 0:
            lab = rng.integers(0, 5, (h, w)).astype(np.int32)
        else:
            lab = ndi.label(ndi.gaussian_filter(rng.random((h, w)), 1.2) > 0.5, np.ones((3, 3)))[0]
            lab = np.where((lab > 0) & (rng.random(lab.shape) < 0.15), lab + 50, lab).astype(np.int32)
        kept = np.unique(lab[lab > 0])
        if not len(kept):
            continue
        xy, start, owner = rings(lab, kept)
        if trial % 4:
            prob = rng.random((h, w)) if trial % 2 else rng.choice([0.0, 0.39, 0.4, 0.41, 1.0], (h, w))
            xy = follow_probability(xy, kept[np.repeat(owner, np.diff(start))], lab, prob, 0.4)
        polys = ring_polygons(xy + rng.integers(0, 3000, 2), start, owner, len(kept))
        single = np.bincount(owner, minlength=len(kept)) == 1
        assert shapely.is_valid(polys[single]).all()
        checked += single.sum()
    assert checked > 300
