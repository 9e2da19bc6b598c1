"""GoLo: two-stage global-local nuclei segmentation (Shakya et al., CVIP 2024).

Stage 1 (global) sees the whole tile downscaled and predicts a coarse mask; stage 2 (local)
refines it on crops of RGB + upsampled stage-1 probability, optionally with a ring of
context around each crop (local and global views, Arab Loodaricheh et al.: zero padding at
the image border, prediction taken from the centre). All crops of a batch run as one batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import UNet


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (N,C,H,W); antialiased when shrinking so thin nuclei do not alias."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if size[0] >= x.shape[-2] and size[1] >= x.shape[-1]:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    # The antialiased kernel lacks half/bfloat16 on some devices: run it in float32.
    y = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return y.to(x.dtype)


#: Crops the local U-Net runs at once in eval mode (`GoLo._local`).
LOCAL_BATCH = 32


def to_crops(x: Tensor, crop: int, context: int = 0) -> tuple[Tensor, tuple[int, int]]:
    """Cut (B,C,H,W) into a grid of crops, each with a `context` px ring (zeros past the border).

    Returns (crops (B*nh*nw, C, crop+2*context, crop+2*context), (nh, nw)); crops are in
    row-major grid order per image. The grid covers ceil(H/crop) x ceil(W/crop) crops.
    """
    b, c, h, w = x.shape
    nh, nw = math.ceil(h / crop), math.ceil(w / crop)
    k = crop + 2 * context
    x = F.pad(x, (context, context + nw * crop - w, context, context + nh * crop - h))
    # Strided views (no copy) -> (B, C, nh, nw, k, k); one reshape makes the batch.
    patches = x.unfold(2, k, crop).unfold(3, k, crop)
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(b * nh * nw, c, k, k), (nh, nw)


def from_crops(crops: Tensor, grid: tuple[int, int], size: tuple[int, int],
               context: int = 0) -> Tensor:
    """Inverse of `to_crops`: keep each crop's centre, stitch, crop to `size` -> (B,C,H,W)."""
    nh, nw = grid
    k = crops.shape[-1]
    crop = k - 2 * context
    centre = crops[..., context:context + crop, context:context + crop]
    n, c = centre.shape[:2]
    out = centre.reshape(n // (nh * nw), nh, nw, c, crop, crop).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(n // (nh * nw), c, nh * crop, nw * crop)[..., : size[0], : size[1]]


class GoLo(nn.Module):
    """(B,3,H,W) RGB in [0,1] -> {"mask" | "np"+"hv", "coarse"[, "marker"]}: raw outputs.

    global_scale: stage-1 input size / tile size (paper: whole image resized to 224).
    crop: local crop side in px at input resolution (paper: 100).
    local_scale: crops (with their context) are resized by this factor for the local UNet
        and its outputs resized back (paper: 100 -> 224, i.e. 2.24); 1.0 = no resize.
    context: px of context ring around each crop (local+global views paper: 64).
    marker: stage 2 also predicts USE-Net shape markers.
    hv: stage 2 carries HoVer-Net's NP + HV heads ("np" (B,2,H,W) logits, "hv" (B,2,H,W))
        instead of "mask", so its maps go through the same HV watershed as the student's
        (GoLo is architecture-agnostic; this makes it a teacher the student can distil).
    detach_coarse: stage 1 learns only from its own loss, as in the paper where the
        stage-1 mask is an input to stage 2; False trains both end to end.
    """

    def __init__(self, base_channels: int = 16, depth: int = 4, global_scale: float = 0.25,
                 crop: int = 64, local_scale: float = 1.0, context: int = 0,
                 marker: bool = False, se: bool = False, norm: str = "batch",
                 detach_coarse: bool = True, hv: bool = False) -> None:
        super().__init__()
        if not (0 < global_scale and 0 < local_scale and crop > 0 and context >= 0):
            raise ValueError("global_scale, local_scale and crop must be > 0, context >= 0")
        self.in_channels = 3
        self.global_scale, self.local_scale = global_scale, local_scale
        self.crop, self.context, self.detach_coarse = crop, context, detach_coarse
        local_heads = ({"np": 2, "hv": 2} if hv else {"mask": 1}) | {"marker": int(marker)}
        self.outputs = {k: c for k, c in local_heads.items() if c} | {"coarse": 1}
        unet = dict(base_channels=base_channels, depth=depth, se=se, norm=norm)
        self.global_net = UNet(3, {"mask": 1}, **unet)
        self.local_net = UNet(4, local_heads, **unet)

    def _local(self, crops: Tensor) -> dict[str, Tensor]:
        """The local U-Net on (N, 4, k, k) crops. In eval mode in chunks of `LOCAL_BATCH`
        (BatchNorm then holds no batch statistics, so each crop's maps do not depend on its
        neighbours): a batch of four 1152 px tiles is 324 crops of 192 px, and at once their
        activations took golo's peak RSS to 6.7 GB; chunked it is also a little faster
        (cache). Training keeps the whole batch (BatchNorm's statistics)."""
        if self.training or crops.shape[0] <= LOCAL_BATCH:
            return self.local_net(crops)
        parts = [self.local_net(crops[i : i + LOCAL_BATCH]) for i in range(0, crops.shape[0], LOCAL_BATCH)]
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h, w = x.shape[-2:]
        small = (max(1, round(h * self.global_scale)), max(1, round(w * self.global_scale)))
        coarse = resize(self.global_net(resize(x, small))["mask"], (h, w))
        prob = torch.sigmoid(coarse.detach() if self.detach_coarse else coarse)
        crops, grid = to_crops(torch.cat([x, prob], dim=1), self.crop, self.context)
        k = crops.shape[-1]
        k_net = max(1, round(k * self.local_scale))
        local = self._local(resize(crops, (k_net, k_net)))
        out = {name: from_crops(resize(y, (k, k)), grid, (h, w), self.context)
               for name, y in local.items()}
        out["coarse"] = coarse
        return out
