"""Binary morphology of (H, W) bool masks, exactly scipy's results at a fraction of the cost.

The HV watershed fills and opens its seed mask once per tile; scipy's generic iterated
morphology was a visible share of the post-processing time (issue 13).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import disk


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes(mask)`` (H, W) bool, exactly: background not 4-connected to the
    array's edge is filled. One labelling pass instead of scipy's iterated dilation."""
    background, _ = ndi.label(~mask)  # scipy's default (cross) structure, as fill_holes uses
    edge = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    touching = np.unique(edge)
    touching = touching[touching > 0]
    if len(touching) == 1:
        # One background component reaches the edge (a tile's usual case): everything else is
        # the mask or a hole. One comparison instead of a lookup per pixel: ~4x cheaper.
        return background != touching[0]
    outside = np.zeros(int(background.max()) + 1, bool)
    outside[edge] = True
    outside[0] = True  # label 0 is the mask itself
    return mask | ~outside[background]


def open_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """``ndi.binary_opening(mask, structure=disk(radius))`` (H, W) bool, exactly.

    disk(1) is the 3x3 cross and disk(2) the cross twice over (a diamond: their Minkowski
    sum), and eroding or dilating by a sum is doing it by each in turn: two 5-px passes
    cost ~35% less than one 13-px pass on a 1152 px tile. Larger disks are not diamonds.
    """
    if radius > 2:
        return ndi.binary_opening(mask, structure=disk(radius))
    out = np.asarray(mask, dtype=bool)
    for _ in range(radius):
        out = _cross(out, erode=True)
    for _ in range(radius):
        out = _cross(out, erode=False)
    return out


def _cross(mask: np.ndarray, erode: bool) -> np.ndarray:
    """One binary erosion (AND) or dilation (OR) of ``mask`` (H, W) bool by the 3x3 cross,
    outside the array counting as False (scipy's border_value=0): in-place slice operations,
    ~5x cheaper than scipy's generic binary_erosion / binary_dilation, same result."""
    op = np.logical_and if erode else np.logical_or
    out = mask.copy()
    op(out[1:], mask[:-1], out=out[1:])  # the pixel above
    op(out[:-1], mask[1:], out=out[:-1])  # below
    op(out[:, 1:], mask[:, :-1], out=out[:, 1:])  # left
    op(out[:, :-1], mask[:, 1:], out=out[:, :-1])  # right
    if erode:  # the neighbour past the edge is False
        out[0] = out[-1] = False
        out[:, 0] = out[:, -1] = False
    return out
