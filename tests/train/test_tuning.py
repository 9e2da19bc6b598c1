"""Post-processing thresholds are chosen on validation (train-split) images only."""
from __future__ import annotations

import pytest
import torch

from nucleiflow.models.registry import create_model
from nucleiflow.pipeline.infer.predictor import Predictor
from nucleiflow.pipeline.train.tuning import GRIDS, tune_postprocess


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    net = create_model("student", base_channels=4, depth=2)
    return Predictor(net, {"mpp": 1.0, "postprocess": {"method": "hv"}}, device="cpu")


def test_returns_a_setting_from_the_grid(predictor, shared_data):
    best, score = tune_postprocess(predictor, [(shared_data / "monuseg", ["TCGA-18-5592-01Z-00-DX1"])],
                                   {"method": "hv", "min_size": 4, "ksize": 5})
    assert best["method"] == "hv" and best["min_size"] == 4 and best["ksize"] == 5
    for k, values in GRIDS["hv"].items():
        assert best[k] in values
    assert 0.0 <= score <= 1.0


def test_refuses_test_images(predictor, shared_data):
    with pytest.raises(ValueError, match="validation"):
        tune_postprocess(predictor, [(shared_data / "monuseg", ["TCGA-2Z-A9J9-01A-01-TS1"])], {"method": "hv"})


def test_tuning_scores_the_path_evaluate_scores(predictor, shared_data):
    """The score tuning reports for its best setting ((AJI + PQ) / 2) is what `evaluate`
    (tiled slide path) gives with that setting: tuning replays recorded maps through the
    same tiles."""
    from nucleiflow.pipeline.infer.predictor import Predictor
    from nucleiflow.pipeline.train.evaluation import evaluate

    name = "TCGA-18-5592-01Z-00-DX1"
    best, score = tune_postprocess(predictor, [(shared_data / "monuseg", [name])], {"method": "hv"})
    tuned = Predictor(predictor.model, {"mpp": 1.0, "postprocess": best}, device="cpu")
    res = evaluate(tuned, shared_data / "monuseg", split="train", names=[name])
    assert (res["mean"]["aji"] + res["mean"]["pq"]) / 2 == pytest.approx(score, abs=1e-9)


def test_replay_refuses_a_different_plan(predictor):
    import numpy as np

    from nucleiflow.pipeline.infer.predictor import RecordingPredictor

    rec = RecordingPredictor(predictor)
    rec(np.zeros((2, 64, 64, 3), np.uint8))
    replay = rec.replay()
    with pytest.raises(RuntimeError, match="does not match"):
        replay(np.zeros((1, 64, 64, 3), np.uint8))
    replay(np.zeros((2, 64, 64, 3), np.uint8))
    with pytest.raises(RuntimeError, match="ran past"):
        replay(np.zeros((2, 64, 64, 3), np.uint8))
