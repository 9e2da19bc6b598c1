"""Slide files for tests: tiny OpenSlide-readable TIFFs written with tifffile."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def write_tiff(path: Path, rgb: np.ndarray, mpp: float | None) -> Path:
    """A tiled, lossless, OpenSlide-readable one-level generic TIFF (see shared/STACK.md);
    ``mpp`` None writes no resolution (a slide without mpp)."""
    kw = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tw:
        tw.write(rgb, tile=(256, 256), photometric="rgb", compression="zlib", subfiletype=0, **kw)
    return path


def write_manifest(path: Path, rows: list[tuple[Path, float | None, str]]) -> Path:
    """A batch manifest CSV (path, mpp, slide_id); mpp None leaves the cell empty."""
    path.write_text("path,mpp,slide_id\n" + "".join(f"{p},{'' if m is None else m},{s}\n" for p, m, s in rows))
    return path
