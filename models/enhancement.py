"""Two-stage enhancement network (Gupta et al., CVR 2025).

Stage 1: any encoder-decoder (here our UNet) -> probability mask. Stage 2 ("enhancement"):
RGB + stage-1 probability (4 channels) -> three 3x3 convs of 64 filters + ReLU, no
downsampling -> 1x1 conv (logits; the sigmoid is applied by the loss and `to_maps`).
Schedule: train stage 1; freeze it and train stage 2; fine-tune both (`set_stage`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .unet import UNet

STAGES = ("stage1", "stage2", "finetune")


class Enhancement(nn.Module):
    """(B, in_channels, H, W) -> {"mask": (B,1,H,W) logits}; 76,289 weights at the defaults."""

    def __init__(self, in_channels: int = 4, width: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.outputs = {"mask": 1}
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers += [nn.Conv2d(in_channels if i == 0 else width, width, 3, padding=1),
                       nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"mask": self.net(x)}


class TwoStage(nn.Module):
    """(B,3,H,W) RGB -> {"mask": refined logits, "coarse": stage-1 logits}, (B,1,H,W) each.

    stage1: keyword arguments for the stage-1 `UNet` (in_channels and heads are fixed).
    enhancement: keyword arguments for `Enhancement` (in_channels is fixed to 4).
    """

    def __init__(self, stage1: Mapping[str, Any] | None = None,
                 enhancement: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.in_channels = 3
        self.outputs = {"mask": 1, "coarse": 1}
        self.stage1 = UNet(**{**(stage1 or {}), "in_channels": 3, "heads": {"mask": 1}})
        self.enhancement = Enhancement(**{**(enhancement or {}), "in_channels": 4})
        self.stage = "finetune"

    def set_stage(self, stage: str) -> TwoStage:
        """Select what trains: "stage1" (stage 1 only), "stage2" (stage 1 frozen), "finetune".

        Frozen parts get requires_grad=False and stay in eval mode (BatchNorm statistics
        fixed) even after `.train()`.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self.stage = stage
        self.stage1.requires_grad_(stage != "stage2")
        self.enhancement.requires_grad_(stage != "stage1")
        return self.train(self.training)

    def train(self, mode: bool = True) -> TwoStage:
        super().train(mode)
        if self.stage == "stage2":
            self.stage1.eval()
        elif self.stage == "stage1":
            self.enhancement.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        coarse = self.stage1(x)["mask"]
        refined = self.enhancement(torch.cat([x, torch.sigmoid(coarse)], dim=1))["mask"]
        return {"mask": refined, "coarse": coarse}


class EnhancedStudent(nn.Module):
    """The enhancement stage on a HoVer-UNet student: (B,3,H,W) RGB -> {"np": (B,2,H,W)
    refined logits, "hv": (B,2,H,W) the student's, "coarse": (B,1,H,W) the student's
    nucleus logit}.

    Stage 2 sees RGB + the student's nucleus probability and adds a correction to its logit
    (residual; the last conv starts at zero, so training starts from the student exactly).
    "np" carries the refined logit r as [0, r], whose softmax is sigmoid(r): the student's
    loss, maps and post-processing apply unchanged. ``freeze_stage1`` keeps the student's
    weights and BatchNorm statistics fixed (the paper's stage 2), so HV stays the student's.

    stage1: keyword arguments for `Student`; enhancement: for `Enhancement` (in_channels 4).
    """

    def __init__(self, stage1: Mapping[str, Any] | None = None, enhancement: Mapping[str, Any] | None = None,
                 freeze_stage1: bool = True) -> None:
        from .student import Student

        super().__init__()
        self.in_channels = 3
        self.stage1 = Student(**(stage1 or {}))
        self.outputs = {**self.stage1.outputs, "coarse": 1}
        self.enhancement = Enhancement(**{**(enhancement or {}), "in_channels": 4})
        last = self.enhancement.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.freeze_stage1 = bool(freeze_stage1)
        self.stage1.requires_grad_(not self.freeze_stage1)

    def train(self, mode: bool = True) -> EnhancedStudent:
        super().train(mode)
        if self.freeze_stage1:
            self.stage1.eval()
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.stage1(x)
        np_logits = out["np"]
        coarse = np_logits[:, 1:2] - np_logits[:, 0:1]  # log-odds of softmax's nucleus channel
        delta = self.enhancement(torch.cat([x, torch.sigmoid(coarse)], dim=1))["mask"]
        refined = coarse + delta
        return {**out, "np": torch.cat([torch.zeros_like(refined), refined], dim=1), "coarse": coarse}
