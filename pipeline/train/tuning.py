"""Choose post-processing thresholds on validation images (never on the test split).

The model runs once per image; each candidate setting only re-runs the watershed. Images
are small annotated tiles, so each is predicted whole (padded like a tile), at the model's
mpp, and scored at the image's own resolution, as `evaluation.evaluate` does.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from nucleiflow.pipeline.train.datasets import read_pair, read_splits
from nucleiflow.pipeline.infer.predictor import Predictor
from nucleiflow.pipeline.train.metrics import aji
from nucleiflow.pipeline.postprocess.watershed import postprocess
from nucleiflow.pipeline.postprocess.labels import resample_nearest
from nucleiflow.pipeline.slide.reader import ArraySlide
from nucleiflow.pipeline.tiles.plan import plan_tiles

GRIDS: dict[str, dict[str, Sequence[float]]] = {
    "hv": {"prob_threshold": (0.4, 0.5, 0.6), "marker_threshold": (0.3, 0.4, 0.5, 0.6)},
    "marker": {"prob_threshold": (0.4, 0.5, 0.6), "marker_threshold": (0.3, 0.5, 0.7)},
    "distance": {"prob_threshold": (0.4, 0.5, 0.6), "min_distance": (2, 3, 5)},
}


def _maps(predictor: Predictor, rgb: np.ndarray, mpp: float, pad: int = 64) -> tuple[dict, float, tuple]:
    """Model maps of a whole image at the model's mpp, with ``pad`` px of white context."""
    slide = ArraySlide(rgb, mpp=mpp)
    plan = plan_tiles(rgb.shape[1], rgb.shape[0], mpp, predictor.card.mpp)  # same mpp snapping as tiles
    scale, h, w = plan.scale, plan.height, plan.width
    side = int(np.ceil((max(h, w) + 2 * pad) / 32) * 32)
    window = slide.read(-pad * scale, -pad * scale, side, side, plan.mpp)
    maps = {k: v[0] for k, v in predictor(window[None]).items()}
    crop = (slice(pad, pad + h), slice(pad, pad + w))
    return {k: (v[crop] if v.ndim == 2 else v[(slice(None), *crop)]) for k, v in maps.items()}, scale, rgb.shape[:2]


def tune_postprocess(predictor: Predictor, root: str, names: Sequence[str], base: dict) -> tuple[dict, float]:
    """Grid-search the card's post-processing on ``names``; returns (best params, mean AJI)."""
    method = base.get("method", "hv")
    grid = GRIDS[method]
    records = {r.name: r for r in read_splits(root)}
    cached = []
    for name in names:
        rec = records[name]
        if rec.split != "train":
            raise ValueError(f"{name}: thresholds are tuned on validation images carved from train only")
        rgb, truth = read_pair(rec)
        cached.append((_maps(predictor, rgb, rec.mpp), truth))
    best, best_score = dict(base), -1.0
    for values in itertools.product(*grid.values()):
        params = {**base, **dict(zip(grid.keys(), values))}
        kw = {k: v for k, v in params.items() if k != "method"}
        scores = []
        for (maps, scale, shape), truth in cached:
            labels = postprocess(maps, method, **kw)
            scores.append(aji(truth, resample_nearest(labels, shape[0], shape[1], scale)))
        score = float(np.mean(scores))
        if score > best_score:
            best, best_score = params, score
    return best, best_score
