"""HoVer-UNet student: one U-Net whose output channels are HoVer-Net's branches side by side."""
from __future__ import annotations

from .unet import UNet


class Student(UNet):
    """(B,3,H,W) RGB -> {"np": (B,2,H,W) logits, "hv": (B,2,H,W) linear[, "tp": (B,k,H,W)]}.

    np channel 1 = nucleus; hv channel 0 = horizontal (x), 1 = vertical (y) distance in
    [-1, 1]; tp = nucleus type logits, present when n_types > 0.
    """

    def __init__(self, base_channels: int = 32, depth: int = 4, n_types: int = 0,
                 se: bool = False, norm: str = "batch") -> None:
        super().__init__(3, {"np": 2, "hv": 2, "tp": n_types}, base_channels=base_channels,
                         depth=depth, se=se, norm=norm)
