"""Objects that cannot be nuclei: off the tissue, far too large, or the colour of ink or of a
black scanner border. The one place these thresholds live; `infer.workers.process_tile` is
the one place they are applied (before ownership, so a dropped object is in no output).

Why: tiles are chosen by the tissue mask, but everything in a chosen tile is segmented, and
the model finds blobs on pen marks and black borders beside tissue (~300 objects of 4-6x
nuclear size on a 6k^2 mosaic with pen strokes). Sizes are in um^2, so the rules hold at any mpp.

Thresholds were checked against the 32,262 annotated nuclei of ../shared/data (MoNuSeg,
TNBC, DSB 2018 H&E): none is larger than 322 um^2 (99.9th percentile 133-159 um^2), and no
nucleus' mean colour is green or black by the rules below. Blue ink is *not* judged per
object: haematoxylin itself is blue on some scanners (CMU-1-Small-Region's nuclei have mean
hues down to 179 degrees, saturation 0.4-0.6, like a blue marker's ~225 degrees, 0.8).
Blue pen is left to the tissue region, decided on the thumbnail (`slide.tissue`), where
a nucleus is averaged with the pink around it and a stroke is not.
"""
from __future__ import annotations

import numpy as np

from nucleiflow.pipeline.postprocess.labels import object_pixels
from nucleiflow.pipeline.postprocess.morphometry import moments

MAX_NUCLEUS_UM2 = 500.0  # 1.5x the largest annotated nucleus: bigger blobs are ink, folds, borders
INK_HUES = (70.0, 160.0)  # degrees: green marker; nuclei's mean hue is >= 179 (see above)
INK_SAT = 0.35  # ink is strongly saturated; a pale bluish nucleus is not ink
BLACK_VALUE, BLACK_SAT = 0.25, 0.25  # black marker / scanner border: dark and grey; nuclei keep some colour
REASONS = ("off_tissue", "too_large", "ink_colour")  # run.json's ``dropped`` keys, in the order decided


def mean_hsv(labels: np.ndarray, rgb: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mean colour of each object of ``ids`` in ``labels`` (H, W) over ``rgb`` (H, W, 3)
    uint8, as (len(ids), 3) float64 hue in degrees [0, 360), saturation and value in [0, 1]."""
    flat = labels.ravel()
    fg = object_pixels(flat)  # only object pixels: a window is mostly background
    lab, px = flat[fg], rgb.reshape(-1, 3)[fg].astype(np.float64)
    n = np.bincount(lab, minlength=int(ids.max(initial=0)) + 1).astype(np.float64)
    means = np.stack([np.bincount(lab, weights=px[:, c], minlength=n.size)[ids] for c in range(3)], 1)
    f = means / np.maximum(n[ids, None], 1.0) / 255.0
    mx, mn = f.max(1), f.min(1)
    chroma = mx - mn
    c = np.maximum(chroma, 1e-9)
    r, g, b = f[:, 0], f[:, 1], f[:, 2]
    hue = np.select([mx == r, mx == g], [((g - b) / c) % 6, (b - r) / c + 2], (r - g) / c + 4) * 60.0
    sat = np.where(mx > 0, chroma / np.maximum(mx, 1e-9), 0.0)
    return np.stack([np.where(chroma > 0, hue, 0.0), sat, mx], 1)


def ink_or_black(hsv: np.ndarray) -> np.ndarray:
    """(k,) bool: mean colours (k, 3) from `mean_hsv` that are pen ink or black, not haematoxylin."""
    hue, sat, val = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    ink = (hue >= INK_HUES[0]) & (hue <= INK_HUES[1]) & (sat > INK_SAT)
    return ink | ((val < BLACK_VALUE) & (sat < BLACK_SAT))


def implausible(
    labels: np.ndarray,
    mpp: float,
    *,
    rgb: np.ndarray | None = None,
    region=None,
    offset: tuple[float, float] = (0.0, 0.0),
    candidates: np.ndarray | None = None,
    sums: tuple[np.ndarray, ...] | None = None,
) -> dict[str, np.ndarray]:
    """Objects of ``labels`` that are not nuclei, by reason (each object under its first
    reason in `REASONS`).

    Args:
        labels: (H, W) non-negative int instance labels at ``mpp`` um/px.
        rgb: (H, W, 3) uint8 image under ``labels``; None skips the colour rule.
        region: a `tiles.plan.Region` (model px); objects whose centroid (mean pixel
            centre + ``offset``, the array's origin in model px) lies outside are dropped.
            None skips the rule.
        candidates: ids to judge (default: every object present).
        sums: ``morphometry.moments(labels)`` when the caller has it already.
    Returns:
        ``{reason: sorted int64 ids}`` for every reason in `REASONS`.
    """
    present, n, sx, sy = moments(labels) if sums is None else sums
    if candidates is not None:
        pick = np.isin(present, candidates)
        present, n, sx, sy = present[pick], n[pick], sx[pick], sy[pick]
    decided = np.zeros(present.size, bool)
    out = {}
    for reason in REASONS:
        if reason == "off_tissue" and region is not None and present.size:
            bad = ~region.contains(offset[0] + sx / n + 0.5, offset[1] + sy / n + 0.5)
        elif reason == "too_large":
            bad = n * (mpp * mpp) > MAX_NUCLEUS_UM2
        elif reason == "ink_colour" and rgb is not None and present.size:
            bad = ink_or_black(mean_hsv(labels, rgb, present))
        else:
            bad = np.zeros(present.size, bool)
        out[reason] = present[bad & ~decided]
        decided |= bad
    return out
