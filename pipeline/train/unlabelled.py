"""Unlabelled tissue tiles cut from slides, for distillation (HoVer-UNet trains the student on
the teacher's soft outputs over unlabelled tiles as well as on annotated ones)."""
from __future__ import annotations

import logging

import numpy as np

from nucleiflow.pipeline.train.sampler import UnlabelledTiles
from nucleiflow.pipeline.slide.reader import SlideError, open_slide
from nucleiflow.pipeline.slide.tissue import detect_tissue

logger = logging.getLogger(__name__)


def tissue_tiles(path: str, mpp: float, patch: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to ``count`` random (patch, patch, 3) uint8 tiles at ``mpp`` whose centre is tissue."""
    with open_slide(path) as reader:
        tissue = detect_tissue(reader)
        ys, xs = np.nonzero(tissue.mask)
        if ys.size == 0:
            return []
        picks = rng.choice(ys.size, size=min(count, ys.size), replace=False)
        f = tissue.mpp / reader.info.mpp_x  # level-0 px per tissue-mask px
        half = patch * mpp / reader.info.mpp_x / 2
        out = []
        for i in picks:
            cx, cy = (xs[i] + 0.5) * f, (ys[i] + 0.5) * f
            out.append(reader.read(int(cx - half), int(cy - half), patch, patch, mpp))
        return out


def unlabelled_tiles(slides: list[str], mpp: float, patch: int, tiles: int, seed: int = 0) -> UnlabelledTiles:
    """A pool of ``tiles`` unlabelled tissue tiles spread over ``slides`` (slides that cannot
    be read at ``mpp``, e.g. without mpp metadata, are skipped with a logged warning).
    Its ``sources`` are the slides that gave tiles."""
    rng = np.random.default_rng(seed)
    per = max(1, -(-tiles // max(len(slides), 1)))
    pool: list[np.ndarray] = []
    sources: list[str] = []
    for s in slides:
        try:
            cut = tissue_tiles(s, mpp, patch, per, rng)
        except SlideError as e:
            logger.warning(f"unlabelled: skipping {e}")
            continue
        pool += cut
        if cut:
            sources.append(s)
    if not pool:
        raise ValueError(f"no unlabelled tissue tiles could be cut from {slides}")
    return UnlabelledTiles(pool, patch, rng, sources=sources)
