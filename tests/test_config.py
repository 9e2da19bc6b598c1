"""Typed model cards: every committed card validates; a bad card is one clear line, exit 2."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nucleiflow.models.checkpoint import BUNDLED, bundled_names
from nucleiflow.pipeline.config import CardError, HvPostprocess, ModelCard, SegmentConfig, config_hash

CLI = Path(sys.executable).with_name("nucleiflow")


@pytest.mark.parametrize("name", bundled_names())
def test_bundled_cards_validate_and_keep_their_settings(name):
    raw = json.loads((BUNDLED / name / "model.json").read_text())
    card = ModelCard.load(BUNDLED / name / "model.json")
    assert card.mpp == raw["mpp"] and card.arch == raw["arch"] and card.outputs == raw["outputs"]
    # The watershed gets exactly the card's parameters, no more (defaults stay the function's).
    assert card.postprocess.method == raw["postprocess"]["method"]
    assert card.postprocess.params() == {k: v for k, v in raw["postprocess"].items() if k != "method"}
    assert card.metrics == raw["metrics"]


def base_card(**changes) -> dict:
    card = json.loads((BUNDLED / "student" / "model.json").read_text())
    card.update(changes)
    return card


@pytest.mark.parametrize("change, key", [
    ({"postprocess": {"method": "hv", "prob_treshold": 0.4}}, "postprocess.prob_treshold"),
    ({"postprocess": {"method": "hv", "prob_threshold": -0.4}}, "postprocess.prob_threshold"),
    ({"postprocess": {"method": "hv", "min_size": "ten"}}, "postprocess.min_size"),
    ({"postprocess": {"method": "watershed"}}, "postprocess"),
    ({"mpp": -1}, "mpp"),
    ({"arch": "resnet"}, "arch"),
    ({"colour": "blue"}, "colour"),
])
def test_a_bad_card_names_the_key(change, key):
    with pytest.raises(CardError) as e:
        ModelCard.of(base_card(**change), "x/model.json")
    msg = str(e.value)
    assert msg.startswith(f"x/model.json: {key}") and "\n" not in msg, msg


def test_metrics_and_training_records_are_free_form():
    per_set = {"monuseg": {"split": "test", "mean": {"dice": 0.7}}, "tnbc": {"split": "test", "mean": {"dice": 0.6}}}
    card = ModelCard.of(base_card(metrics=per_set, training={"anything": [1, {"nested": True}]}))
    assert card.metrics == per_set


def test_a_card_without_postprocess_means_hv_defaults():
    card = base_card()
    del card["postprocess"]
    assert ModelCard.of(card).postprocess == HvPostprocess()


def test_config_keys_are_unchanged():
    # The key is what "done" means in run.json: a redesign must not change it.
    assert SegmentConfig().key() == "3f905f6701e3fa81"
    assert config_hash({"a": 1}) == config_hash({"a": 1}) != config_hash({"a": 2})


@pytest.fixture(scope="module")
def misspelled(tmp_path_factory) -> Path:
    """A copy of the student checkpoint whose card misspells a threshold."""
    folder = tmp_path_factory.mktemp("bad") / "student-typo"
    shutil.copytree(BUNDLED / "student", folder)
    card = json.loads((folder / "model.json").read_text())
    card["postprocess"]["prob_treshold"] = card["postprocess"].pop("prob_threshold")
    (folder / "model.json").write_text(json.dumps(card))
    return folder


@pytest.mark.parametrize("argv", [
    ["segment", "{slide}", "--out", "{out}", "--model", "{model}"],
    ["inspect", "{slide}", "--model", "{model}"],
    ["evaluate", "--model", "{model}", "--data", "{data}"],
])
def test_cli_rejects_a_bad_card_before_any_slide(argv, misspelled, cmu_slide, shared_data, tmp_path):
    fill = {"slide": str(cmu_slide), "out": str(tmp_path / "out"), "model": str(misspelled),
            "data": str(shared_data / "monuseg")}
    res = subprocess.run([str(CLI), *[a.format(**fill) for a in argv]], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert str(misspelled / "model.json") in lines[0] and "postprocess.prob_treshold" in lines[0], lines[0]
    assert not (tmp_path / "out" / "CMU-1-Small-Region").exists()  # nothing claimed or written


@pytest.mark.parametrize("change, key", [
    ({"postprocess": {"method": "hv", "prob_treshold": 0.5}}, "postprocess.prob_treshold"),
    ({"arch": "studnet"}, "arch"),
])
def test_train_rejects_a_bad_card_key_before_training(change, key, shared_data, tmp_path):
    # The card is built after the last epoch: a misspelled threshold failed a whole run there.
    data = {"name": "t", "arch": "student", "kwargs": {"base_channels": 4, "depth": 2}, "mpp": 0.5,
            "data": {"root": str(shared_data / "monuseg"), "names": ["TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1"],
                     "val_fraction": 0.5, "eval_split": "test", "eval_names": ["TCGA-2Z-A9J9-01A-01-TS1"]},
            "train": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 1, "patch": 64},
            "out": str(tmp_path / "ckpt"), "work": str(tmp_path / "work"), "device": "cpu", **change}
    cfg = tmp_path / "train.yaml"
    cfg.write_text(json.dumps(data))  # JSON is YAML
    res = subprocess.run([str(CLI), "train", str(cfg)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cfg) in lines[0] and key in lines[0], res.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "ckpt").exists()
