"""Tissue detection on a slide thumbnail, and a PNG overlay for people to check it.

The core, :func:`tissue_mask`, is a pure function of an RGB thumbnail and its mpp: Otsu on
HSV saturation (glass is bright and grey, stained tissue is coloured), with dark scanner
borders and blue/green/black ink taken out first, then morphology whose sizes are given in
um and um^2 so the result does not depend on the mpp.

The mask chooses tiles; `nuclei_region` says where nuclei may lie inside them (looser
than the mask, never on ink or borders): `postprocess.plausible` drops objects off it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

if TYPE_CHECKING:
    from nucleiflow.pipeline.slide.reader import SlideReader

# Saturation threshold bounds. Glass (JPEG noise, a slight colour cast) sits near 0.01-0.03
# and H&E tissue near 0.2-0.6 at 8 um/px: the floor keeps a glass-only slide from being split
# in half by Otsu; the cap keeps a tissue-only slide from losing its paler half.
SAT_FLOOR, SAT_CAP = 0.07, 0.2
INK_HUES = (70.0, 250.0)  # degrees: green to blue. H&E stays in ~255-360 and 0-30 (blood)
INK_SAT = 0.35  # ink is strongly saturated; faint bluish tissue edges are not ink
DARK_VALUE, DARK_SAT = 0.35, 0.3  # black borders/ink: dark and grey. Dense tissue is dark but saturated
CLOSE_UM = 16.0  # closing radius: joins tissue fragments a few um apart
OPEN_UM = 4.0  # opening radius: hair-thin lines go; rounds to 0 px (no opening) at 8 um/px,
# where even a radius of 1 px would erase real 2-px-wide strips of tissue (CMU-1 has one)
EXCLUDE_GROW_UM = 8.0  # ink and border masks grow by this: their edges blend into glass
MIN_OBJECT_UM2 = 5e3  # ~70 x 70 um: smaller specks are dust or debris
MAX_HOLE_UM2 = 1e4  # glass holes smaller than this inside tissue are filled
# Nuclei are kept where their centroid lies on anything coloured above the glass floor
# (pale tissue below Otsu's threshold too: the mask chooses tiles, this must not lose nuclei)
# grown by this (a thumbnail pixel only partly on tissue is paler), never on ink or borders.
NUCLEI_MARGIN_UM = 16.0


@dataclass
class TissueMask:
    """``mask`` (h, w) bool at ``mpp`` um/px; pixel (i, j) covers level-0 px from
    (j, i) * mpp / mpp0. It is aligned with ``SlideReader.thumbnail(mpp)``."""

    mask: np.ndarray
    mpp: float
    warning: str | None = None  # why the slide cannot be segmented as H&E (see colour_warning)
    region: np.ndarray | None = None  # (h, w) bool: where nuclei may lie (`nuclei_region`); None: anywhere

    @property
    def fraction(self) -> float:
        """Fraction of the thumbnail that is tissue, in [0, 1]."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), saturation and value in [0, 1], each (h, w) float32."""
    f = rgb.astype(np.float32) / 255.0
    mx, mn = f.max(-1), f.min(-1)
    chroma = mx - mn
    sat = np.where(mx > 0, chroma / np.maximum(mx, 1e-6), 0.0)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    c = np.maximum(chroma, 1e-6)
    hue = np.select([mx == r, mx == g], [((g - b) / c) % 6, (b - r) / c + 2], (r - g) / c + 4) * 60
    return np.where(chroma > 0, hue, 0.0).astype(np.float32), sat.astype(np.float32), mx


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return xx * xx + yy * yy <= radius * radius


def _morph(mask: np.ndarray, op, radius: int) -> np.ndarray:
    """Binary closing/opening that treats the image edge as a continuation, not as background."""
    if radius < 1:
        return mask
    padded = np.pad(mask, radius, mode="edge")
    return op(padded, structure=_disk(radius))[radius:-radius, radius:-radius]


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    labels, n = ndi.label(mask, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def _fill_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background components smaller than ``max_px`` that do not touch the image edge."""
    labels, n = ndi.label(~mask)  # 4-connected background, the dual of 8-connected tissue
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    fill = sizes < max_px
    fill[0] = False
    fill[edge] = False
    return mask | fill[labels]


def _excluded(hue: np.ndarray, sat: np.ndarray, val: np.ndarray, mpp: float) -> np.ndarray:
    """Blue/green/black ink and dark scanner borders, grown by ``EXCLUDE_GROW_UM``; (h, w) bool."""
    ink = (hue >= INK_HUES[0]) & (hue <= INK_HUES[1]) & (sat > INK_SAT)
    dark = (val < DARK_VALUE) & (sat < DARK_SAT)
    excluded = ink | dark
    if excluded.any():
        excluded = ndi.binary_dilation(excluded, structure=_disk(max(1, round(EXCLUDE_GROW_UM / mpp))))
    return excluded


def nuclei_region(rgb: np.ndarray, mpp: float, mask: np.ndarray, margin_um: float = NUCLEI_MARGIN_UM) -> np.ndarray:
    """Where a nucleus' centroid may lie on an RGB thumbnail (h, w, 3) uint8 at ``mpp`` um/px
    whose tissue is ``mask`` (h, w) bool: tissue or anything more saturated than glass
    (``SAT_FLOOR``), grown by ``margin_um``, minus ink and dark borders (as `tissue_mask`
    excludes them). Returns (h, w) bool."""
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], bool)
    hue, sat, val = _hsv(rgb)
    region = mask | (sat > SAT_FLOOR)
    radius = round(margin_um / mpp)
    if radius >= 1 and region.any():
        region = ndi.binary_dilation(region, structure=_disk(radius))
    return region & ~_excluded(hue, sat, val, mpp)


def tissue_mask(rgb: np.ndarray, mpp: float, min_object_um2: float = MIN_OBJECT_UM2,
                max_hole_um2: float = MAX_HOLE_UM2) -> np.ndarray:
    """Tissue in an RGB thumbnail.

    Args:
        rgb: (h, w, 3) uint8 thumbnail; ``mpp``: its um/px (typically 8-16).
        min_object_um2: tissue pieces smaller than this are dropped.
        max_hole_um2: enclosed holes smaller than this are filled.
    Returns:
        (h, w) bool, True on tissue. Glass, dark grey/black borders and blue/green/black
        ink are False; a glass-only image gives an (almost) empty mask.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or not mpp > 0:
        raise ValueError(f"expected (h, w, 3) RGB and mpp > 0, got {rgb.shape}, {mpp}")
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], bool)
    hue, sat, val = _hsv(rgb)
    excluded = _excluded(hue, sat, val, mpp)
    candidates = sat[~excluded]
    if candidates.size == 0:
        return np.zeros(rgb.shape[:2], bool)
    # Otsu needs two classes; a near-uniform image has one, and the floor/cap decide it.
    spread = float(candidates.max() - candidates.min())
    otsu = threshold_otsu(candidates) if spread > 1e-3 else SAT_FLOOR
    mask = (sat > min(max(otsu, SAT_FLOOR), SAT_CAP)) & ~excluded
    mask = _morph(mask, ndi.binary_closing, round(CLOSE_UM / mpp))
    mask = _morph(mask, ndi.binary_opening, round(OPEN_UM / mpp))
    px_area = mpp * mpp
    mask = _remove_small(mask, min_object_um2 / px_area)
    mask = _fill_holes(mask, max_hole_um2 / px_area)
    # Closing may bridge over ink between two tissue pieces: take it out again.
    return _remove_small(mask & ~excluded, min_object_um2 / px_area)


def detect_tissue(reader: SlideReader, mpp: float = 8.0) -> TissueMask:
    """Tissue mask of a whole slide from its thumbnail at ``mpp`` um/px."""
    thumb = reader.thumbnail(mpp)
    mask = tissue_mask(thumb, mpp)
    return TissueMask(mask, mpp, colour_warning(thumb), nuclei_region(thumb, mpp, mask))


GREY_CHROMA = 8  # max - min of R, G, B (0-255) under which a pixel has no colour (JPEG noise)


def colour_warning(rgb: np.ndarray) -> str | None:
    """A warning when the thumbnail has content but no colour anywhere (a greyscale scan):
    tissue and nuclei are found by their stain, so such a slide ends with 0 nuclei."""
    content = rgb.max(-1) < 200  # darker than glass
    if content.mean() < 0.01:
        return None  # blank glass: nothing to warn about, 0 nuclei is right
    chroma = rgb.max(-1).astype(np.int16) - rgb.min(-1)
    if np.percentile(chroma[content], 99) >= GREY_CHROMA:
        return None
    return ("the slide is greyscale (no colour in its content): tissue and nuclei are found by their H&E "
            "stain, so nothing is segmented; scan it in colour or check it is an H&E slide")
