"""Score a model on an annotated data set through the slide segmentation path.

Each image becomes an in-memory slide at its own mpp (from splits.csv), is segmented by the
same tile -> infer -> post-process -> stitch code as a whole slide, and the labels, mapped
back to the image's pixels, are scored against its ground truth.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from nucleiflow.pipeline.train.datasets import read_pair, read_splits
from nucleiflow.pipeline.infer.predictor import Predictor
from nucleiflow.pipeline.train.metrics import score_instances
from nucleiflow.pipeline.infer.segment_reader import segment_array
from nucleiflow.pipeline.slide.reader import ArraySlide

METRICS = ("dice", "iou", "aji", "pq", "dq", "sq", "precision", "recall", "f1")


def evaluate(
    predictor: Predictor,
    root: str | Path,
    split: str = "test",
    names: list[str] | None = None,
    *,
    tile_size: int = 512,
    halo: int = 64,
    progress: Callable[[str, dict], None] | None = None,
) -> dict:
    """Per-image and mean metrics: {"per_image": [{"name", *METRICS, "n_true", "n_pred"}],
    "mean": {metric: value}, "split": split, "n_images": n}."""
    records = [r for r in read_splits(root) if r.split == split and (names is None or r.name in names)]
    if not records:
        raise ValueError(f"{root}: no images in split {split!r}" + (f" named {names}" if names else ""))
    missing = sorted(set(names or ()) - {r.name for r in records})
    if missing:  # else the "named held-out set" on a model card would quietly be a smaller one
        raise ValueError(f"{root}: not in split {split!r}: {missing}")
    absent = [p for r in records for p in (r.image_path, r.label_path) if not p.is_file()]
    if absent:  # before any image is segmented: a data set without labels/ is not scorable
        raise ValueError(f"{absent[0]}: not found ({len(absent)} image/label files of split {split!r} missing); "
                         "evaluate needs images/<name>.png and labels/<name>.png (instance labels) per image")
    rows = []
    for rec in records:
        rgb, truth = read_pair(rec)
        slide = ArraySlide(rgb, mpp=rec.mpp, name=rec.name)
        pred = segment_array(slide, predictor, tile_size=tile_size, halo=halo)
        scores = score_instances(truth, pred)
        row = {"name": rec.name, **{k: float(scores[k]) for k in METRICS}}
        row.update(n_true=int(len(np.unique(truth)) - 1), n_pred=int(len(np.unique(pred)) - 1))
        rows.append(row)
        if progress is not None:
            progress(rec.name, row)
    mean = {k: float(np.mean([r[k] for r in rows])) for k in METRICS}
    return {"split": split, "n_images": len(rows), "per_image": rows, "mean": mean}
