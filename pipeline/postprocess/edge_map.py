"""The dense part of the HV post-processing: the edge map, where the horizontal / vertical
distance maps jump, i.e. between touching nuclei (HoVer-Net's Sobel step, `hv_edge`), and
from it the flood's energy and where seeds may grow (`hv_energy`). Neither needs the
cleaned mask: `infer.dense` computes the same bits in torch on the model's device.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import comb

import numpy as np
from scipy import ndimage as ndi


def _sobel_kernels(ksize: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's Sobel kernels of odd size ``ksize``: (smoothing, first derivative), float64.

    Smoothing: binomial coefficients of order ksize-1; derivative: binomial of order
    ksize-2 convolved with [-1, 1]. For ksize=3: [1, 2, 1] and [-1, 0, 1].
    """
    if ksize < 3 or ksize % 2 == 0:
        raise ValueError(f"ksize must be odd and >= 3, got {ksize}")
    smooth = np.array([comb(ksize - 1, k) for k in range(ksize)], float)
    deriv = np.convolve([comb(ksize - 2, k) for k in range(ksize - 1)], [-1.0, 1.0])
    return smooth, deriv


def separable(
    image: np.ndarray, along_x: np.ndarray, along_y: np.ndarray, transpose: bool = False
) -> np.ndarray:
    """Correlate ``image`` (H, W) with ``along_x`` on axis 1 and ``along_y`` on axis 0
    (swapped if ``transpose``), like cv2.filter2D/Sobel with their default border
    (BORDER_REFLECT_101, scipy's "mirror")."""
    ax_x, ax_y = (0, 1) if transpose else (1, 0)
    out = ndi.correlate1d(image, along_x, axis=ax_x, mode="mirror")
    return ndi.correlate1d(out, along_y, axis=ax_y, mode="mirror")


def _minmax(a: np.ndarray) -> np.ndarray:
    """Rescale ``a`` to [0, 1] (like cv2.normalize NORM_MINMAX); constant -> zeros."""
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(a)
    return (a - lo) / (hi - lo)


@dataclass(frozen=True)
class EdgeSetup:
    """How `hv_edge` turns HV maps into an edge map; shared with its torch twin
    (`infer.dense`), so both read one set of kernels, defaults and scalings.

    smooth, deriv: (ksize,) float64 Sobel kernels (`_sobel_kernels`); bounds: the derivative
    values mapped to 0 and 1 ("fixed"), or None for tile-wide min-max ("tile").
    """

    smooth: np.ndarray
    deriv: np.ndarray
    bounds: tuple[float, float] | None


def edge_setup(
    ksize: int = 21, normalise: str = "fixed", gradient_range: tuple[float, float] = (-0.8, 0.55)
) -> EdgeSetup:
    """The `EdgeSetup` of `hv_watershed`'s ``ksize``, ``normalise`` and ``gradient_range``
    (its defaults are these)."""
    smooth, deriv = _sobel_kernels(ksize)
    if normalise == "tile":
        return EdgeSetup(smooth, deriv, None)
    if normalise != "fixed":
        raise ValueError(f"normalise must be 'fixed' or 'tile', not {normalise!r}")
    bound = float(np.abs(deriv).sum() * smooth.sum())
    return EdgeSetup(smooth, deriv, (gradient_range[0] * bound, gradient_range[1] * bound))


#: The `hv_watershed` parameters the edge map depends on (all others act after it).
EDGE_PARAMS = ("ksize", "normalise", "gradient_range")


def hv_edge(hv: np.ndarray, **setup) -> np.ndarray:
    """Edge map of HV maps: high where the distance maps jump, i.e. between touching nuclei.

    hv: (2, H, W) float (channel 0 = x, 1 = y); ``setup``: `edge_setup`'s keywords.
    Returns (H, W) float32 in [0, 1], not masked: ``max(1 - d/dx h, 1 - d/dy v)`` with each
    derivative scaled as `hv_watershed` describes. This is the dense, mask-free part of the
    HV post-processing; `infer.dense.hv_edge` computes the same bits in torch on the model's
    device, so workers can be shipped this one map instead of the two HV maps.
    """
    hv = np.asarray(hv, dtype=np.float32)
    if hv.ndim != 3 or hv.shape[0] != 2:
        raise ValueError(f"hv must be (2, H, W), got shape {hv.shape}")
    s = edge_setup(**setup)
    if s.bounds is None:
        h, v = _minmax(hv[0]), _minmax(hv[1])
        norm = _minmax
    else:
        h, v = np.clip(hv[0], -1, 1), np.clip(hv[1], -1, 1)
        lo, hi = s.bounds

        def norm(a: np.ndarray) -> np.ndarray:  # clip((a - lo) / (hi - lo), 0, 1), in place
            np.subtract(a, lo, out=a)
            np.divide(a, hi - lo, out=a)
            return np.clip(a, 0.0, 1.0, out=a)
    dh = separable(h, s.deriv, s.smooth)  # d/dx: derivative along axis 1 (x)
    dv = separable(v, s.deriv, s.smooth, transpose=True)  # d/dy
    # max(1 - norm(dh), 1 - norm(dv)) = 1 - min(norm(dh), norm(dv)), in place (same bits).
    out = np.minimum(norm(dh), norm(dv), out=dh)
    return np.subtract(1.0, out, out=out)


#: The `hv_watershed` parameters `hv_energy`'s maps depend on besides the edge map's.
ENERGY_PARAMS = ("prob_threshold", "marker_threshold")

#: The energy's 3x3 blur, per axis (cv2.GaussianBlur((3, 3), 0)).
BLUR = np.array([0.25, 0.5, 0.25], np.float32)


def hv_energy(prob: np.ndarray, edge: np.ndarray, prob_threshold: float,
              marker_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The flood's energy and the seed candidates of `hv_watershed`, from prob (H, W) float
    and edge (H, W) float32 (`hv_edge`).

    Returns (energy (H, W) float32 = ``-blur3x3((1 - edge) * (prob >= prob_threshold))``,
    seedable (H, W) bool = ``edge < marker_threshold``). The raw mask, not the cleaned one:
    on the cleaned mask's pixels, the only ones the flood reads, the two energies are the
    same bits, since a 3x3 neighbour in the raw mask is in the same 8-connected component
    and so was kept too. That makes both maps mask-free (`infer.dense` makes them on the
    model's device).
    """
    energy = 1.0 - np.asarray(edge)  # float32 for a float32 edge, as `hv_edge` makes
    energy *= np.asarray(prob) >= prob_threshold
    energy = separable(energy, BLUR, BLUR)
    np.negative(energy, out=energy)
    return energy, edge < marker_threshold


#: Rows per band of `dense_windows`: taller bands mean fewer, wider windows (less per-call
#: overhead, more pixels far from any mask pixel).
BAND = 96


def dense_windows(mask: np.ndarray, margin: int, band: int = BAND) -> list[tuple[slice, slice, slice, slice]]:
    """Windows that cover every ``True`` pixel of ``mask`` (H, W) bool, for maps whose value at
    a pixel reads the input within ``margin`` px (a separable filter's radius).

    Returns ``(rows, cols, inner_rows, inner_cols)`` slices: the window to compute on (clipped
    to the array) and, inside the window's own coordinates, its inner part, whose pixels are
    all ``>= margin`` px from any window edge that is not the array's edge. A filter with
    scipy's "mirror" border run on the window is then exact on the inner part, and the inner
    parts cover the mask. Bands of ``band`` rows, each cut into runs of columns
    holding mask pixels (runs closer than 2 ``margin`` px merged: a window edge costs that much).
    """
    h, w = mask.shape
    out = []
    for y0 in range(0, h, band):
        y1 = min(y0 + band, h)
        cols = np.flatnonzero(mask[y0:y1].any(axis=0))
        if cols.size == 0:
            continue
        cut = np.flatnonzero(np.diff(cols) > 2 * margin)  # gaps worth two window edges
        starts, ends = cols[np.r_[0, cut + 1]], cols[np.r_[cut, cols.size - 1]] + 1
        wy0, wy1 = max(y0 - margin, 0), min(y1 + margin, h)
        for x0, x1 in zip(starts.tolist(), ends.tolist()):
            wx0, wx1 = max(x0 - margin, 0), min(x1 + margin, w)
            out.append((slice(wy0, wy1), slice(wx0, wx1), slice(y0 - wy0, y1 - wy0), slice(x0 - wx0, x1 - wx0)))
    return out
