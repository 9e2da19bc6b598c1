"""Training augmentations for where labs differ: scale, blur and JPEG artefacts.

Pure functions on one (C, P, P) patch; colour (H&E stain + brightness/contrast) jitter lives
in `train.datasets` beside the sampler. Every random draw comes from the caller's Generator, so a
seeded sampler stays reproducible (and resumable).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter
from pydantic import BaseModel, ConfigDict, Field


class AugmentConfig(BaseModel):
    """How training patches are perturbed (recorded in the config key and the model card)."""

    model_config = ConfigDict(extra="forbid")
    scale: float = Field(0.0, ge=0, lt=0.5, description="Zoom by a factor in [1 - s, 1 + s] (0.2: 20x/40x scans).")
    blur_p: float = Field(0.0, ge=0, le=1, description="Share of patches blurred (Gaussian, sigma up to blur_sigma px).")
    blur_sigma: float = Field(1.2, gt=0)
    jpeg_p: float = Field(0.0, ge=0, le=1, description="Share of patches re-encoded as JPEG (quality 40-90).")
    stain_sigma: tuple[float, float] = Field((0.1, 0.05), description="H&E stain jitter: (scale, shift) sigmas.")
    jitter: float = Field(0.1, ge=0, lt=1, description="Brightness/contrast jitter.")
    focus: float = Field(0.0, ge=0, le=1, description="Share of patches centred on a random nucleus pixel.")


def scaled_window(p: int, rng: np.random.Generator, scale: float) -> int:
    """Edge of the source window that is resized to ``p`` px: p / zoom, zoom in [1-s, 1+s]."""
    if scale <= 0:
        return p
    zoom = rng.uniform(1 - scale, 1 + scale)
    return max(8, int(round(p / zoom)))


def resize_patch(img: np.ndarray, targets: dict[str, np.ndarray], p: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Resize a (3, q, q) uint8 image (bilinear) and (..., q, q) targets (nearest) to p x p.

    HV maps are normalised per nucleus, so nearest resampling keeps them valid (they stay in
    [-1, 1] and point from the centroid); masks and markers stay binary, instance ids intact.
    """
    q = img.shape[-1]
    if q == p:
        return img, targets
    im = Image.fromarray(np.moveaxis(img, 0, -1)).resize((p, p), Image.Resampling.BILINEAR)
    idx = np.minimum(((np.arange(p) + 0.5) * q / p).astype(int), q - 1)
    out = {k: v[..., idx[:, None], idx[None, :]] for k, v in targets.items()}
    return np.moveaxis(np.asarray(im), -1, 0), out


def degrade(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Blur and/or JPEG artefacts on a (3, P, P) uint8 patch, each with its probability."""
    blur = cfg.blur_p > 0 and rng.random() < cfg.blur_p
    jpeg = cfg.jpeg_p > 0 and rng.random() < cfg.jpeg_p
    if not (blur or jpeg):
        return img
    sigma, quality = rng.uniform(0.3, cfg.blur_sigma), int(rng.integers(40, 91))
    im = Image.fromarray(np.moveaxis(img, 0, -1))
    if blur:
        im = im.filter(ImageFilter.GaussianBlur(radius=sigma))
    if jpeg:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        im = Image.open(buf).convert("RGB")
    return np.moveaxis(np.asarray(im), -1, 0).copy()


def focus_origin(mask: np.ndarray, q: int, rng: np.random.Generator) -> tuple[int, int] | None:
    """Top-left (y0, x0) of a q x q window centred (+- q/4) on a random foreground pixel of an
    (H, W) mask, clipped to the image; None when the mask is empty."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    i = int(rng.integers(ys.size))
    jy, jx = rng.integers(-(q // 4), q // 4 + 1, size=2)
    h, w = mask.shape
    y0 = int(np.clip(ys[i] - q // 2 + jy, 0, max(h - q, 0)))
    x0 = int(np.clip(xs[i] - q // 2 + jx, 0, max(w - q, 0)))
    return y0, x0
