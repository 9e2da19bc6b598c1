"""Segmentation metrics for nuclei: pixel Dice/IoU, AJI, panoptic quality, detection F1.

Every function takes two label images of the same shape (H, W): ``gt`` and ``pred``, any
integer or bool dtype, 0 = background, any other value = one instance id. Ids need not be
consecutive and their values never matter (every metric is invariant to relabelling).

Object overlaps come from one sparse contingency table (``np.unique`` on paired ids of the
pixels where both images are foreground), so the cost is O(H*W) plus a sort of the
overlapping pixels, never a loop over objects on full images.

Conventions for degenerate inputs: both images empty -> 1.0 (nothing to find, nothing
found); exactly one empty -> 0.0. The same holds for every score below.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from nucleiflow.pipeline.postprocess.labels import relabel_consecutive

__all__ = [
    "aji",
    "detection_scores",
    "dice",
    "iou",
    "panoptic_quality",
    "score_instances",
]


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape or gt.ndim != 2:
        raise ValueError(f"gt and pred must be 2-D of the same shape: {gt.shape}, {pred.shape}")
    return gt, pred


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids -> 1..n (0 stays background): (int64 labels of the same shape, n)."""
    out = relabel_consecutive(labels, np.int64)
    return out, int(out.max(initial=0))


@dataclass(frozen=True)
class _Overlaps:
    """Sparse contingency table of two compact label images.

    ``g``, ``p``: (K,) int64 ids (1-based) of each overlapping pair; ``inter``: (K,) int64
    pixels in common; ``area_g``: (n_gt + 1,) and ``area_p``: (n_pred + 1,) int64 pixel
    counts per id (index 0 = background, unused).
    """

    n_gt: int
    n_pred: int
    g: np.ndarray
    p: np.ndarray
    inter: np.ndarray
    area_g: np.ndarray
    area_p: np.ndarray

    @property
    def union(self) -> np.ndarray:
        return self.area_g[self.g] + self.area_p[self.p] - self.inter

    @property
    def iou(self) -> np.ndarray:
        return self.inter / self.union


def _overlaps(gt: np.ndarray, pred: np.ndarray) -> _Overlaps:
    gt, pred = _check_pair(gt, pred)
    g, n_gt = _compact(gt)
    p, n_pred = _compact(pred)
    both = (g > 0) & (p > 0)
    keys, inter = np.unique(g[both] * (n_pred + 1) + p[both], return_counts=True)
    return _Overlaps(
        n_gt=n_gt,
        n_pred=n_pred,
        g=keys // (n_pred + 1),
        p=keys % (n_pred + 1),
        inter=inter.astype(np.int64),
        area_g=np.bincount(g.ravel(), minlength=n_gt + 1),
        area_p=np.bincount(p.ravel(), minlength=n_pred + 1),
    )


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Pixel Dice of the foregrounds (label > 0): 2|G & P| / (|G| + |P|); both empty -> 1.0."""
    gt, pred = _check_pair(gt, pred)
    g, p = gt > 0, pred > 0
    total = int(g.sum()) + int(p.sum())
    return 1.0 if total == 0 else 2.0 * int((g & p).sum()) / total


def iou(gt: np.ndarray, pred: np.ndarray) -> float:
    """Pixel IoU (Jaccard) of the foregrounds (label > 0): |G & P| / |G | P|; both empty -> 1.0."""
    gt, pred = _check_pair(gt, pred)
    g, p = gt > 0, pred > 0
    union = int((g | p).sum())
    return 1.0 if union == 0 else int((g & p).sum()) / union


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017), as in the MoNuSeg challenge.

    For each ground-truth nucleus G_i, take the overlapping prediction P_j with the highest
    IoU; add |G_i & P_j| to C and |G_i | P_j| to U (a G_i with no overlap adds |G_i| to U).
    A prediction may be picked by several nuclei. Finally every prediction never picked
    adds its area to U. AJI = C / U. Ties in IoU go to the larger intersection, then to the
    lower prediction id. Both empty -> 1.0; one empty -> 0.0.
    """
    return _aji(_overlaps(gt, pred))


def panoptic_quality(
    gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5
) -> tuple[float, float, float]:
    """Panoptic quality (Kirillov et al. 2019) of instance labels -> ``(pq, dq, sq)``.

    Matches are (G, P) pairs with IoU > ``iou_threshold``. DQ = TP / (TP + FP/2 + FN/2),
    SQ = mean IoU of the matches (0.0 without matches), PQ = DQ * SQ.
    Both empty -> (1.0, 1.0, 1.0); no match otherwise -> (0.0, 0.0, 0.0).
    """
    return _panoptic_quality(_overlaps(gt, pred), iou_threshold)


def detection_scores(
    gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5
) -> tuple[float, float, float]:
    """Object detection ``(precision, recall, f1)`` with the same matches as PQ.

    precision = TP / #pred, recall = TP / #gt, f1 = 2TP / (#pred + #gt) (equal to DQ).
    Both empty -> (1.0, 1.0, 1.0); a score whose denominator is 0 otherwise -> 0.0.
    """
    return _detection_scores(_overlaps(gt, pred), iou_threshold)


def score_instances(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """All scores of one image: keys dice, iou, aji, pq, dq, sq, precision, recall, f1."""
    ov = _overlaps(gt, pred)  # shared by the object scores: it is the costly part
    pq, dq, sq = _panoptic_quality(ov, 0.5)
    precision, recall, f1 = _detection_scores(ov, 0.5)
    return {
        "dice": dice(gt, pred),
        "iou": iou(gt, pred),
        "aji": _aji(ov),
        "pq": pq,
        "dq": dq,
        "sq": sq,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def _aji(ov: _Overlaps) -> float:
    if ov.n_gt == 0 and ov.n_pred == 0:
        return 1.0
    if ov.n_gt == 0 or ov.n_pred == 0:
        return 0.0
    c = u = 0
    if ov.g.size:
        # Sort pairs by gt id, best first; the first pair of each gt id is its pick.
        order = np.lexsort((ov.p, -ov.inter, -ov.iou, ov.g))
        g_sorted = ov.g[order]
        first = order[np.r_[True, g_sorted[1:] != g_sorted[:-1]]]
        c = int(ov.inter[first].sum())
        u = int(ov.union[first].sum())
        picked_g, picked_p = ov.g[first], ov.p[first]
    else:
        picked_g = picked_p = np.zeros(0, np.int64)
    unmatched_gt = np.ones(ov.n_gt + 1, bool)
    unmatched_gt[np.r_[0, picked_g]] = False
    unused_pred = np.ones(ov.n_pred + 1, bool)
    unused_pred[np.r_[0, picked_p]] = False
    u += int(ov.area_g[unmatched_gt].sum()) + int(ov.area_p[unused_pred].sum())
    return c / u


def _matches(ov: _Overlaps, iou_threshold: float) -> np.ndarray:
    """IoUs (M,) float64 of the one-to-one matches with IoU > iou_threshold.

    At a threshold >= 0.5 the matching is unique by construction (two objects cannot both
    overlap a third by more than half of their union); below it, an optimal assignment.
    """
    iou_ = ov.iou
    keep = iou_ > iou_threshold
    if iou_threshold >= 0.5 or not keep.any():
        return iou_[keep]
    g_ids, g_idx = np.unique(ov.g[keep], return_inverse=True)
    p_ids, p_idx = np.unique(ov.p[keep], return_inverse=True)
    cost = np.zeros((g_ids.size, p_ids.size))
    cost[g_idx, p_idx] = -iou_[keep]
    rows, cols = linear_sum_assignment(cost)
    matched = -cost[rows, cols]
    return matched[matched > iou_threshold]


def _panoptic_quality(ov: _Overlaps, iou_threshold: float) -> tuple[float, float, float]:
    if ov.n_gt == 0 and ov.n_pred == 0:
        return 1.0, 1.0, 1.0
    matched = _matches(ov, iou_threshold)
    tp = matched.size
    if tp == 0:
        return 0.0, 0.0, 0.0
    fp, fn = ov.n_pred - tp, ov.n_gt - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(matched.mean())
    return dq * sq, dq, sq


def _detection_scores(ov: _Overlaps, iou_threshold: float) -> tuple[float, float, float]:
    if ov.n_gt == 0 and ov.n_pred == 0:
        return 1.0, 1.0, 1.0
    tp = _matches(ov, iou_threshold).size
    precision = tp / ov.n_pred if ov.n_pred else 0.0
    recall = tp / ov.n_gt if ov.n_gt else 0.0
    f1 = 2 * tp / (ov.n_pred + ov.n_gt)
    return precision, recall, f1
