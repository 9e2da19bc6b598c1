"""Metrics on tiny hand-written label images, plus a check against a slow reference on MoNuSeg."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from nucleiflow.pipeline.train import metrics

KEYS = {"dice", "iou", "aji", "pq", "dq", "sq", "precision", "recall", "f1"}

# One nucleus found and over-covered, one missed, one false speck.
GT_A = np.array(
    [
        [0, 1, 1, 0, 0, 0],
        [0, 1, 1, 0, 2, 2],
        [0, 0, 0, 0, 2, 2],
        [0, 0, 0, 0, 0, 0],
    ]
)
PRED_A = np.array(
    [
        [0, 5, 5, 5, 0, 0],
        [0, 5, 5, 5, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 7, 0],
    ]
)
# By hand: |G| = 8, |P| = 7, |G & P| = 4 (all of gt 1, inside pred 5).
#   dice = 2*4 / (8+7) = 8/15; iou = 4 / (8+7-4) = 4/11.
#   AJI: gt 1 -> pred 5: C += 4, U += 4+6-4 = 6; gt 2 overlaps nothing: U += 4;
#        pred 7 never picked: U += 1.  AJI = 4 / 11.
#   PQ: (1, 5) has IoU 4/6 > 0.5: TP = 1, FP = 1 (pred 7), FN = 1 (gt 2).
#        DQ = 1 / (1 + 1/2 + 1/2) = 1/2, SQ = 2/3, PQ = 1/3.
#   precision = 1/2, recall = 1/2, f1 = 1/2.
EXPECTED_A = {
    "dice": 8 / 15,
    "iou": 4 / 11,
    "aji": 4 / 11,
    "pq": 1 / 3,
    "dq": 1 / 2,
    "sq": 2 / 3,
    "precision": 1 / 2,
    "recall": 1 / 2,
    "f1": 1 / 2,
}


def assert_scores(got: dict[str, float], expected: dict[str, float]) -> None:
    assert set(got) == KEYS
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k


def test_hand_example():
    assert_scores(metrics.score_instances(GT_A, PRED_A), EXPECTED_A)
    assert metrics.dice(GT_A, PRED_A) == pytest.approx(8 / 15)
    assert metrics.iou(GT_A, PRED_A) == pytest.approx(4 / 11)
    assert metrics.aji(GT_A, PRED_A) == pytest.approx(4 / 11)
    assert metrics.panoptic_quality(GT_A, PRED_A) == pytest.approx((1 / 3, 1 / 2, 2 / 3))
    assert metrics.detection_scores(GT_A, PRED_A) == pytest.approx((1 / 2, 1 / 2, 1 / 2))


def test_relabelling_and_dtypes_do_not_change_scores():
    # Same objects, ids permuted, not consecutive, in other dtypes; one id beyond 2**31
    # exercises the sort-based relabelling instead of the lookup table.
    gt = np.select([GT_A == 1, GT_A == 2], [42, 7], 0).astype(np.uint16)
    pred = np.select([PRED_A == 5, PRED_A == 7], [3, 60000], 0).astype(np.int32)
    assert_scores(metrics.score_instances(gt, pred), EXPECTED_A)
    pred_big = np.select([PRED_A == 5, PRED_A == 7], [2**31 + 5, 1], 0).astype(np.uint32)
    assert_scores(metrics.score_instances(gt, pred_big), EXPECTED_A)
    # Swapping gt and pred swaps precision and recall and keeps the symmetric scores.
    swapped = metrics.score_instances(PRED_A, GT_A)
    for k in ("dice", "iou", "pq", "dq", "sq", "f1"):
        assert swapped[k] == pytest.approx(EXPECTED_A[k])


def test_split_nucleus():
    gt = np.array(
        [
            [0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ]
    )
    pred = np.array(
        [
            [0, 0, 0, 0, 0, 0],
            [0, 3, 3, 3, 9, 0],
            [0, 3, 3, 3, 9, 0],
            [0, 0, 0, 0, 0, 0],
        ]
    )
    # |G| = 8; pred 3 has 6 px (IoU 6/8), pred 9 has 2 px (IoU 2/8).
    # AJI: gt 1 -> pred 3: C = 6, U = 8; pred 9 unused: U += 2 -> 6/10.
    # PQ: match (1, 3) at 0.75; FP = 1 (pred 9). DQ = 1/1.5, SQ = 3/4, PQ = 1/2.
    # Foreground is identical: dice = iou = 1.
    assert_scores(
        metrics.score_instances(gt, pred),
        {"dice": 1, "iou": 1, "aji": 0.6, "pq": 0.5, "dq": 2 / 3, "sq": 0.75,
         "precision": 0.5, "recall": 1.0, "f1": 2 / 3},
    )


def test_split_in_halves_is_not_a_match():
    gt = np.array([[1, 1, 1, 1], [1, 1, 1, 1]])
    pred = np.array([[2, 2, 5, 5], [2, 2, 5, 5]])
    # Both halves have IoU exactly 4/8 = 0.5, which is not > 0.5: no match at all.
    # AJI: the tie goes to the lower id (pred 2): C = 4, U = 8; pred 5 unused: U += 4 -> 1/3.
    assert metrics.panoptic_quality(gt, pred) == (0.0, 0.0, 0.0)
    assert metrics.detection_scores(gt, pred) == (0.0, 0.0, 0.0)
    assert metrics.aji(gt, pred) == pytest.approx(1 / 3)


def test_aji_picks_by_iou_not_by_overlap():
    gt = np.array(
        [
            [0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ]
    )
    pred = np.array(
        [
            [3, 3, 3, 0, 0, 0],
            [3, 3, 3, 8, 0, 0],
            [3, 3, 3, 8, 0, 0],
            [3, 3, 3, 0, 0, 0],
        ]
    )
    # |G| = 6. Pred 3 (12 px) covers 4 of them: IoU 4/14. Pred 8 (2 px) covers 2: IoU 2/6.
    # The larger overlap is not the best IoU: gt 1 picks pred 8: C = 2, U = 6;
    # pred 3 unused: U += 12. AJI = 2/18. (Picking pred 3 would give 4/16.)
    assert metrics.aji(gt, pred) == pytest.approx(1 / 9)
    assert metrics.panoptic_quality(gt, pred) == (0.0, 0.0, 0.0)


def test_merged_pair():
    gt = np.array(
        [
            [0, 0, 0, 0, 0, 0],
            [1, 0, 2, 2, 2, 2],
            [1, 0, 2, 2, 2, 2],
            [0, 0, 0, 0, 0, 0],
        ]
    )
    pred = np.array(
        [
            [0, 0, 0, 0, 0, 0],
            [4, 4, 4, 4, 4, 4],
            [4, 4, 4, 4, 4, 4],
            [0, 0, 0, 0, 0, 0],
        ]
    )
    # |G1| = 2, |G2| = 8, |P| = 12. dice = 2*10/22, iou = 10/12.
    # AJI: both nuclei pick pred 4 (IoU 2/12 and 8/12): C = 2 + 8, U = 12 + 12 -> 10/24.
    # PQ: only (2, 4) at 8/12 > 0.5: TP = 1, FN = 1. DQ = 1/1.5, SQ = 2/3, PQ = 4/9.
    expected = {"dice": 10 / 11, "iou": 5 / 6, "aji": 5 / 12, "pq": 4 / 9, "dq": 2 / 3,
                "sq": 2 / 3, "precision": 1.0, "recall": 0.5, "f1": 2 / 3}
    assert_scores(metrics.score_instances(gt, pred), expected)
    # A low threshold makes (1, 4) a candidate too, but the matching stays one-to-one.
    pq_low = metrics.panoptic_quality(gt, pred, iou_threshold=0.1)
    assert pq_low == pytest.approx((4 / 9, 2 / 3, 2 / 3))


def test_empty_images():
    empty = np.zeros_like(GT_A)
    zeros = dict.fromkeys(KEYS, 0.0)
    assert_scores(metrics.score_instances(GT_A, empty), zeros)
    assert_scores(metrics.score_instances(empty, PRED_A), zeros)
    assert_scores(metrics.score_instances(empty, empty), dict.fromkeys(KEYS, 1.0))


def test_masks_and_shape_check():
    g = GT_A > 0
    p = PRED_A > 0
    assert metrics.dice(g, p) == pytest.approx(8 / 15)
    # As instance maps, bool masks are one object each: IoU 4/11 is no match.
    assert metrics.aji(g, p) == pytest.approx(4 / 11)
    with pytest.raises(ValueError, match="same shape"):
        metrics.dice(GT_A, PRED_A[:, :5])


# --- independent check on real labels ------------------------------------------------


def slow_scores(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Straight from the definitions, one boolean mask per object. Slow, obviously right."""
    gs = [gt == i for i in np.unique(gt) if i != 0]
    ps = [pred == j for j in np.unique(pred) if j != 0]
    inter = np.array([[np.logical_and(g, p).sum() for p in ps] for g in gs], float)
    union = np.array([[np.logical_or(g, p).sum() for p in ps] for g in gs], float)
    iou = inter / union

    c = u = 0.0
    used = set()
    for i, g in enumerate(gs):
        if inter[i].max() == 0:
            u += g.sum()
            continue
        j = int(np.argmax(iou[i]))
        c += inter[i, j]
        u += union[i, j]
        used.add(j)
    u += sum(p.sum() for j, p in enumerate(ps) if j not in used)

    pairs = [(i, j) for i in range(len(gs)) for j in range(len(ps)) if iou[i, j] > 0.5]
    tp = len(pairs)
    fp, fn = len(ps) - tp, len(gs) - tp
    sq = sum(iou[i, j] for i, j in pairs) / tp
    dq = tp / (tp + fp / 2 + fn / 2)
    fg_g, fg_p = gt > 0, pred > 0
    both = np.logical_and(fg_g, fg_p).sum()
    return {
        "dice": 2 * both / (fg_g.sum() + fg_p.sum()),
        "iou": both / np.logical_or(fg_g, fg_p).sum(),
        "aji": c / u,
        "pq": dq * sq,
        "dq": dq,
        "sq": sq,
        "precision": tp / len(ps),
        "recall": tp / len(gs),
        "f1": 2 * tp / (len(gs) + len(ps)),
    }


def erode_each(labels: np.ndarray) -> np.ndarray:
    """Erode every object by 1 px: keep pixels whose 3x3 neighbourhood is all one id."""
    same = ndi.grey_erosion(labels, size=3) == ndi.grey_dilation(labels, size=3)
    return np.where(same, labels, 0)


def shift(labels: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(labels)
    out[dy:, dx:] = labels[: labels.shape[0] - dy, : labels.shape[1] - dx]
    return out


@pytest.mark.parametrize(
    "name",
    ["TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1"],
)
def test_agrees_with_slow_reference_on_monuseg(shared_data, name):
    gt = np.array(Image.open(shared_data / "monuseg" / "labels" / f"{name}.png"))
    gt = gt[300:600, 300:600]  # keeps the slow reference at ~1 s
    assert len(np.unique(gt)) > 20
    for pred in (shift(gt, 1, 0), shift(gt, 3, 2), erode_each(gt)):
        fast = metrics.score_instances(gt, pred)
        slow = slow_scores(gt, pred)
        for k in KEYS:
            assert fast[k] == pytest.approx(slow[k], abs=1e-6), k
        # The perturbations are mild but real: scores below 1, most nuclei still matched.
        assert 0.3 < fast["aji"] < 1.0 and fast["recall"] > 0.5
