"""Training configs: bad ones fail up front with one line naming the file (before Prefect and
before any epoch), several data sets through `data:`, and `sample_seed`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nucleiflow.pipeline.train import loop as training
from nucleiflow.pipeline.train.card import build_card
from nucleiflow.pipeline.train.config import TrainConfig
from trainruns import EVAL_NAME, NAMES, config, nucleiflow, output, quiet, write


# -- bad configs --------------------------------------------------------------------------
BROKEN = {
    "missing key": (lambda c: c.pop("name"), "name: Field required"),
    "unknown key": (lambda c: c.update(bogus=1), "bogus"),
    "unknown nested key": (lambda c: c["train"].update(bogus=1), "train.bogus"),
    "test image in names": (lambda c: c["data"]["names"].append(EVAL_NAME), EVAL_NAME),
    "unknown eval name": (lambda c: c["data"].update(eval_names=["nope"]), "nope"),
    "no data": (lambda c: c["data"].update(root="/nonexistent/data"), "splits.csv"),
}


@pytest.mark.parametrize("case", ["missing key", "unknown key"])
def test_bad_config_exits_2_with_one_line(shared_data, tmp_path, env, case):
    change, words = BROKEN[case]
    cfg = config(shared_data, tmp_path)
    change(cfg)
    path = write(cfg, tmp_path / "broken.yaml")
    proc = nucleiflow("train", str(path), env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, output(proc)[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and words in lines[0]
    assert "Traceback" not in output(proc)
    assert not Path(cfg["work"]).exists()  # failed before training started


@pytest.mark.parametrize("case", BROKEN)
def test_read_config_errors_name_the_file_on_one_line(shared_data, tmp_path, case):
    """What `nucleiflow train` prints: read_config's ValueError (the CLI adds 'nucleiflow: error:')."""
    from nucleiflow.flows.train import read_config

    change, words = BROKEN[case]
    cfg = config(shared_data, tmp_path)
    change(cfg)
    path = write(cfg, tmp_path / "broken.yaml")
    with pytest.raises(ValueError) as e:
        read_config(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value) and words in str(e.value)


def test_read_config_accepts_the_ci_config(shared_data, tmp_path):
    from nucleiflow.flows.train import read_config

    cfg = read_config(write(config(shared_data, tmp_path), tmp_path / "ok.yaml"))
    assert cfg.primary.names == NAMES[:3] and cfg.train.epochs == 3


# -- several data sets ----------------------------------------------------------------------
def test_trains_on_two_data_sets_through_the_config(shared_data, tmp_path):
    """`data` as a list: both sets are sampled, validation is carved from each (TNBC by
    patient), and the card records both."""
    tnbc = ["tnbc_01_1", "tnbc_01_2", "tnbc_02_1", "tnbc_02_2"]
    raw = config(shared_data, tmp_path, train={"epochs": 1, "steps_per_epoch": 3, "batch_size": 4},
                 augment={"scale": 0.2, "blur_p": 0.5, "jpeg_p": 0.5, "focus": 0.5})
    raw["data"] = [raw["data"], {"root": str(shared_data / "tnbc"), "names": tnbc, "group_by": "patient",
                                 "val_fraction": 0.5, "weight": 1.0, "eval_split": "test"}]
    cfg = TrainConfig.model_validate(raw)
    result, log = quiet(cfg)
    sampled = result["sampled"]
    assert set(sampled) == {str(shared_data / "monuseg"), str(shared_data / "tnbc")}
    assert all(n > 0 for n in sampled.values()) and sum(sampled.values()) == 3 * 4
    (_, _), (tnbc_train, tnbc_val) = result["splits"]
    patients = lambda names: {n.split("_")[1] for n in names}  # noqa: E731
    assert tnbc_val and patients(tnbc_train).isdisjoint(patients(tnbc_val))
    card = build_card(cfg, result, None, {"np": 2, "hv": 2})
    assert [s["root"] for s in card["data"]["sets"]] == list(sampled)
    assert [s["patches_sampled"] for s in card["data"]["sets"]] == list(sampled.values())
    assert card["training"]["augment"]["scale"] == 0.2


def test_an_auxiliary_set_trains_without_validation_or_scores(shared_data, tmp_path):
    """dsb2018-he as an auxiliary set (``val_fraction: 0``, ``eval_split: null``, ``blank_mpp:
    skip``): every train image with an mpp trains, none validates, and it is sampled."""
    dsb = shared_data / "dsb2018-he"
    raw = config(shared_data, tmp_path, train={"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "patch": 64})
    aux = {"root": str(dsb), "val_fraction": 0, "eval_split": None, "weight": 1.0}
    with pytest.raises(ValueError, match="mpp must be a positive number"):  # two rows have no mpp
        training.split_records(TrainConfig.model_validate({**raw, "data": [raw["data"], aux]}))
    cfg = TrainConfig.model_validate({**raw, "data": [raw["data"], {**aux, "blank_mpp": "skip"}]})
    rows = (dsb / "splits.csv").read_text().splitlines()[1:]
    with_mpp = [r.split(",")[0] for r in rows if r.split(",")[3].strip()]
    assert 0 < len(with_mpp) < len(rows)
    (_, _), (dsb_train, dsb_val) = training.split_records(cfg)
    assert sorted(dsb_train) == sorted(with_mpp) and dsb_val == []
    result, _ = quiet(cfg)
    assert result["sampled"][str(dsb)] > 0
    with pytest.raises(ValueError, match="eval_split"):  # the primary set's scores are the card's
        TrainConfig.model_validate({**raw, "data": [aux, raw["data"]]})
    with pytest.raises(ValueError, match="no data set holds validation"):
        training.split_records(TrainConfig.model_validate({**raw, "data": [{**raw["data"], "val_fraction": 0}]}))


def test_a_set_can_only_validate(shared_data, tmp_path):
    """dsb2018-he at weight 0 with ``val_fraction`` > 0 (and ``blank_mpp: skip``, which its
    validation images obey too): never trained on, it gives the validation loss, e.g. of a
    refit whose other sets hold nothing out."""
    dsb = shared_data / "dsb2018-he"
    raw = config(shared_data, tmp_path, train={"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "patch": 64})
    watch = {"root": str(dsb), "weight": 0, "val_fraction": 0.3, "eval_split": None, "blank_mpp": "skip"}
    cfg = TrainConfig.model_validate({**raw, "data": [{**raw["data"], "val_fraction": 0}, watch]})
    (_, primary_val), (_, dsb_val) = training.split_records(cfg)
    assert primary_val == [] and len(dsb_val) > 0
    result, _ = quiet(cfg)
    assert result["sampled"][str(dsb)] == 0 and result["val_names"] == dsb_val
    assert result["history"][0]["val_loss"] > 0


def test_sample_seed_gives_new_batches_on_the_same_validation_images(shared_data, tmp_path):
    """A later round keeps its validation images (``seed``) but draws new patches
    (``sample_seed``); unset, the config key is what it was before the field (and ``ema``) existed."""
    from nucleiflow.pipeline.config import config_hash

    base = config(shared_data, tmp_path)
    a = TrainConfig.model_validate(base)
    b = TrainConfig.model_validate(config(shared_data, tmp_path, train={"sample_seed": 7}))
    splits_a, sampler_a, _ = training._data(a, log=lambda _: None)
    splits_b, sampler_b, _ = training._data(b, log=lambda _: None)
    assert splits_a == splits_b
    assert not torch.equal(sampler_a.sample(2)["image"], sampler_b.sample(2)["image"])
    dumped = a.model_dump(exclude={"out", "device", "eval_tile_size", "tune_postprocess"})
    del dumped["train"]["sample_seed"], dumped["train"]["ema"], dumped["data"][0]["blank_mpp"]
    del dumped["train"]["keep"]
    assert a.key() == config_hash(dumped) != b.key()
