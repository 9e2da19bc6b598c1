"""Exponential moving average of a model's weights (Polyak averaging), for training.

Our CPU runs train with small batches, so the weights of any one step are noisy (the student's
validation loss swung by 0.1 from epoch to epoch). The average of the recent weights is a
better model than the last step's: it is what validation scores and what the checkpoint keeps
when ``train.ema`` is set.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """A copy of ``model`` whose floating-point state (weights and BatchNorm statistics) follows
    the trained model by ``avg = decay * avg + (1 - decay) * current`` after every step.

    The decay ramps up as ``min(decay, (1 + t) / (10 + t))`` over the first steps ``t``, so a
    run from random weights does not average in its first, useless ones.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), not {decay}")
        self.decay = decay
        self.steps = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current state."""
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        self.steps += 1
        current = model.state_dict()
        for name, avg in self.model.state_dict().items():
            new = current[name].detach()
            if avg.is_floating_point():
                avg.lerp_(new.to(avg.dtype), 1.0 - d)
            else:  # e.g. BatchNorm's num_batches_tracked
                avg.copy_(new)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.steps = int(state["steps"])
