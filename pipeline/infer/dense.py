"""The dense, mask-free part of post-processing, in torch on the model's device.

`postprocess.edge_map.hv_edge` (NumPy, the reference) turns the two HV maps of a tile into
one edge map with four long separable correlations: the costliest dense step a worker does;
`edge_map.hv_energy` blurs it into the flood's energy and thresholds it into the seed
candidates. Here the same maps are computed on the device the model ran on (on CPU the same
code), so the workers get "energy" (B, H, W) float32 and "seedable" (B, H, W) bool instead of
"hv" (B, 2, H, W): a quarter less to pickle per tile (prob + energy + seedable, 9 B/px,
instead of prob + hv, 12 B/px) and no Sobel or blur work in the workers.

The result is bit for bit the NumPy one, not merely close: each correlation runs in float64
in `scipy.ndimage.correlate1d`'s own order (centre tap, then the mirrored pairs from the
outermost in, which is how scipy uses the kernels' (anti)symmetry), is rounded to float32
between the passes as scipy's float32 output is, and the scaling is float32 arithmetic with
the same scalars. So seams, ids and tables do not depend on where the edge was computed
(tests/infer/test_dense.py). The mask-dependent steps (components, markers, watershed) stay
in the workers: they are branchy, sequential and cheap next to the correlations.

Torch is imported here, so the worker module (`infer.workers`) must never import this one.
"""
from __future__ import annotations

from collections.abc import Mapping
from inspect import signature

import numpy as np
import torch
import torch.nn.functional as F

from nucleiflow.pipeline.config import PostprocessConfig
from nucleiflow.pipeline.postprocess.edge_map import BLUR, EDGE_PARAMS, ENERGY_PARAMS, edge_setup
from nucleiflow.pipeline.postprocess.watershed import hv_watershed_pixels

__all__ = ["DENSE_KEYS", "correlate1d", "dense_maps", "dense_params", "hv_edge", "hv_energy"]

#: The maps `dense_maps` puts in place of "hv".
DENSE_KEYS = ("energy", "seedable")


def _symmetry(w: np.ndarray) -> int:
    """1 symmetric, -1 antisymmetric, 0 neither (scipy's test, DBL_EPSILON tolerance)."""
    r, eps = len(w) // 2, np.finfo(np.float64).eps
    if len(w) % 2 == 0:
        return 0
    if all(abs(w[r + i] - w[r - i]) <= eps for i in range(1, r + 1)):
        return 1
    if all(abs(w[r + i] + w[r - i]) <= eps for i in range(1, r + 1)):
        return -1
    return 0


def correlate1d(x: torch.Tensor, weights: np.ndarray, dim: int) -> torch.Tensor:
    """``scipy.ndimage.correlate1d(x, weights, axis=dim, mode="mirror")`` of a float32 (B, H, W)
    tensor along ``dim`` (1 = y, 2 = x), bit for bit; float32 out.

    Odd, (anti)symmetric ``weights`` only (Sobel and binomial kernels are), shorter than
    twice the axis (mirror padding reflects once).
    """
    w = [float(v) for v in np.asarray(weights, np.float64)]
    sym, r, n = _symmetry(np.asarray(w)), len(w) // 2, x.shape[dim]
    if sym == 0:
        raise ValueError("weights must be odd-sized and symmetric or antisymmetric")
    if r >= n:
        raise ValueError(f"a {len(w)}-tap kernel needs an axis longer than {r} px, got {n}")
    pad = (r, r, 0, 0) if dim == 2 else (0, 0, r, r)
    # "mirror" (d c b | a b c d | c b a) is torch's "reflect"; 4-D for 2-D padding.
    xp = F.pad(x.double().unsqueeze(1), pad, mode="reflect").squeeze(1)

    def tap(j: int) -> torch.Tensor:  # x[i + j] for every output i
        return xp.narrow(dim, r + j, n)

    acc = tap(0) * w[r]
    pair = torch.empty_like(acc)
    for j in range(r, 0, -1):  # scipy: jj = -r .. -1, (x[i+jj] +/- x[i-jj]) * w[jj]
        (torch.add if sym > 0 else torch.sub)(tap(-j), tap(j), out=pair)
        acc += pair.mul_(w[r - j])  # a separate multiply and add: no fused multiply-add
    return acc.float()


def _minmax(a: torch.Tensor) -> torch.Tensor:
    """Per tile of (B, H, W): `edge_map._minmax` (constant tile -> zeros)."""
    lo = a.amin(dim=(1, 2), keepdim=True)
    hi = a.amax(dim=(1, 2), keepdim=True)
    flat = (hi.double() - lo.double()) <= 1e-12
    return torch.where(flat, torch.zeros_like(a), (a - lo) / (hi - lo))


def hv_edge(hv: torch.Tensor, **setup) -> torch.Tensor:
    """`edge_map.hv_edge` of a batch: hv (B, 2, H, W) float -> edge (B, H, W) float32 in
    [0, 1], on hv's device. ``setup``: `edge_map.edge_setup`'s keywords."""
    if hv.ndim != 4 or hv.shape[1] != 2:
        raise ValueError(f"hv must be (B, 2, H, W), got shape {tuple(hv.shape)}")
    s = edge_setup(**setup)
    hv = hv.float()
    if s.bounds is None:
        h, v = _minmax(hv[:, 0]), _minmax(hv[:, 1])
        norm = _minmax
    else:
        h, v = hv[:, 0].clamp(-1, 1), hv[:, 1].clamp(-1, 1)
        lo, hi = s.bounds

        def norm(a: torch.Tensor) -> torch.Tensor:
            return ((a - lo) / (hi - lo)).clamp(0.0, 1.0)
    dh = correlate1d(correlate1d(h, s.deriv, 2), s.smooth, 1)  # d/dx, then smoothed along y
    dv = correlate1d(correlate1d(v, s.deriv, 1), s.smooth, 2)  # d/dy, then smoothed along x
    return torch.maximum(1.0 - norm(dh), 1.0 - norm(dv))


def hv_energy(prob: torch.Tensor, edge: torch.Tensor, prob_threshold: float,
              marker_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`edge_map.hv_energy` of a batch, bit for bit: prob (B, H, W) float32 (the values the
    workers get), edge (B, H, W) float32 -> (energy (B, H, W) float32, seedable (B, H, W) bool)."""
    energy = (1.0 - edge) * (prob >= float(prob_threshold))  # float32: * 1 or * 0, exact
    energy = correlate1d(correlate1d(energy, BLUR, 2), BLUR, 1).neg_()  # along x, then y
    return energy, edge < float(marker_threshold)


def dense_params(post: PostprocessConfig) -> dict:
    """The card values the "hv" dense maps depend on (the edge's and the energy's); maps made
    with other values must not be reused (`predictor.ReplayPredictor`)."""
    given = post.params()
    params = {k: v for k, v in given.items() if k in EDGE_PARAMS}
    defaults = signature(hv_watershed_pixels).parameters  # unset = the function's own default
    params.update({k: float(given.get(k, defaults[k].default)) for k in ENERGY_PARAMS})
    return params


def dense_maps(maps: Mapping[str, torch.Tensor], post: PostprocessConfig) -> dict[str, torch.Tensor]:
    """The maps the workers need for ``post``, with its dense part done here.

    For "hv": "hv" (B, 2, H, W) is replaced by "energy" (B, H, W) float32 and "seedable"
    (B, H, W) bool (`hv_edge`, `hv_energy` with the card's ksize / normalise /
    gradient_range / prob_threshold / marker_threshold); tiles too small for the kernel keep
    "hv" (the workers' NumPy path handles any size). Other methods: the maps as they are.
    """
    out = dict(maps)
    if post.method != "hv" or "hv" not in out:
        return out
    params = dense_params(post)
    edge_kw = {k: params[k] for k in params if k in EDGE_PARAMS}
    r = edge_setup(**edge_kw).deriv.size // 2
    if min(out["hv"].shape[-2:]) <= r:
        return out
    edge = hv_edge(out.pop("hv"), **edge_kw)
    prob = out["prob"].float()  # the float32 values the workers threshold
    prob = prob[:, 0] if prob.ndim == 4 else prob
    out["energy"], out["seedable"] = hv_energy(prob, edge, params["prob_threshold"], params["marker_threshold"])
    return out
