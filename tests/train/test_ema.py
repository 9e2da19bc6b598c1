"""The weight average (`train.ema`): its arithmetic on a tiny net, and the loop using it for
validation, the checkpoint and resume."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from nucleiflow.pipeline.train import loop as training
from nucleiflow.pipeline.train.config import TrainConfig
from nucleiflow.pipeline.train.ema import WeightAverage
from trainruns import config, quiet


def _net(value: float) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.fill_(value)
    return net


def test_average_follows_the_model_with_a_warm_up():
    model = _net(0.0)
    ema = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.fill_(1.0)
    model[1].num_batches_tracked.fill_(7)
    ema.update(model)  # step 0: decay min(0.9, 1/10) = 0.1, so 0.9 of the way to the model
    assert torch.allclose(ema.model[0].weight, torch.full_like(ema.model[0].weight, 0.9))
    assert torch.allclose(ema.model[1].running_mean, torch.full((2,), 0.9))  # statistics too
    assert int(ema.model[1].num_batches_tracked) == 7  # integers are copied, not averaged
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.model[0].weight, torch.ones_like(ema.model[0].weight), atol=1e-6)
    # The average is its own copy: training the model does not touch it.
    assert ema.model[0].weight.data_ptr() != model[0].weight.data_ptr()
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_average_state_round_trips():
    a = WeightAverage(_net(0.0), decay=0.99)
    a.update(_net(1.0))
    b = WeightAverage(_net(5.0), decay=0.99)
    b.load_state_dict(a.state_dict())
    assert b.steps == 1
    assert torch.equal(b.model[0].weight, a.model[0].weight)


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_decay_out_of_range_is_refused(decay):
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(_net(0.0), decay=decay)


def test_loop_keeps_the_average(shared_data, tmp_path):
    """With ema the checkpoint is the average, not the last step's weights, and last.pt carries
    it; without ema the config key is what it was before the field existed."""
    plain = TrainConfig.model_validate(config(shared_data, tmp_path, train={"epochs": 1, "steps_per_epoch": 2}))
    cfg = TrainConfig.model_validate(config(shared_data, tmp_path, train={
        "epochs": 1, "steps_per_epoch": 2, "patch": 64, "ema": 0.5}))
    assert "ema" not in plain.model_dump_json(exclude_none=True) and cfg.key() != plain.key()
    res, _ = quiet(cfg)
    state = torch.load(Path(cfg.work) / "last.pt", weights_only=False)
    assert state["ema"]["steps"] == 2
    trained = res["model"].state_dict()
    for name, avg in state["ema"]["model"].items():
        assert torch.equal(trained[name].cpu(), avg.cpu())
    assert any(not torch.equal(state["model"][k], v) for k, v in state["ema"]["model"].items()
               if v.is_floating_point())


def test_interrupted_run_resumes_its_average(shared_data, tmp_path, monkeypatch):
    """A run that dies in its second epoch and is run again ends with the average an
    uninterrupted run ends with."""
    def cfg(work: str) -> TrainConfig:
        return TrainConfig.model_validate(config(shared_data, tmp_path / work, train={
            "epochs": 2, "steps_per_epoch": 2, "patch": 64, "ema": 0.5}))

    whole, _ = quiet(cfg("whole"))
    real, calls = training.validation_loss, []

    def dies_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "validation_loss", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        quiet(cfg("cut"))
    monkeypatch.setattr(training, "validation_loss", real)
    resumed, log = quiet(cfg("cut"))
    assert any("resuming from epoch 1" in line for line in log)
    state = torch.load(Path(cfg("cut").work) / "last.pt", weights_only=False)
    assert state["ema"]["steps"] == 4
    for name, t in whole["model"].state_dict().items():
        assert torch.allclose(t, resumed["model"].state_dict()[name], atol=1e-6), name
