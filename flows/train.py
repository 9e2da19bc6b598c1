"""Prefect flows `train-model`: train (or resume) -> evaluate on held-out data -> write the
checkpoint and its card -> compare with the checkpoint it replaces; and `retune-model`: choose
a trained checkpoint's post-processing again on its validation images and re-score it. Logic
lives in nucleiflow.pipeline.train.loop / tuning / evaluation / card; this module only
orchestrates."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from prefect import flow, get_run_logger, task
from pydantic import ValidationError

from nucleiflow.models.checkpoint import load_checkpoint, resolve, save_card, save_checkpoint, storage_roundtrip
from nucleiflow.pipeline.config import CardError, ModelCard, load_yaml
from nucleiflow.pipeline.train.datasets import read_splits
from nucleiflow.pipeline.train.evaluation import evaluate
from nucleiflow.pipeline.infer.predictor import Predictor
from nucleiflow.pipeline.train.card import build_card, compare_rows, metrics_record, render_markdown
from nucleiflow.pipeline.train.tuning import GRIDS, OBJECTIVE, tune_postprocess
from nucleiflow.pipeline.train.config import DataConfig, TrainConfig
from nucleiflow.pipeline.train.loop import split_data, split_records, train


def read_config(path: str | Path) -> TrainConfig:
    """Load and validate a training YAML; errors name the file, on one line (the CLI's contract)."""
    data = _load_yaml(path)
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}"
                             for err in e.errors())
        raise ValueError(f"{path}: invalid training config: {problems}") from e
    # Fail before Prefect starts (and before training) on what would fail later: the card
    # built after the last epoch validates arch and post-processing (a misspelled threshold
    # key once cost a 42-minute run), so validate them now, the same way.
    try:
        ModelCard.of({"arch": cfg.arch, "mpp": cfg.mpp, "postprocess": cfg.postprocess}, source=str(path))
    except CardError as e:
        raise ValueError(str(e)) from None
    for i, d in enumerate(cfg.data):
        _check_data(path, f"data[{i}]" if len(cfg.data) > 1 else "data", d, cfg.train.seed)
    refs = {"init": cfg.init, "teacher.model": cfg.teacher.model if cfg.teacher else None}
    for where, ref in refs.items():
        if ref is None:
            continue
        try:
            resolve(ref)
        except (KeyError, FileNotFoundError) as e:
            why = str(e).strip("'\"")  # a KeyError's str is quoted
            raise ValueError(f"{path}: {where}: {why}") from e
    return cfg


def _check_data(path: str | Path, where: str, d: DataConfig, seed: int) -> None:
    """One data set's root, validation split and held-out images exist (else one line naming it)."""
    if not (Path(d.root) / "splits.csv").is_file():
        raise ValueError(f"{path}: {where}.root {d.root} has no splits.csv (relative paths start at the CWD)")
    try:
        split_data(d, seed)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    if d.eval_split is None:
        return
    held_out = {r.name for r in read_splits(d.root, blank_mpp=d.blank_mpp) if r.split == d.eval_split}
    unknown = sorted(set(d.eval_names or ()) - held_out)
    if not held_out or unknown:
        raise ValueError(f"{path}: {where}.eval_split {d.eval_split!r} of {d.root} "
                         + (f"lacks data.eval_names {unknown}" if held_out else "has no images"))


def _load_yaml(path: str | Path) -> dict:
    """`load_yaml`, with its (multi-line) YAML parser messages folded onto one line."""
    try:
        return load_yaml(path)
    except ValueError as e:
        raise ValueError(" ".join(str(e).split())) from e


def _outputs(model) -> dict[str, int]:
    """{head: channels} from a forward pass on a tiny input."""
    import torch

    model.eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64, device=next(model.parameters()).device))
    return {k: int(v.shape[1]) for k, v in out.items()}


@task(name="train")
def train_task(cfg: TrainConfig) -> dict:
    logger = get_run_logger()
    return train(cfg, log=logger.info)


@task(name="evaluate")
def evaluate_task(model, card: dict, cfg: TrainConfig, label: str, data: DataConfig | None = None) -> dict:
    """Scores on the held-out split of ``data`` (default: the primary data set)."""
    logger = get_run_logger()
    d = data or cfg.primary
    label = f"{label} [{Path(d.root).name}]"
    predictor = Predictor(model, card, device=cfg.device)
    res = evaluate(
        predictor, d.root, split=d.eval_split, names=d.eval_names,
        tile_size=cfg.eval_tile_size,
        progress=lambda name, row: logger.info(f"{label} {name}: dice {row['dice']:.3f} aji {row['aji']:.3f}"),
    )
    logger.info(f"{label} mean on {res['split']} ({res['n_images']} images): "
                + ", ".join(f"{k} {v:.4f}" for k, v in res["mean"].items()))
    return res


@task(name="tune-postprocess")
def tune_task(model, card: dict, cfg: TrainConfig, splits: list[tuple[list[str], list[str]]]) -> dict:
    """Thresholds chosen on the validation images (carved from train), never on test."""
    logger = get_run_logger()
    sets = [(d.root, val) for d, (_, val) in zip(cfg.data, splits) if val]
    best, score = tune_postprocess(Predictor(model, card, device=cfg.device), sets, card["postprocess"],
                                   tile_size=cfg.eval_tile_size)
    n = sum(len(v) for _, v in sets)
    logger.info(f"post-processing tuned on {n} validation images: {best} ({OBJECTIVE} {score:.4f})")
    return best


@task(name="register")
def register_task(result: dict, card: dict, out: str) -> str:
    folder = save_checkpoint(result["model"], out, card)
    (folder / "README.md").write_text(render_markdown(card))
    return str(folder)


@flow(name="train-model", log_prints=True)
def train_model(config: str) -> dict:
    """Train the model described by the YAML at ``config``; returns the card and a comparison."""
    cfg = read_config(config)
    result = train_task(cfg)
    storage_roundtrip(result["model"])  # evaluate exactly the weights that get stored
    outputs = _outputs(result["model"])
    card = build_card(cfg, result, None, outputs)
    post = card["postprocess"]
    if cfg.tune_postprocess and result["val_names"]:
        post = tune_task(result["model"], card, cfg, result["splits"])
    card = build_card(cfg, result, None, outputs, postprocess=post)
    by_data = {Path(d.root).name: evaluate_task(result["model"], card, cfg, "new", d) for d in cfg.data
               if d.eval_split is not None}
    new = by_data[Path(cfg.primary.root).name]
    card = build_card(cfg, result, new, outputs, postprocess=post, by_data=by_data)
    old = None
    if (Path(cfg.out) / "model.json").exists():
        old_model, old_card = load_checkpoint(cfg.out)
        old = evaluate_task(old_model, old_card, cfg, "old")
    path = register_task(result, card, cfg.out)
    rows = compare_rows(old, new)
    print(f"checkpoint written to {path}")
    _print_table(rows)
    return {"checkpoint": path, "metrics": new["mean"], "old_metrics": old["mean"] if old else None, "table": rows}


def _print_table(rows: list[tuple[str, str, str, str]]) -> None:
    """The old vs new metrics table (`card.compare_rows`), one metric a line."""
    print(f"{'metric':<10} {'old':>8} {'new':>8} {'delta':>8}")
    for r in rows:
        print(f"{r[0]:<10} {r[1]:>8} {r[2]:>8} {r[3]:>8}")


def check_retune(config: str | Path, cfg: TrainConfig, card: dict) -> list[tuple[list[str], list[str]]]:
    """The config's (train, validation) names per data set, if its validation images are the
    ones the checkpoint's card records (else tuning could pick thresholds on images the model
    was trained on): ValueError naming the config otherwise."""
    splits = split_records(cfg)
    recorded = sorted((card.get("data") or {}).get("validation") or [])
    if recorded != sorted(n for _, val in splits for n in val):
        raise ValueError(f"{config}: its validation images are not those the card of {cfg.out} records "
                         "(--retune takes the config that trained the checkpoint)")
    return splits


@flow(name="retune-model", log_prints=True)
def retune_model(config: str) -> dict:
    """Choose the post-processing of the checkpoint that ``config`` trained (at its ``out``)
    again on the config's validation images (e.g. after the tuning grid or objective grew),
    re-score every data set's held-out split and rewrite the card; the weights stay as they
    are. Returns {"checkpoint", "postprocess", "metrics", "old_metrics", "table"}."""
    cfg = read_config(config)
    model, card = load_checkpoint(cfg.out)
    splits = check_retune(config, cfg, card)
    old = evaluate_task(model, card, cfg, "old")
    post = tune_task(model, card, cfg, splits)
    card = {**card, "postprocess": post,
            "tuning": {"objective": OBJECTIVE, "grid": GRIDS[post["method"]],
                       "validation_images": sum(len(v) for _, v in splits),
                       "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}}
    by_data = {Path(d.root).name: evaluate_task(model, card, cfg, "new", d) for d in cfg.data
               if d.eval_split is not None}
    new = by_data[Path(cfg.primary.root).name]
    card["metrics"] = metrics_record(new, by_data)
    folder = save_card(cfg.out, card)
    (folder / "README.md").write_text(render_markdown(card))
    rows = compare_rows(old, new)
    print(f"card rewritten: {folder / 'model.json'} (post-processing {post})")
    _print_table(rows)
    return {"checkpoint": str(folder), "postprocess": post, "metrics": new["mean"], "old_metrics": old["mean"],
            "table": rows}
