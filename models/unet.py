"""A plain-torch U-Net with named output heads, the building block of every model here.

Encoder: `depth` max-pool downsamplings of conv-norm-ReLU double conv blocks, channels
doubling from `base_channels`. Decoder: 1x1 conv then bilinear upsampling (or a transposed
conv), concatenation with the skip, double conv. Optional squeeze-and-excitation after every
block (USE-Net, Rundo et al. 2019). One 1x1 conv per head.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("batch", "group", "instance", "none")


def make_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer by name; "group" uses 8 groups (or fewer for narrow layers)."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


class SqueezeExcite(nn.Module):
    """Channel attention: global average pool -> bottleneck MLP -> sigmoid gate (Hu et al.)."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        w = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(w))))


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) x 2, then optional squeeze-and-excitation."""

    def __init__(self, c_in: int, c_out: int, norm: str = "batch", se: bool = False) -> None:
        bias = norm == "none"  # a bias right before a norm layer is wasted
        layers: list[nn.Module] = []
        for c in (c_in, c_out):
            layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=bias), make_norm(norm, c_out),
                       nn.ReLU(inplace=True)]
        if se:
            layers.append(SqueezeExcite(c_out))
        super().__init__(*layers)


class Up(nn.Module):
    """Upsample the deeper map to the skip's size, concatenate, double conv.

    "bilinear" applies the 1x1 channel reduction *before* upsampling: both are linear, so
    this equals upsample-then-1x1 but costs 4x less.
    """

    def __init__(self, c_deep: int, c_skip: int, norm: str, se: bool, mode: str) -> None:
        super().__init__()
        if mode == "bilinear":
            self.reduce: nn.Module = nn.Conv2d(c_deep, c_skip, 1)
        elif mode == "transpose":
            self.reduce = nn.ConvTranspose2d(c_deep, c_skip, 2, stride=2)
        else:
            raise ValueError(f"unknown up mode {mode!r}; expected 'bilinear' or 'transpose'")
        self.mode = mode
        self.conv = DoubleConv(2 * c_skip, c_skip, norm, se)

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        x = self.reduce(deep)
        if self.mode == "bilinear":
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, x], dim=1))


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """Pad (B,C,H,W) at the bottom/right to multiples of `multiple`; returns (padded, (H, W)).

    Reflect padding (no artificial edge); replicate where the image is too small to reflect.
    """
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


class UNet(nn.Module):
    """U-Net: (B, in_channels, H, W) float -> {head: (B, channels, H, W) raw logits/linear}.

    Any H, W works: the input is reflect-padded to a multiple of 2**depth and the outputs
    are cropped back. Heads with 0 channels are omitted.
    """

    def __init__(self, in_channels: int = 3, heads: Mapping[str, int] | None = None,
                 base_channels: int = 32, depth: int = 4, se: bool = False,
                 norm: str = "batch", up: str = "bilinear") -> None:
        super().__init__()
        heads = {"np": 2, "hv": 2} if heads is None else heads
        self.in_channels = in_channels
        self.outputs: dict[str, int] = {k: int(c) for k, c in heads.items() if c > 0}
        if not self.outputs:
            raise ValueError("UNet needs at least one head with channels > 0")
        self.depth = depth
        chans = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([DoubleConv(in_channels, chans[0], norm, se)])
        self.down.extend(DoubleConv(chans[i], chans[i + 1], norm, se) for i in range(depth))
        self.up = nn.ModuleList(Up(chans[i + 1], chans[i], norm, se, up)
                                for i in reversed(range(depth)))
        self.heads = nn.ModuleDict({k: nn.Conv2d(chans[0], c, 1) for k, c in self.outputs.items()})

    def features(self, x: Tensor) -> Tensor:
        """Last decoder feature map (B, base_channels, H', W') of an already padded input."""
        skips = [self.down[0](x)]
        for block in self.down[1:]:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for block in self.up:
            y = block(y, skips.pop())
        return y

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x, (h, w) = pad_to_multiple(x, 2**self.depth)
        y = self.features(x)
        return {k: head(y)[..., :h, :w] for k, head in self.heads.items()}
