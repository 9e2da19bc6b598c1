"""`nucleiflow evaluate` and `nucleiflow models` as real processes, on a tiny data set cut from
MoNuSeg test images in the shared/data layout, scored by a tiny GoLo trained in a fixture."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.segmentation import relabel_sequential

from nucleiflow.models.checkpoint import bundled_names, load_checkpoint, save_checkpoint
from nucleiflow.pipeline.train.evaluation import METRICS, evaluate
from nucleiflow.pipeline.infer.predictor import Predictor
from nucleiflow.pipeline.train.card import build_card
from nucleiflow.pipeline.train.config import TrainConfig
from nucleiflow.pipeline.train.loop import train

NUCLEIFLOW = Path(sys.executable).with_name("nucleiflow")
TRAIN = ["TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1", "TCGA-21-5786-01Z-00-DX1"]
TEST = ["TCGA-2Z-A9J9-01A-01-TS1", "TCGA-44-2665-01B-06-BS6"]
CROP = 400  # px of the 1000 px, 0.25 um/px MoNuSeg images: 100 um, ~100-200 nuclei


@pytest.fixture(scope="module")
def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DO_NOT_TRACK": "1"}


def nucleiflow(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(NUCLEIFLOW), *args], env=env, capture_output=True, text=True, timeout=timeout)


def write_dataset(root: Path, items: list[tuple[str, np.ndarray, np.ndarray]], mpp: float) -> Path:
    """images/, labels/ (16-bit, ids 1..N) and splits.csv, as in shared/data; all in split test."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    with (root / "splits.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "split", "width", "height", "mpp"])
        for name, rgb, inst in items:
            Image.fromarray(rgb).save(root / "images" / f"{name}.png")
            Image.fromarray(relabel_sequential(inst)[0].astype(np.uint16)).save(root / "labels" / f"{name}.png")
            w.writerow([name, "test", rgb.shape[1], rgb.shape[0], mpp])
    return root


@pytest.fixture(scope="module")
def crops(shared_data) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, rgb, labels) of the central CROP x CROP px of two MoNuSeg test images."""
    out = []
    for name in TEST:
        rgb = np.array(Image.open(shared_data / "monuseg" / "images" / f"{name}.png").convert("RGB"))
        inst = np.array(Image.open(shared_data / "monuseg" / "labels" / f"{name}.png"))
        y0, x0 = (rgb.shape[0] - CROP) // 2, (rgb.shape[1] - CROP) // 2
        out.append((name, rgb[y0:y0 + CROP, x0:x0 + CROP], inst[y0:y0 + CROP, x0:x0 + CROP]))
    return out


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, crops) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tiny") / "data", crops, mpp=0.25)


@pytest.fixture(scope="module")
def half_data(tmp_path_factory, crops) -> Path:
    """The same crops at half the resolution (0.5 um/px): a data set the model never saw."""
    items = []
    for name, rgb, inst in crops:
        small = np.array(Image.fromarray(rgb).resize((CROP // 2, CROP // 2), Image.Resampling.BOX))
        items.append((name, small, inst[1::2, 1::2]))
    return write_dataset(tmp_path_factory.mktemp("half") / "data", items, mpp=0.5)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, shared_data) -> Path:
    """A small GoLo (distance watershed) trained in-process for 4 x 5 steps at 0.5 um/px:
    poor, but it finds nuclei, so counts can be compared."""
    tmp = tmp_path_factory.mktemp("model")
    cfg = TrainConfig.model_validate({
        "name": "tiny-golo", "arch": "golo", "mpp": 0.5,
        "kwargs": {"base_channels": 8, "depth": 2, "global_scale": 0.5, "crop": 64},
        "data": {"root": str(shared_data / "monuseg"), "names": TRAIN, "val_fraction": 0.34},
        "train": {"epochs": 4, "steps_per_epoch": 5, "batch_size": 4, "patch": 128, "lr": 0.003, "patience": 50},
        "postprocess": {"method": "distance"},
        "out": str(tmp / "tiny-golo"), "work": str(tmp / "work"), "device": "cpu",
    })
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = train(cfg, log=lambda _: None)
    finally:
        torch.set_num_threads(n)
    return save_checkpoint(res["model"], cfg.out, build_card(cfg, res, None, dict(res["model"].outputs)))


@pytest.fixture(scope="module")
def in_process(tiny_model, tiny_data) -> dict:
    """`pipeline.evaluation.evaluate` on the tiny data set, one thread like the CLI runs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, card = load_checkpoint(tiny_model)
        return evaluate(Predictor(net, card, device="cpu"), tiny_data, split="test")
    finally:
        torch.set_num_threads(n)


def evaluate_json(model: Path, data: Path, env: dict) -> dict:
    proc = nucleiflow("evaluate", "--model", str(model), "--data", str(data), "--split", "test", "--json",
                      "--device", "cpu", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # exactly one JSON object: anything else on stdout breaks this


def test_evaluate_json_matches_in_process(tiny_model, tiny_data, in_process, env):
    res = evaluate_json(tiny_model, tiny_data, env)
    assert isinstance(res, dict)
    assert [r["name"] for r in res["per_image"]] == TEST
    assert set(res["mean"]) == set(METRICS)
    for k in METRICS:
        assert res["mean"][k] == pytest.approx(np.mean([r[k] for r in res["per_image"]]), abs=1e-12)
        assert 0 <= res["mean"][k] <= 1
    assert res["split"] == "test" and res["n_images"] == 2
    for cli, ref in zip(res["per_image"], in_process["per_image"]):
        assert cli["n_true"] == ref["n_true"] and cli["n_pred"] == ref["n_pred"]
        for k in METRICS:
            assert cli[k] == pytest.approx(ref[k], abs=1e-6), k


def test_evaluate_counts_truth_of_the_crops(in_process, crops):
    """Ground truth is the crops' nuclei, not the whole images'."""
    for row, (name, _, inst) in zip(in_process["per_image"], crops):
        assert row["name"] == name and row["n_true"] == len(np.unique(inst)) - 1


def test_evaluate_other_mpp(tiny_model, half_data, in_process, env):
    """The same tissue at 0.5 um/px (mpp from splits.csv): the model reads both at its own
    0.5 um/px, so it finds about as many nuclei as at 0.25 um/px, and a plausible number."""
    res = evaluate_json(tiny_model, half_data, env)
    assert res["n_images"] == 2
    for half, full in zip(res["per_image"], in_process["per_image"]):
        assert half["name"] == full["name"]
        assert 0.25 * half["n_true"] <= half["n_pred"] <= 3 * half["n_true"]
        assert abs(half["n_pred"] - full["n_pred"]) <= 0.2 * full["n_pred"] + 5
        assert abs(half["dice"] - full["dice"]) < 0.1


@pytest.mark.parametrize("case", ["unknown model", "no splits.csv", "unknown split"])
def test_evaluate_errors_exit_2_with_one_line(case, tiny_model, tiny_data, tmp_path, env):
    model, data, split = str(tiny_model), str(tiny_data), "test"
    if case == "unknown model":
        model = "no-such-model"
    elif case == "no splits.csv":
        data = str(tmp_path)
        (tmp_path / "images").mkdir()
    else:
        split = "validation"
    proc = nucleiflow("evaluate", "--model", model, "--data", data, "--split", split, "--json", env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    if case == "unknown model":
        assert "no-such-model" in lines[0] and "bundled" in lines[0]
        assert all(n in lines[0] for n in bundled_names())
    elif case == "no splits.csv":
        assert data in lines[0] and "splits.csv" in lines[0]
    else:
        assert "validation" in lines[0]


def test_models_json(env):
    proc = nucleiflow("models", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert isinstance(rows, list)
    assert len(rows) == len(bundled_names())  # one row per checkpoint in models/checkpoints/
    for r in rows:
        assert {"name", "arch", "mpp", "parameters", "held_out", "dice", "aji", "pq", "f1"} <= set(r)
