"""The training flow: `nucleiflow train` end to end as a real process (checkpoint, card, old-vs-new
table, --retune, kill and resume, distillation) and the loop's pieces in-process (bad
configs and several data sets: test_train_config.py).

The models here train for a handful of steps on a few MoNuSeg images: their metrics mean
nothing, only the plumbing is under test. Prefect starts a temporary server per process
(~10 s), so the subprocess tests are the slow ones.
"""
from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from nucleiflow.models.checkpoint import load_checkpoint, save_checkpoint
from nucleiflow.pipeline.train import loop as training
from nucleiflow.pipeline.train.datasets import read_splits
from nucleiflow.pipeline.train.unlabelled import unlabelled_tiles
from nucleiflow.pipeline.train.evaluation import METRICS
from nucleiflow.pipeline.train.card import build_card
from nucleiflow.pipeline.train.config import TrainConfig
from nucleiflow.pipeline.train.loop import split_records
from trainruns import (EVAL_NAME, NAMES, NUCLEIFLOW, card_of, config, nucleiflow, output, quiet, table,
                       write)

# -- `nucleiflow train`: checkpoint, card, table ------------------------------------------
@pytest.fixture(scope="module")
def first_run(tmp_path_factory, shared_data, env):
    """One `nucleiflow train` of a tiny student on 4 train images (2 held out for validation)."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = config(shared_data, tmp, data={"names": NAMES, "val_fraction": 0.5})
    path = write(cfg, tmp / "tiny.yaml")
    proc = nucleiflow("train", str(path), env=env, cwd=tmp)
    card = card_of(cfg["out"]) if (Path(cfg["out"]) / "model.json").is_file() else None
    return {"cfg": cfg, "path": path, "proc": proc, "card": card, "tmp": tmp}


def test_train_writes_checkpoint_and_card(first_run):
    proc, cfg, card = first_run["proc"], first_run["cfg"], first_run["card"]
    assert proc.returncode == 0, output(proc)[-3000:]
    out = Path(cfg["out"])
    assert (out / "model.safetensors").is_file() and (out / "model.json").is_file()
    assert card["arch"] == "student" and card["kwargs"] == cfg["kwargs"]
    assert card["mpp"] == 0.5 and card["postprocess"]["method"] == "hv"
    assert card["outputs"] == {"np": 2, "hv": 2}
    assert sorted(card["data"]["train"] + card["data"]["validation"]) == sorted(NAMES)
    # Metrics on the named held-out split, and the training history epoch by epoch.
    assert card["metrics"]["split"] == "test" and card["metrics"]["names"] == [EVAL_NAME]
    assert set(card["metrics"]["mean"]) == set(METRICS)
    assert all(0 <= v <= 1 for v in card["metrics"]["mean"].values())
    assert [h["epoch"] for h in card["training"]["history"]] == [1, 2, 3]
    assert card["training"]["epochs"] == 3 and card["training"]["teacher"] is None
    # The weights load into the architecture the card names.
    model, _ = load_checkpoint(out)
    assert type(model).__name__ == "Student"


def test_train_prints_old_vs_new_table(first_run):
    proc, card = first_run["proc"], first_run["card"]
    assert proc.returncode == 0, output(proc)[-3000:]
    rows = table(output(proc))
    assert set(rows) == set(METRICS)
    for k, (old, new, delta) in rows.items():
        assert old == "-" and delta == "-"  # nothing to compare with on the first run
        assert new == f"{card['metrics']['mean'][k]:.4f}"


def test_second_run_reevaluates_the_old_model(first_run, env):
    """Same out again: the table's 'old' column holds the old model *re-evaluated* (its card's
    stored metrics are tampered with here, so copying them would show)."""
    assert first_run["proc"].returncode == 0
    out, first = Path(first_run["cfg"]["out"]), first_run["card"]
    tampered = copy.deepcopy(first)
    tampered["metrics"]["mean"] = {k: 0.0 for k in METRICS}
    save_checkpoint(load_checkpoint(out)[0], out, tampered)
    proc = nucleiflow("train", str(first_run["path"]), env=env, cwd=first_run["tmp"])
    assert proc.returncode == 0, output(proc)[-3000:]
    rows = table(output(proc))
    assert set(rows) == set(METRICS)
    for k, (old, new, delta) in rows.items():
        # Same work dir and config: the finished run is resumed, so old and new are one model.
        assert old == f"{first['metrics']['mean'][k]:.4f}" == new
        assert float(delta) == 0.0
    assert card_of(out)["metrics"]["mean"] == pytest.approx(first["metrics"]["mean"])


def test_retune_rewrites_the_card_not_the_weights(first_run, env, tmp_path):
    """`train --retune`: thresholds chosen again on the config's validation images, every
    held-out split re-scored, the card (with a `tuning` record) rewritten; the weights file
    is byte-identical. A config that did not train the checkpoint is refused up front."""
    import json
    import shutil

    from nucleiflow.pipeline.train.tuning import GRIDS, OBJECTIVE

    assert first_run["proc"].returncode == 0
    out = tmp_path / "checkpoint"
    shutil.copytree(first_run["cfg"]["out"], out)
    cfg = {**first_run["cfg"], "out": str(out)}
    path = write(cfg, tmp_path / "tiny.yaml")
    weights = (out / "model.safetensors").read_bytes()
    proc = nucleiflow("train", str(path), "--retune", env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, output(proc)[-3000:]
    assert (out / "model.safetensors").read_bytes() == weights
    card = json.loads((out / "model.json").read_text())
    assert card["tuning"]["objective"] == OBJECTIVE and card["tuning"]["validation_images"] == 2
    for k, values in GRIDS["hv"].items():
        assert card["postprocess"][k] in values
    rows = table(output(proc))
    assert set(rows) == set(METRICS)
    assert {k: f"{v:.4f}" for k, v in card["metrics"]["mean"].items()} == {k: r[1] for k, r in rows.items()}
    assert "re-tuned" in (out / "README.md").read_text()

    other = write({**cfg, "data": {**cfg["data"], "val_fraction": 0.25}}, tmp_path / "other.yaml")
    proc = nucleiflow("train", str(other), "--retune", env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "validation images are not those" in proc.stderr, output(proc)[-2000:]
    assert "Traceback" not in output(proc)


def test_validation_is_carved_from_train_only(first_run, shared_data):
    card = first_run["card"]
    assert card is not None, output(first_run["proc"])[-3000:]
    splits = {r.name: r.split for r in read_splits(shared_data / "monuseg")}
    val, trained = set(card["data"]["validation"]), set(card["data"]["train"])
    assert len(val) == 2 and len(trained) == 2
    assert all(splits[n] == "train" for n in val | trained)
    assert not val & trained
    assert all(splits[n] == "test" for n in card["metrics"]["names"])


def test_split_records_whole_train_split(shared_data, tmp_path):
    """Without data.names: a fifth of the 30 train images, none of the 14 test images."""
    cfg = TrainConfig.model_validate(config(shared_data, tmp_path, data={"names": None, "val_fraction": 0.2}))
    [(trained, val)] = split_records(cfg)
    splits = {r.name: r.split for r in read_splits(cfg.primary.root)}
    train_split = {n for n, s in splits.items() if s == "train"}
    assert len(val) == round(0.2 * len(train_split))
    assert set(trained) | set(val) == train_split and not set(trained) & set(val)
    assert split_records(cfg) == [(trained, val)]  # deterministic for a seed


# -- kill and resume ----------------------------------------------------------------------
def _state(path: Path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (FileNotFoundError, EOFError, RuntimeError):
        return None


def test_killed_training_resumes(shared_data, tmp_path, env):
    epochs = 10
    cfg = config(shared_data, tmp_path, train={"epochs": epochs, "steps_per_epoch": 4})
    path = write(cfg, tmp_path / "resume.yaml")
    last = Path(cfg["work"]) / "last.pt"
    log = (tmp_path / "first.log").open("w")
    # Own session: the kill takes the flow's temporary Prefect server down with it.
    proc = subprocess.Popen([str(NUCLEIFLOW), "train", str(path)], env=env, cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, state = time.monotonic() + 150, None
        while time.monotonic() < deadline and proc.poll() is None:
            state = _state(last) if last.exists() else None
            if state is not None and state["epoch"] >= 2:
                break
            time.sleep(0.05)
        finished = proc.poll() is not None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert not finished, f"training ended before it was killed:\n{(tmp_path / 'first.log').read_text()[-3000:]}"
    killed = _state(last)
    assert killed is not None and 2 <= killed["epoch"] < epochs
    assert not (Path(cfg["out"]) / "model.json").exists()

    proc2 = nucleiflow("train", str(path), env=env, cwd=tmp_path)
    text = output(proc2)
    assert proc2.returncode == 0, text[-3000:]
    m = re.search(r"resuming from epoch (\d+)", text)
    assert m and int(m.group(1)) == killed["epoch"], text[-3000:]
    history = card_of(cfg["out"])["training"]["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    # The epochs done before the kill are kept, not redone.
    assert history[:killed["epoch"]] == killed["history"]


def test_changed_config_does_not_resume(shared_data, tmp_path):
    cfg = config(shared_data, tmp_path, train={"epochs": 1, "steps_per_epoch": 1})
    quiet(TrainConfig.model_validate(cfg))
    _, log = quiet(TrainConfig.model_validate(cfg))
    assert any("resuming from epoch 1" in line for line in log)
    other = TrainConfig.model_validate(config(shared_data, tmp_path, train={"epochs": 1, "steps_per_epoch": 1,
                                                                              "lr": 0.002}))
    res, log = quiet(other)
    assert any("starting afresh" in line for line in log) and not any("resuming" in line for line in log)
    assert len(res["history"]) == 1
    assert other.key() != TrainConfig.model_validate(cfg).key()
    assert torch.load(Path(cfg["work"]) / "last.pt", weights_only=False)["key"] == other.key()


def test_stopped_run_is_not_trained_on(shared_data, tmp_path):
    """A run stopped by its time budget (or early stopping) stays stopped when run again."""
    cfg = TrainConfig.model_validate(config(shared_data, tmp_path, train={
        "epochs": 5, "steps_per_epoch": 1, "max_minutes": 1e-6}))
    res, log = quiet(cfg)
    assert len(res["history"]) == 1 and any("time budget" in line for line in log)
    again, log = quiet(cfg)
    assert any("already finished at epoch 1" in line for line in log)
    assert again["history"] == res["history"]


# -- distillation -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tmp_path_factory, shared_data) -> Path:
    """A tiny GoLo with shape markers, trained in-process for 2 epochs of 2 steps."""
    tmp = tmp_path_factory.mktemp("teacher")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig.model_validate(config(
            shared_data, tmp, name="tiny-golo", arch="golo",
            kwargs={"base_channels": 4, "depth": 2, "global_scale": 0.5, "crop": 32, "marker": True},
            train={"epochs": 2, "steps_per_epoch": 2, "patch": 64}, postprocess={"method": "marker"}))
        res, _ = quiet(cfg)
    finally:
        torch.set_num_threads(n)
    return save_checkpoint(res["model"], cfg.out, build_card(cfg, res, None, dict(res["model"].outputs)))


def test_distillation_with_unlabelled_tiles(shared_data, tmp_path, env, teacher):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    cfg = config(shared_data, tmp_path, name="tiny-distilled", train={"epochs": 2, "patch": 64},
                 teacher={"model": str(teacher), "alpha": 0.5, "unlabelled_slides": [str(slide)],
                          "unlabelled_tiles": 4})
    proc = nucleiflow("train", str(write(cfg, tmp_path / "distill.yaml")), env=env, cwd=tmp_path)
    text = output(proc)
    assert proc.returncode == 0, text[-3000:]
    assert "unlabelled: 4 tissue tiles from 1 of 1 slides" in text
    card = card_of(cfg["out"])
    assert card["arch"] == "student"
    assert card["training"]["teacher"]["model"] == str(teacher)
    assert card["training"]["teacher"]["alpha"] == 0.5
    assert card["training"]["teacher"]["unlabelled_slides"] == [str(slide)]
    assert len(card["training"]["history"]) == 2


def test_unlabelled_tiles_are_tissue(cmu_slide):
    pool = unlabelled_tiles([str(cmu_slide)], mpp=0.5, patch=64, tiles=4, seed=0)
    assert len(pool.arrays) == 4
    for a in pool.arrays:
        assert a.shape == (64, 64, 3) and a.dtype.name == "uint8"
        assert a.mean() < 225  # tissue; the slide's glass reads ~240+
    again = unlabelled_tiles([str(cmu_slide)], mpp=0.5, patch=64, tiles=4, seed=0)
    assert all((a == b).all() for a, b in zip(pool.arrays, again.arrays))


def test_unlabelled_tiles_name_the_slides_that_gave_tiles(cmu_slide, tmp_path):
    """A slide that cannot be read is skipped (warned), and not counted as a source."""
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide")
    pool = unlabelled_tiles([str(broken), str(cmu_slide)], mpp=0.5, patch=64, tiles=4, seed=0)
    assert pool.sources == [str(cmu_slide)] and len(pool.arrays) == 2


@pytest.mark.parametrize("every, expected", [(1, [True, True, True, True]), (2, [False, True, False, True])])
def test_unlabelled_batch_every_n_steps(shared_data, tmp_path, teacher, monkeypatch, every, expected):
    """unlabelled_every=N: the last of every N steps trains on unlabelled tiles (tgt None)."""
    seen: list[bool] = []
    real = training._loss

    def spy(arch, out, tgt, teacher_out, cfg, stage=None):
        if teacher_out is not None:  # training steps only (validation has no teacher)
            seen.append(tgt is None)
        return real(arch, out, tgt, teacher_out, cfg, stage)

    monkeypatch.setattr(training, "_loss", spy)
    cfg = TrainConfig.model_validate(config(
        shared_data, tmp_path, train={"epochs": 1, "steps_per_epoch": 4, "patch": 64},
        teacher={"model": str(teacher), "unlabelled_slides": [str(shared_data / "slides" / "CMU-1-Small-Region.svs")],
                 "unlabelled_tiles": 2, "unlabelled_every": every}))
    quiet(cfg)
    assert seen == expected




@pytest.mark.parametrize("views", [1, 4])
def test_teacher_maps_averaged_over_views(shared_data, tmp_path, teacher, monkeypatch, views):
    """teacher.tta=N: every step's teacher maps are `tta_maps` over N views; 1: one forward."""
    calls: list[int] = []
    real = training.tta_maps

    def spy(predict, x, n):
        calls.append(n)
        return real(predict, x, n)

    monkeypatch.setattr(training, "tta_maps", spy)
    cfg = TrainConfig.model_validate(config(
        shared_data, tmp_path, train={"epochs": 1, "steps_per_epoch": 3, "patch": 64},
        teacher={"model": str(teacher), "tta": views}))
    quiet(cfg)
    assert calls == ([] if views == 1 else [views] * 3)
    unset = TrainConfig.model_validate(config(shared_data, tmp_path, teacher={"model": str(teacher)}))
    same = TrainConfig.model_validate(config(shared_data, tmp_path, teacher={"model": str(teacher), "tta": 1}))
    assert unset.key() == same.key()  # runs made before the option keep their keys


@pytest.mark.parametrize("keep", ["best", "last"])
def test_keep_picks_the_best_or_the_last_epoch(shared_data, tmp_path, monkeypatch, keep):
    """With validation loss rising after epoch 1, `keep: best` returns epoch 1's weights and
    `keep: last` the final ones (a refit on every image has no validation to pick by); the
    key of a config without `keep` is what it was before the option existed."""
    losses = iter([1.0, 2.0, 3.0])
    monkeypatch.setattr(training, "validation_loss", lambda *a, **k: next(losses))
    cfg = TrainConfig.model_validate(config(shared_data, tmp_path, train={
        "epochs": 3, "steps_per_epoch": 2, "patch": 64, "keep": keep}))
    res, _ = quiet(cfg)
    state = torch.load(Path(cfg.work) / "last.pt", weights_only=False)
    kept = res["model"].state_dict()
    same_as = {name: all(torch.equal(kept[k].cpu(), v.cpu()) for k, v in ref.items())
               for name, ref in (("best", state["best_state"]), ("last", state["model"]))}
    assert same_as == {"best": keep == "best", "last": keep == "last"}
    if keep == "best":
        plain = TrainConfig.model_validate(config(shared_data, tmp_path, train={
            "epochs": 3, "steps_per_epoch": 2, "patch": 64}))
        assert plain.key() == cfg.key()
