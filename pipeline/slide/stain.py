"""H&E stain normalisation (Macenko et al., ISBI 2009) and stain augmentation (Tellez et al. 2018).

Colours are handled in optical density (OD) space, ``OD = -log((I + 1) / Io)``, where each
pixel is a non-negative mix of a haematoxylin (H) and an eosin (E) stain vector. Stains are
estimated on a strided subsample of pixels, so a 1152x1152 tile normalises in ~0.1-0.2 s.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Reference H and E OD vectors (columns) and 99th-percentile concentrations widely used
# with Macenko's method; also the generic matrix for augmentation.
DEFAULT_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
DEFAULT_MAX_C = np.array([1.9705, 1.0308])


class TooLittleTissue(ValueError):
    """The image has too few stained pixels to estimate its stain vectors."""


@dataclass(frozen=True)
class StainReference:
    """Target stains of a normalisation.

    stains : (3, 2) float, unit OD vectors (RGB rows), column 0 = H, column 1 = E.
    max_c : (2,) float, 99th-percentile H and E concentrations.
    io : transmitted (glass) intensity, 0-255.
    """

    stains: np.ndarray
    max_c: np.ndarray
    io: float = 240.0

    def to_dict(self) -> dict:
        """JSON-able form, stored in the model card."""
        return {
            "method": "macenko",
            "stains": np.asarray(self.stains, float).round(6).tolist(),
            "max_c": np.asarray(self.max_c, float).round(6).tolist(),
            "io": float(self.io),
        }

    @classmethod
    def from_dict(cls, d: dict) -> StainReference:
        stains = np.asarray(d["stains"], float)
        max_c = np.asarray(d["max_c"], float)
        if stains.shape != (3, 2) or max_c.shape != (2,):
            raise ValueError(f"stain reference needs stains (3, 2) and max_c (2,), got {stains.shape}, {max_c.shape}")
        return cls(stains, max_c, float(d.get("io", 240.0)))

    @classmethod
    def default(cls) -> StainReference:
        return cls(DEFAULT_STAINS.copy(), DEFAULT_MAX_C.copy(), 240.0)


def _od(rgb: np.ndarray, io: float) -> np.ndarray:
    """(N, 3) float32 optical density of (..., 3) uint8 pixels."""
    px = rgb.reshape(-1, 3).astype(np.float32)
    return -np.log((px + 1.0) / np.float32(io))


def _subsample(rgb: np.ndarray, max_pixels: int) -> np.ndarray:
    """(N, 3) deterministic strided subsample of at most ``max_pixels`` pixels."""
    px = rgb.reshape(-1, 3)
    step = max(1, -(-px.shape[0] // max_pixels))
    return px[::step]


def _concentrations(od: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """(N, 2) least-squares H and E concentrations of (N, 3) OD pixels."""
    return od @ np.linalg.pinv(stains).T.astype(np.float32)


def fit_macenko(
    rgb: np.ndarray,
    io: float = 240.0,
    alpha: float = 1.0,
    beta: float = 0.15,
    min_pixels: int = 500,
    max_pixels: int = 200_000,
) -> StainReference:
    """Estimate the H and E stain vectors and concentrations of an image (Macenko).

    Parameters
    ----------
    rgb : (H, W, 3) uint8
    io : glass intensity; alpha : angle percentile (robust extremes); beta : OD threshold
        below which a pixel counts as background.
    min_pixels : fewer stained pixels (in the subsample) than this raise `TooLittleTissue`.
    max_pixels : pixels used for estimation (strided subsample).
    """
    od = _od(_subsample(rgb, max_pixels), io).astype(np.float64)
    tissue = od[np.all(od > beta, axis=1)]
    if tissue.shape[0] < min_pixels:
        raise TooLittleTissue(f"{tissue.shape[0]} stained pixels < {min_pixels}")
    # Best plane *through the origin* (uncentred second moments, i.e. the SVD of the OD
    # tuples as in the paper): OD = 0 is glass, and a centred plane would bias every pixel.
    _, vecs = np.linalg.eigh(tissue.T @ tissue)  # eigenvalues ascending
    plane = vecs[:, 1:3]
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into positive OD
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Haematoxylin absorbs more red than eosin: it goes first.
    stains = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1], axis=1)
    stains = np.abs(stains) / np.linalg.norm(stains, axis=0)  # tiny negatives are noise
    conc = _concentrations(od.astype(np.float32), stains)
    max_c = np.percentile(conc, 99, axis=0)
    if not np.all(np.isfinite(stains)) or np.any(max_c <= 1e-6):
        raise TooLittleTissue("degenerate stain estimate")
    return StainReference(stains, max_c, io)


def normalise(
    rgb: np.ndarray,
    ref: StainReference,
    src_stains: StainReference | None = None,
    min_pixels: int = 500,
) -> np.ndarray:
    """Map an image's stains onto ``ref`` (Macenko): (H, W, 3) uint8 -> (H, W, 3) uint8.

    The source stains are estimated from the image itself unless ``src_stains`` is given.
    An image with too little tissue to estimate them (glass, blank tiles) comes back
    unchanged.
    """
    if src_stains is None:
        try:
            src_stains = fit_macenko(rgb, io=ref.io, min_pixels=min_pixels)
        except TooLittleTissue:
            return rgb
    conc = _concentrations(_od(rgb, ref.io), src_stains.stains)
    conc *= (np.asarray(ref.max_c) / np.asarray(src_stains.max_c)).astype(np.float32)
    od = conc @ np.asarray(ref.stains, np.float32).T
    out = np.float32(ref.io) * np.exp(-od)
    return np.clip(out, 0, 255).round().astype(np.uint8).reshape(rgb.shape)


def stain_augment(
    rgb: np.ndarray,
    rng: np.random.Generator,
    sigma1: float = 0.2,
    sigma2: float = 0.2,
    stains: np.ndarray | None = None,
    io: float = 255.0,
) -> np.ndarray:
    """Random H&E stain jitter (Tellez et al.): (H, W, 3) uint8 -> (H, W, 3) uint8.

    Each stain's concentration c becomes ``a * c + b`` with ``a ~ U(1 - sigma1, 1 + sigma1)``
    and ``b ~ U(-sigma2, sigma2)`` (OD units), drawn once per call. ``stains`` (3, 2) defaults
    to a generic H&E matrix. The part of the OD the two stains do not explain is kept, so
    texture survives; with a=1, b=0 the image comes back unchanged up to rounding.
    """
    s = np.asarray(DEFAULT_STAINS if stains is None else stains, np.float32)
    a = rng.uniform(1 - sigma1, 1 + sigma1, size=2).astype(np.float32)
    b = rng.uniform(-sigma2, sigma2, size=2).astype(np.float32)
    od = _od(rgb, io)
    conc = _concentrations(od, s)
    od = od + (conc * (a - 1) + b) @ s.T
    out = np.float32(io) * np.exp(-od) - 1.0
    return np.clip(out, 0, 255).round().astype(np.uint8).reshape(rgb.shape)
