"""Model cards: what a checkpoint is, how it was made, how well it does on named held-out data."""
from __future__ import annotations

import datetime as dt
from typing import Any

import torch

from nucleiflow.models.outputs import postprocess_method


def build_card(cfg: Any, result: dict, metrics: dict | None, outputs: dict[str, int],
               postprocess: dict | None = None, by_data: dict[str, dict] | None = None) -> dict:
    """Card for a model trained by `train.loop.train` with config ``cfg`` (a TrainConfig).

    ``metrics`` is `evaluation.evaluate`'s result on the primary data set's held-out split
    (or None); ``by_data`` the same per data set name (the root's folder name);
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
            "augment": cfg.augment.model_dump(),
            "init": cfg.init,
            "tune_postprocess": cfg.tune_postprocess,
        },
        "data": _data_record(cfg, result),
        "metrics": {},
    }
    card["metrics"] = metrics_record(metrics, by_data)
    return card


def metrics_record(metrics: dict | None, by_data: dict[str, dict] | None = None) -> dict:
    """The card's "metrics" entry from `evaluation.evaluate` results: the primary data set's
    held-out split (``metrics``, may be None) and every set's (``by_data``, by folder name)."""
    record: dict = {}
    if metrics is not None:
        record = {
            "split": metrics["split"],
            "n_images": metrics["n_images"],
            "names": [r["name"] for r in metrics["per_image"]],
            "mean": metrics["mean"],
            "per_image": metrics["per_image"],
        }
    if by_data:  # every data set's held-out split, the primary one included
        record["by_data"] = {
            name: {"split": r["split"], "n_images": r["n_images"], "mean": r["mean"]} for name, r in by_data.items()
        }
    return record


def _data_record(cfg: Any, result: dict) -> dict:
    """What the model was trained on: every data set, its weight, split sizes, patches drawn."""
    splits = result.get("splits") or [(result["train_names"], result["val_names"])]
    return {
        "root": str(cfg.primary.root),
        "train": result["train_names"],
        "validation": result["val_names"],
        "validation_note": "carved from the train split; the test split is never used for training or selection",
        "sets": [
            {"root": str(d.root), "weight": d.weight, "group_by": d.group_by, "train": len(tr), "validation": len(va),
             "patches_sampled": result.get("sampled", {}).get(d.root)}
            for d, (tr, va) in zip(cfg.data, splits)
        ],
    }


def compare_rows(old: dict | None, new: dict) -> list[tuple[str, str, str, str]]:
    """(metric, old, new, delta) rows for the mean metrics of two evaluation results."""
    rows = []
    for k, v in new["mean"].items():
        o = old["mean"].get(k) if old else None
        rows.append((k, "-" if o is None else f"{o:.4f}", f"{v:.4f}", "-" if o is None else f"{v - o:+.4f}"))
    return rows


def _trained_images(data: dict) -> int:
    """Train images of the sets that gave patches (a weight-0 set only validates)."""
    sets = data.get("sets")
    if not sets:
        return len(data.get("train") or [])
    return sum(s.get("train") or 0 for s in sets if s.get("weight", 1.0) > 0)


def render_markdown(card: dict) -> str:
    """A human-readable model card (README.md beside model.json), from the card itself."""
    m = card.get("metrics") or {}
    t = card.get("training") or {}
    d = card.get("data") or {}
    roots = ", ".join(f"`{x.get('root')}` (weight {x.get('weight', 1.0)})" for x in d.get("sets") or [d])
    lines = [
        f"# {card.get('name')} ({card.get('arch')})", "",
        "Produced by `nucleiflow train` (flow `train-model`); `model.json` is the machine-readable card.", "",
        f"- architecture: `{card.get('arch')}` with `{json_dumps(card.get('kwargs'))}`, "
        f"{card.get('parameters', 0):,} parameters, outputs `{json_dumps(card.get('outputs'))}`",
        f"- input: {card.get('input', 'RGB / 255')} at **{card.get('mpp')} um/px**; stain normalisation: "
        f"{'Macenko to a stored reference' if (card.get('normalisation') or {}).get('stain') else 'none'}",
        f"- post-processing: `{json_dumps(card.get('postprocess'))}` ("
        + ("as the training config gives it" if t.get("tune_postprocess") is False and not card.get("tuning")
           else "thresholds chosen on the validation images")
        + (f", objective {card['tuning']['objective']}, re-tuned {card['tuning']['date']}" if card.get("tuning") else "")
        + ")",
        f"- trained on: {roots}, {_trained_images(d)} train images, "
        f"{len(d.get('validation') or [])} validation images carved from the train split",
        f"- training: {t.get('epochs')} epochs, {t.get('seconds')} s on {t.get('hardware')} ({t.get('device')}), "
        f"torch {t.get('torch')}, {t.get('date')}",
    ]
    if t.get("teacher"):
        lines.append(f"- distilled from `{t['teacher'].get('model')}` (alpha {t['teacher'].get('alpha')}, "
                     f"T {t['teacher'].get('temperature')}), unlabelled slides {t['teacher'].get('unlabelled_slides')}")
    if m:
        lines += ["", f"## Held-out metrics: split `{m.get('split')}` ({m.get('n_images')} images)", "",
                  "| " + " | ".join(m["mean"]) + " |", "|" + "---|" * len(m["mean"]),
                  "| " + " | ".join(f"{v:.4f}" for v in m["mean"].values()) + " |", "",
                  "Reproduce: `nucleiflow evaluate --model <this folder or name> --data <root> "
                  f"--split {m.get('split')}`."]
    by = m.get("by_data") or {}
    if len(by) > 1:
        keys = list(next(iter(by.values()))["mean"])
        lines += ["", "## Held-out metrics per data set", "", "| data set | split | images | " + " | ".join(keys) + " |",
                  "|" + "---|" * (len(keys) + 3)]
        lines += [f"| {n} | {r['split']} | {r['n_images']} | " + " | ".join(f"{r['mean'][k]:.4f}" for k in keys) + " |"
                  for n, r in by.items()]
    return "\n".join(lines) + "\n"


def json_dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)
