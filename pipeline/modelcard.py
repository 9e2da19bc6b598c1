"""Model cards: what a checkpoint is, how it was made, how well it does on named held-out data."""
from __future__ import annotations

import datetime as dt
from typing import Any

import torch

from nucleiflow.models.outputs import postprocess_method


def build_card(cfg: Any, result: dict, metrics: dict | None, outputs: dict[str, int],
               postprocess: dict | None = None) -> dict:
    """Card for a model trained by `training.train` with config ``cfg`` (a TrainConfig).

    ``metrics`` is `evaluation.evaluate`'s result on the held-out split (or None);
    ``postprocess`` overrides the config's (e.g. thresholds tuned on validation images).
    """
    post = dict(postprocess if postprocess is not None else cfg.postprocess)
    post.setdefault("method", postprocess_method(outputs))
    n_params = sum(p.numel() for p in result["model"].parameters())
    card = {
        "name": cfg.name,
        "arch": cfg.arch,
        "kwargs": cfg.kwargs,
        "outputs": outputs,
        "mpp": cfg.mpp,
        "input": "RGB uint8 / 255, float32, (B, 3, H, W)",
        "normalisation": {"stain": None},
        "postprocess": post,
        "parameters": n_params,
        "training": {
            "config_key": cfg.key(),
            "epochs": result["epochs"],
            "best_val_loss": result["best_val"],
            "seconds": result["seconds"],
            "device": result["device"],
            "hardware": result["hardware"],
            "torch": torch.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "history": result["history"],
            "loop": cfg.train.model_dump(),
            "teacher": cfg.teacher.model_dump() if cfg.teacher else None,
        },
        "data": {
            "root": str(cfg.data.root),
            "train": result["train_names"],
            "validation": result["val_names"],
            "validation_note": "carved from the train split; the test split is never used for training or selection",
        },
        "metrics": {},
    }
    if metrics is not None:
        card["metrics"] = {
            "split": metrics["split"],
            "n_images": metrics["n_images"],
            "names": [r["name"] for r in metrics["per_image"]],
            "mean": metrics["mean"],
            "per_image": metrics["per_image"],
        }
    return card


def compare_rows(old: dict | None, new: dict) -> list[tuple[str, str, str, str]]:
    """(metric, old, new, delta) rows for the mean metrics of two evaluation results."""
    rows = []
    for k, v in new["mean"].items():
        o = old["mean"].get(k) if old else None
        rows.append((k, "-" if o is None else f"{o:.4f}", f"{v:.4f}", "-" if o is None else f"{v - o:+.4f}"))
    return rows
