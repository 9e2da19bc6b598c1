"""Training targets from instance labels: HoVer-Net distance maps and USE-Net shape markers.

Pure numpy/scipy. Every function works one nucleus at a time inside its bounding box
(``scipy.ndimage.find_objects``), so a 1000x1000 tile with ~600 nuclei takes tens of ms.
Also the dihedral (flip/rot90) transform of targets, which must turn the HV channels too.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage as ndi

_EIGHT = np.ones((3, 3), bool)


def _boxes(inst: np.ndarray):
    """(label, bbox slices, nucleus mask in the bbox) for each non-empty instance."""
    for i, sl in enumerate(ndi.find_objects(inst), start=1):
        if sl is not None:
            yield i, sl, inst[sl] == i


def _normalise_signed(d: np.ndarray) -> np.ndarray:
    """Scale negatives to [-1, 0] and positives to [0, 1] separately (HoVer-Net)."""
    out = np.zeros_like(d)
    neg, pos = d < 0, d > 0
    if neg.any():
        out[neg] = d[neg] / -d[neg].min()
    if pos.any():
        out[pos] = d[pos] / d[pos].max()
    return out


def hv_maps(inst: np.ndarray) -> np.ndarray:
    """HoVer-Net horizontal/vertical distance maps of an instance label image.

    Parameters
    ----------
    inst : (H, W) int
        Instance labels, 0 = background.

    Returns
    -------
    (2, H, W) float32
        Channel 0 = x offset, channel 1 = y offset of each nucleus pixel from its nucleus'
        centre of mass, negatives scaled to [-1, 0] and positives to [0, 1] per nucleus
        and axis (as HoVer-Net's ``gen_instance_hv_map``); 0 on background.
        Unlike HoVer-Net the centroid is not rounded to a pixel, so the maps commute exactly
        with flips and 90-degree rotations (see `dihedral_hv`).

    Examples
    --------
    >>> hv_maps(np.array([[0, 1, 1, 1]]))[0]
    array([[ 0., -1.,  0.,  1.]], dtype=float32)
    """
    inst = np.asarray(inst)
    hv = np.zeros((2,) + inst.shape, np.float32)
    for _, sl, m in _boxes(inst):
        ys, xs = np.nonzero(m)
        for c, coords in enumerate((xs, ys)):
            d = coords - coords.mean()
            hv[c][sl][m] = _normalise_signed(d.astype(np.float64))
    return hv


def shape_markers(inst: np.ndarray, fraction: float = 0.3, min_radius: float = np.sqrt(2)) -> np.ndarray:
    """USE-Net shape markers: each nucleus eroded in proportion to its size.

    A pixel of a nucleus is kept when its Euclidean distance to the nearest pixel outside
    the nucleus (background or another nucleus) exceeds ``r = max(min_radius, fraction *
    sqrt(area / pi))``. The default ``min_radius`` removes the whole 8-connected rim, so
    markers of touching nuclei are never 8-connected. A nucleus that would vanish keeps its
    innermost pixels instead (the maximum of its distance transform), so every nucleus has
    a marker; where erosion splits a nucleus only the largest piece is kept, so every
    nucleus has exactly one 8-connected marker.

    Parameters
    ----------
    inst : (H, W) int
        Instance labels, 0 = background.
    fraction : float
        Erosion radius as a fraction of the equivalent radius.
    min_radius : float
        Smallest erosion radius in px.

    Returns
    -------
    (H, W) uint8
        1 on markers, 0 elsewhere.
    """
    inst = np.asarray(inst)
    out = np.zeros(inst.shape, np.uint8)
    for _, sl, m in _boxes(inst):
        # Pad so the bbox edge counts as outside: it is by definition not this nucleus.
        dist = ndi.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        r = max(min_radius, fraction * np.sqrt(m.sum() / np.pi))
        keep = dist > r
        if not keep.any():
            keep = m & (dist == dist.max())
        comps, n = ndi.label(keep, structure=_EIGHT)
        if n > 1:  # a waist or a split label: one seed per nucleus, the largest piece
            keep = comps == 1 + np.argmax(np.bincount(comps.ravel())[1:])
        out[sl][keep] = 1
    return out


def type_map(inst: np.ndarray, types: np.ndarray | Mapping[int, int]) -> np.ndarray:
    """(H, W) int64 class map from a per-pixel map or a ``{instance id: class}`` mapping."""
    inst = np.asarray(inst)
    if isinstance(types, Mapping):
        lut = np.zeros(int(inst.max()) + 1, np.int64)
        for i, t in types.items():
            if 0 < i < lut.size:
                lut[i] = t
        return lut[inst]
    types = np.asarray(types)
    if types.shape != inst.shape:
        raise ValueError(f"types shape {types.shape} != labels shape {inst.shape}")
    return np.where(inst > 0, types, 0).astype(np.int64)


def make_targets(inst: np.ndarray, types: np.ndarray | Mapping[int, int] | None = None) -> dict[str, np.ndarray]:
    """All training targets of one image.

    Returns a dict with "inst" (H, W) int32, "mask" (H, W) uint8 0/1, "hv" (2, H, W) float32
    in [-1, 1], "marker" (H, W) uint8 0/1 and, when ``types`` is given (per-pixel (H, W)
    map or ``{instance id: class}``), "type" (H, W) int64 (0 on background).
    """
    inst = np.asarray(inst).astype(np.int32, copy=False)
    t = {
        "inst": inst,
        "mask": (inst > 0).astype(np.uint8),
        "hv": hv_maps(inst),
        "marker": shape_markers(inst),
    }
    if types is not None:
        t["type"] = type_map(inst, types)
    return t


def dihedral(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Flip the last axis (x) if ``flip``, then rotate the last two axes by ``k * 90`` degrees
    (``np.rot90``: counter-clockwise as displayed with y down)."""
    if flip:
        a = a[..., ::-1]
    return np.ascontiguousarray(np.rot90(a, k, axes=(-2, -1)))


def dihedral_hv(hv: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """`dihedral` for (2, H, W) HV maps: moves pixels and turns the offset vectors with them.

    A flip of x negates the x channel; one ``np.rot90`` maps (y, x) -> (W-1-x, y), so the new
    x offset is the old y offset and the new y offset is minus the old x offset.
    """
    hx, hy = hv[0], hv[1]
    if flip:
        hx = -hx[:, ::-1]
        hy = hy[:, ::-1]
    for _ in range(k % 4):
        hx, hy = np.rot90(hy), -np.rot90(hx)
    return np.ascontiguousarray(np.stack([hx, hy]).astype(np.float32, copy=False))


def dihedral_targets(t: Mapping[str, np.ndarray], k: int, flip: bool) -> dict[str, np.ndarray]:
    """Apply the same flip/rotation to every (..., H, W) target, turning "hv" correctly."""
    return {key: dihedral_hv(v, k, flip) if key == "hv" else dihedral(v, k, flip) for key, v in t.items()}
