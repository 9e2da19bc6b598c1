"""Oracle "models" for whole-slide tests: fixed, translation-equivariant functions of the
slide's pixels, so seams and label/table agreement can be tested on nuclei that look like
nuclei (a trained model's maps differ from tile to tile).

- ``Decode``: the slide *encodes* a ground truth's maps (red = 255 - 255 * NP, green/blue =
  HV, their magnitude varied smoothly over the slide as a model's would), and the model
  decodes them: the real HV watershed runs on HoVer-Net-like maps;
- ``Dark``: fixed convolutions on a real H&E tile (grey level, 5x5 mean, threshold),
  post-processed with the distance watershed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage as ndi

from nucleiflow.pipeline.train.targets import hv_maps

ORACLE_IMAGE = "TCGA-2Z-A9J9-01A-01-TS1"  # MoNuSeg test image, 0.25 um/px, 575 nuclei


class Decode(torch.nn.Module):
    """Oracle: NP probability = 1 - red, HV = green/blue rescaled to [-1, 1]."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        p = (1 - x[:, :1]).clamp(1e-4, 1 - 1e-4)
        return {"mask": torch.logit(p), "hv": x[:, 1:] * 2 - 1}


class Dark(torch.nn.Module):
    """Oracle on real H&E: fixed convolutions, nucleus where the 5x5 mean grey is < 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.grey = torch.nn.Conv2d(3, 1, 1, bias=False)
        self.blur = torch.nn.Conv2d(1, 1, 5, padding=2, bias=False, padding_mode="replicate")
        with torch.no_grad():
            self.grey.weight[:] = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            self.blur.weight[:] = 1 / 25

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mask": 25 * (0.5 - self.blur(self.grey(x)))}


def encode_maps(gt: np.ndarray, amplitude: float = 0.8) -> np.ndarray:
    """(H, W, 3) uint8 image whose pixels are the NP and HV maps of labels ``gt``.

    Glass (white, what readers give past the slide edge) decodes as background. The HV
    magnitude is scaled by a smooth field in [1 - amplitude, 1], so per-tile min-max
    normalisation in the HV watershed sees different ranges in different tiles.
    """
    field = ndi.gaussian_filter(np.random.default_rng(0).normal(size=gt.shape), 40)
    field = 1 - amplitude * (field - field.min()) / (field.max() - field.min())
    hv = hv_maps(gt) * field
    red = np.where(gt > 0, 0, 255)
    return np.stack([red, np.rint((hv[0] + 1) * 127.5), np.rint((hv[1] + 1) * 127.5)], -1).astype(np.uint8)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB") if im.mode not in ("I;16", "I") else im)
