"""Post-processing on small synthetic maps whose answer is known, and on a real MoNuSeg crop."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from nucleiflow.pipeline.train import metrics
from nucleiflow.pipeline.postprocess import watershed as postprocess
from nucleiflow.pipeline.postprocess.labels import relabel_consecutive, remove_small
from nucleiflow.pipeline.postprocess.watershed import (
    distance_watershed,
    hv_watershed,
    marker_watershed,
)

METHODS = ("hv", "marker", "distance")


# --- exact maps from instance labels (what a perfect model would output) ---------------


def exact_hv(labels: np.ndarray) -> np.ndarray:
    """(2, H, W) float32: x (ch 0) and y (ch 1) offsets from each nucleus' centroid,
    negative and positive sides each scaled to [-1, 0] and [0, 1] per nucleus; 0 on bg."""
    hv = np.zeros((2, *labels.shape), np.float32)
    for i, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        yy, xx = np.nonzero(labels[box] == i)
        for ch, d in ((0, xx - xx.mean()), (1, yy - yy.mean())):
            d = d.astype(np.float32)
            if (d < 0).any():
                d[d < 0] /= -d.min()
            if (d > 0).any():
                d[d > 0] /= d.max()
            hv[ch][box][yy, xx] = d
    return hv


def exact_markers(labels: np.ndarray, erode_px: int) -> np.ndarray:
    """(H, W) float32 0/1: each nucleus eroded on its own by ``erode_px`` px."""
    out = np.zeros(labels.shape, np.float32)
    for i in range(1, int(labels.max()) + 1):
        out[ndi.binary_erosion(labels == i, iterations=erode_px)] = 1.0
    return out


def exact_maps(labels: np.ndarray, erode_px: int = 4) -> dict[str, np.ndarray]:
    return {
        "prob": (labels > 0).astype(np.float32),
        "hv": exact_hv(labels),
        "marker": exact_markers(labels, erode_px),
    }


def two_discs(shape=(48, 64), centres=((24, 21), (24, 41)), radius=12) -> np.ndarray:
    """Two overlapping discs; each pixel of the overlap goes to the nearer centre.

    Centres 20 px apart with radius 12: the overlap is a lens whose neck is 2*sqrt(12**2 -
    10**2) ~ 13 px high, against 24 px through each centre.
    """
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d = np.stack([np.hypot(yy - cy, xx - cx) for cy, cx in centres])
    return np.where(d.min(0) <= radius, d.argmin(0) + 1, 0).astype(np.int32)


def assert_valid_labels(labels: np.ndarray, shape: tuple[int, ...]) -> None:
    assert labels.dtype == np.int32
    assert labels.shape == shape
    ids = np.unique(labels)
    np.testing.assert_array_equal(ids, np.arange(ids.size))  # 0 and 1..N, no gaps


# --- helpers ------------------------------------------------------------------------------


def test_remove_small_and_relabel():
    labels = np.array(
        [
            [5, 5, 0, 9, 0],
            [5, 5, 0, 0, 0],
            [0, 0, 0, 2, 2],
        ]
    )
    # Areas: 5 -> 4 px, 9 -> 1 px, 2 -> 2 px. min_size=2 drops only id 9, ids kept.
    kept = remove_small(labels, 2)
    assert kept.dtype == np.int32
    np.testing.assert_array_equal(kept, np.where(labels == 9, 0, labels))
    # Relabelling keeps the order of the ids: 2 -> 1, 5 -> 2.
    np.testing.assert_array_equal(
        relabel_consecutive(kept),
        [[2, 2, 0, 0, 0], [2, 2, 0, 0, 0], [0, 0, 0, 1, 1]],
    )
    # Huge ids go through the sort-based path and give the same answer.
    big = np.where(kept == 5, np.int64(2**40), kept.astype(np.int64))
    np.testing.assert_array_equal(relabel_consecutive(big), relabel_consecutive(kept))


# --- the three watersheds on two touching discs -------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_two_touching_discs_come_apart(method):
    truth = two_discs()
    out = postprocess.postprocess(exact_maps(truth), method)
    assert_valid_labels(out, truth.shape)
    assert out.max() == 2
    # Each disc is one output nucleus, and a good one.
    ious = []
    for i in (1, 2):
        ids, counts = np.unique(out[truth == i], return_counts=True)
        j = ids[np.argmax(counts)]
        assert j != 0
        ious.append(metrics.iou(truth == i, out == j))
    assert min(ious) > 0.8, ious
    # The union itself is kept: nothing of the mask is lost or added.
    np.testing.assert_array_equal(out > 0, truth > 0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("min_mean_prob", [0.0, 0.9])
def test_postprocess_pixels_are_the_labels_object_pixels(method, min_mean_prob):
    truth = two_discs()
    maps = exact_maps(truth)
    maps["prob"] = maps["prob"] * np.linspace(0.8, 1.0, truth.shape[1], dtype=np.float32)  # one disc is unsure
    want = postprocess.postprocess(maps, method, min_mean_prob=min_mean_prob)
    labels, fg, lab = postprocess.postprocess_pixels(maps, method, min_mean_prob=min_mean_prob)
    np.testing.assert_array_equal(labels, want)
    np.testing.assert_array_equal(fg, np.flatnonzero(want))
    np.testing.assert_array_equal(lab, want.ravel()[fg])
    assert lab.dtype == np.int32 and want.max() == (1 if min_mean_prob else 2)
    empty = {k: np.zeros_like(v) for k, v in maps.items()}
    labels, fg, lab = postprocess.postprocess_pixels(empty, method, min_mean_prob=min_mean_prob)
    assert not labels.any() and fg.size == lab.size == 0


@pytest.mark.parametrize("method", METHODS)
def test_empty_prob_gives_no_nuclei(method):
    maps = {"prob": np.zeros((32, 40), np.float32), "hv": np.zeros((2, 32, 40), np.float32),
            "marker": np.zeros((32, 40), np.float32)}
    out = postprocess.postprocess(maps, method)
    assert out.dtype == np.int32
    assert not out.any()


@pytest.mark.parametrize("method", METHODS)
def test_specks_below_min_size_are_removed(method):
    labels = np.zeros((40, 40), np.int32)
    labels[ndi.distance_transform_edt(np.pad([[0]], 20, constant_values=1))[:40, :40] <= 8] = 1
    labels[2:5, 30:33] = 2  # 9 px: below min_size=10
    labels[30:32, 30:35] = 3  # 10 px: kept
    maps = exact_maps(labels, erode_px=1)
    out = postprocess.postprocess(maps, method, min_size=10)
    assert_valid_labels(out, labels.shape)
    assert out.max() == 2
    assert not out[2:5, 30:33].any()
    assert out[30:32, 30:35].all()


def test_marker_watershed_keeps_nuclei_without_markers():
    truth = two_discs()
    truth[40:46, 2:8] = 3  # a separate blob with no marker at all
    maps = exact_maps(truth)
    maps["marker"][40:46, 2:8] = 0
    out = marker_watershed(maps["prob"], maps["marker"])
    assert_valid_labels(out, truth.shape)
    assert out.max() == 3
    assert len(np.unique(out[40:46, 2:8])) == 1 and out[40, 2] > 0


def test_soft_maps_and_thresholds():
    # A soft probability map: the nuclei are where prob >= threshold, not where prob > 0.
    truth = two_discs()
    dist = ndi.distance_transform_edt(truth > 0)
    prob = np.clip(dist / 4, 0, 1).astype(np.float32) * 0.9 + 0.05  # 0.05 on background
    out = distance_watershed(prob, prob_threshold=0.5)
    np.testing.assert_array_equal(out > 0, prob >= 0.5)
    assert out.max() == 2
    marker = exact_markers(truth, 4) * 0.8
    assert marker_watershed(prob, marker, marker_threshold=0.5).max() == 2
    assert marker_watershed(prob, marker, marker_threshold=0.9).max() == 1  # no seeds


def test_dispatch_errors_and_shapes():
    maps = exact_maps(two_discs())
    with pytest.raises(ValueError, match="distance, hv, marker"):
        postprocess.postprocess(maps, "stardist")
    with pytest.raises(ValueError, match="needs maps\\['hv'\\]"):
        postprocess.postprocess({"prob": maps["prob"]}, "hv")
    with pytest.raises(ValueError, match="hv must be"):
        hv_watershed(maps["prob"], maps["hv"][:, :, :10])
    # (1, H, W) maps, as sliced out of a (B, 1, H, W) batch, are accepted.
    batched = {"prob": maps["prob"][None], "marker": maps["marker"][None]}
    np.testing.assert_array_equal(
        postprocess.postprocess(batched, "marker"), postprocess.postprocess(maps, "marker")
    )


# --- real labels --------------------------------------------------------------------------


def test_hv_watershed_recovers_real_nuclei_from_exact_maps(shared_data):
    gt = np.array(Image.open(shared_data / "monuseg" / "labels" / "TCGA-18-5592-01Z-00-DX1.png"))
    # A tile-sized crop: HoVer-Net normalises the Sobel maps by their tile-wide min and max,
    # so on small crops (~300 px) a few large nuclei can lose their markers and merge.
    gt = relabel_consecutive(gt[:512, :512])
    assert gt.max() > 100
    maps = exact_maps(gt)
    out = hv_watershed(maps["prob"], maps["hv"])
    assert_valid_labels(out, gt.shape)
    np.testing.assert_array_equal(out > 0, remove_small(gt, 10) > 0)  # crop cuts some specks
    # Without splitting, touching nuclei merge: the hv maps must do much better than that.
    merged, _ = ndi.label(gt > 0, structure=np.ones((3, 3)))
    assert metrics.aji(gt, merged) < 0.6
    assert metrics.aji(gt, out) > 0.8


def test_fixed_normalisation_is_translation_equivariant(shared_data):
    """Seam-exact stitching needs the same nucleus to come out the same in any window."""
    from nucleiflow.pipeline.train.datasets import read_splits, load_image
    from nucleiflow.pipeline.train.targets import hv_maps

    rec = next(r for r in read_splits(shared_data / "monuseg") if r.split == "train")
    _, inst = load_image(rec, 0.5)
    prob, hv = (inst > 0).astype(np.float32), hv_maps(inst)
    # Far from the window, a background corner with the steepest possible HV jumps (the
    # model may emit those anywhere): it moves a tile-wide min-max, never a fixed scale.
    corner = np.tile(np.r_[np.ones(12), -np.ones(12), np.linspace(-1, 1, 3)], (27, 1))
    hv[0, :27, :27], hv[1, :27, :27] = corner, corner.T
    full = hv_watershed(prob, hv, ksize=11)
    y0, x0, size, margin = 37, 61, 300, 24
    sub = hv_watershed(prob[y0 : y0 + size, x0 : x0 + size], hv[:, y0 : y0 + size, x0 : x0 + size], ksize=11)
    inner = (slice(y0 + margin, y0 + size - margin), slice(x0 + margin, x0 + size - margin))
    a, b = full[inner], sub[margin:-margin, margin:-margin]
    # Compare only objects lying wholly inside the inner window in the full result.
    border = np.unique(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]))
    checked = 0
    for lab in np.unique(a):
        if lab == 0 or lab in border:
            continue
        m = a == lab
        other = np.unique(b[m])
        assert other.size == 1 and other[0] > 0, f"object {lab} split or lost in the window"
        assert np.array_equal(b == other[0], m), f"object {lab} differs between the windows"
        checked += 1
    assert checked > 50


def test_fill_holes_is_scipys_binary_fill_holes():
    from nucleiflow.pipeline.postprocess.binary import fill_holes as _fill_holes

    rings = np.zeros((7, 14), bool)
    rings[1:6, 1:6] = rings[1:6, 8:13] = True
    rings[2:5, 2:5] = rings[2:5, 9:12] = False
    rings[3, 8] = False  # the right ring is open to the background: nothing to fill there
    filled = _fill_holes(rings)
    assert filled[2:5, 2:5].all() and not filled[2:5, 9:12].any()
    assert np.array_equal(filled & ~rings, np.pad(np.ones((3, 3), bool), ((2, 2), (2, 9))))
    # One background part reaching the edge (the comparison path), two (the lookup path), none.
    split = rings.copy()
    split[:, 7] = True
    for m in (rings, split, np.ones((4, 5), bool), np.zeros((4, 5), bool)):
        assert np.array_equal(_fill_holes(m), ndi.binary_fill_holes(m))
    background, n = ndi.label(~split)
    assert n == 4 and _fill_holes(split)[2:5, 8:12].all()  # left, right of the bar; two holes
    rng = np.random.default_rng(0)
    for _ in range(100):
        m = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.random()
        assert np.array_equal(_fill_holes(m), ndi.binary_fill_holes(m))


@pytest.mark.parametrize("method", METHODS)
def test_unsure_objects_are_dropped(method):
    """min_mean_prob keeps a confident nucleus and drops a faint blob that only just passes
    the mask threshold, whatever the method; 0 keeps both."""
    truth = np.zeros((48, 96), np.int32)
    yy, xx = np.mgrid[:48, :96]
    truth[np.hypot(yy - 24, xx - 20) <= 10] = 1
    truth[np.hypot(yy - 24, xx - 70) <= 10] = 2
    maps = exact_maps(truth)
    maps["prob"] = np.where(truth == 1, 0.95, np.where(truth == 2, 0.55, 0.0)).astype(np.float32)
    both = postprocess.postprocess(maps, method, prob_threshold=0.5)
    assert both.max() == 2
    sure = postprocess.postprocess(maps, method, prob_threshold=0.5, min_mean_prob=0.7)
    assert sure.max() == 1 and sure.dtype == np.int32
    np.testing.assert_array_equal(sure > 0, truth == 1)


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_open_disk_is_scipys_opening_with_a_disk(radius):
    from skimage.morphology import disk

    from nucleiflow.pipeline.postprocess.binary import open_disk as _open_disk

    rng = np.random.default_rng(radius)
    for shape in ((41, 57), (1, 9), (7, 1), (2, 3)):  # thin arrays: every pixel on an edge
        for density in (0.3, 0.6, 0.85, 1.0):
            mask = rng.random(shape) < density
            np.testing.assert_array_equal(_open_disk(mask, radius), ndi.binary_opening(mask, structure=disk(radius)))


def test_dense_windows_cover_the_mask_with_exact_margins():
    from nucleiflow.pipeline.postprocess.edge_map import dense_windows

    rng = np.random.default_rng(4)
    mask = ndi.binary_dilation(rng.random((150, 230)) < 0.002, iterations=3)
    mask[0, 0] = mask[-1, 100] = mask[70, -1] = True  # on the array's edges too
    for band in (7, 32, 500):
        covered = np.zeros(mask.shape, bool)
        for rows, cols, ir, ic in dense_windows(mask, margin=6, band=band):
            covered[rows, cols][ir, ic] = True
            # The inner part keeps the margin from every window edge that is not the array's.
            assert rows.start == 0 or ir.start >= 6
            assert cols.start == 0 or ic.start >= 6
            assert rows.stop == mask.shape[0] or rows.stop - rows.start - ir.stop >= 6
            assert cols.stop == mask.shape[1] or cols.stop - cols.start - ic.stop >= 6
        assert covered[mask].all()
    assert dense_windows(np.zeros((9, 9), bool), 6) == []


@pytest.mark.parametrize("ksize", [3, 11])
def test_windowed_dense_maps_are_the_whole_tiles_on_the_mask(ksize):
    """hv_watershed computes its energy and seed candidates only around the mask: the same
    bits there as on the whole tile, so the same labels."""
    from nucleiflow.pipeline.postprocess.edge_map import BAND, hv_edge, hv_energy

    rng = np.random.default_rng(5)
    # Touching discs across a band's edge (edge_map.BAND rows), a block far from them.
    labels = two_discs((200, 200), centres=((BAND - 5, 30), (BAND + 8, 50)), radius=12)
    labels[150:170, 150:185] = 3
    prob = np.clip((labels > 0) * 0.8 + rng.normal(0, 0.2, labels.shape), 0, 1).astype(np.float32)
    hv = np.clip(exact_hv(labels) + rng.normal(0, 0.3, (2, *labels.shape)), -1, 1).astype(np.float32)
    setup = dict(ksize=ksize, normalise="fixed", gradient_range=(-0.8, 0.55))
    mask, _, _ = postprocess._foreground(prob, 0.5, 10)
    whole = hv_energy(prob, hv_edge(hv, **setup), 0.5, 0.4)
    near = postprocess._dense_near(prob, hv, mask, setup, 0.5, 0.4)
    np.testing.assert_array_equal(near[0][mask].view(np.uint32), whole[0][mask].view(np.uint32))
    np.testing.assert_array_equal(near[1][mask], whole[1][mask])
    assert (near[0] == 0).mean() > 0.3  # most of the tile was never computed
    np.testing.assert_array_equal(hv_watershed(prob, hv, ksize=ksize),
                                  hv_watershed(prob, edge=hv_edge(hv, **setup), ksize=ksize))
