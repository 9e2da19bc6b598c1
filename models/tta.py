"""Test-time augmentation: the model's maps averaged over flips and 90-degree rotations.

Each view is the batch flipped (x) and/or rotated; its maps are turned back before averaging.
HV maps are offset vectors, so turning them back also turns the vectors: a flip of x negates
the x channel, a rotation swaps the channels with a sign (the inverse of
`pipeline.train.targets.dihedral_hv`, which makes the training targets the same way).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# (rotations k, flip x) of the views, in the order `tta_maps` uses them: TTA with n views
# uses the first n (2: + x flip; 4: + rotations by 180 and 90; 8: the dihedral group).
VIEWS: tuple[tuple[int, bool], ...] = ((0, False), (0, True), (2, False), (1, False),
                                       (2, True), (3, False), (1, True), (3, True))


def view(x: Tensor, k: int, flip: bool) -> Tensor:
    """(B, C, H, W) -> the view: flip the last axis if ``flip``, then rotate by ``k * 90``
    degrees as `torch.rot90(dims=(-2, -1))` (and `np.rot90`) does."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x


def unview(m: Tensor, k: int, flip: bool) -> Tensor:
    """Inverse of `view` for scalar maps (B, C, H, W)."""
    if k % 4:
        m = torch.rot90(m, -k, dims=(-2, -1))
    return m.flip(-1) if flip else m


def unview_hv(hv: Tensor, k: int, flip: bool) -> Tensor:
    """Inverse of `view` for (B, 2, H, W) HV maps (channel 0 = x offset, 1 = y offset)."""
    hx, hy = hv[:, 0], hv[:, 1]
    for _ in range(k % 4):
        # forward: (hx, hy) -> (rot(hy), -rot(hx)); so back: hx = -rot^-1(hy'), hy = rot^-1(hx')
        hx, hy = -torch.rot90(hy, -1, dims=(-2, -1)), torch.rot90(hx, -1, dims=(-2, -1))
    if flip:
        hx, hy = -hx.flip(-1), hy.flip(-1)
    return torch.stack([hx, hy], dim=1)


def tta_maps(predict: Callable[[Tensor], dict[str, Tensor]], x: Tensor, n: int) -> dict[str, Tensor]:
    """Mean of ``predict`` (input (B, 3, H, W) -> maps (B, C, H, W)) over the first ``n`` VIEWS."""
    if not 1 <= n <= len(VIEWS):
        raise ValueError(f"TTA takes 1 to {len(VIEWS)} views, got {n}")
    total: dict[str, Tensor] = {}
    for k, flip in VIEWS[:n]:
        maps = predict(view(x, k, flip))
        for key, m in maps.items():
            back = unview_hv(m.float(), k, flip) if key == "hv" else unview(m.float(), k, flip)
            total[key] = total[key] + back if key in total else back
    return {key: m / n for key, m in total.items()}
