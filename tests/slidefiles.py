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


def read_level0(path: Path) -> np.ndarray:
    """Level 0 of a (pyramidal) TIFF as (h, w, 3) uint8."""
    with tifffile.TiffFile(path) as tf:
        return tf.pages[0].asarray()[..., :3]


PEN = {"blue": (35, 65, 170), "green": (30, 120, 70), "black": (30, 30, 35)}


def draw_pen_and_border(rgb: np.ndarray, strokes: list[tuple[str, list[tuple[int, int]], int]],
                        border: int) -> tuple[np.ndarray, np.ndarray]:
    """``rgb`` (h, w, 3) uint8 with pen strokes and a black scanner band along the left and
    bottom edges, and the (h, w) bool mask of what was drawn.

    strokes: (colour name in `PEN`, polyline points (x, y) px, width px); border: band width px.
    Ink is drawn opaque with soft (2 px) edges and a little noise, as a marker on glass scans.
    """
    from PIL import Image, ImageDraw, ImageFilter

    h, w = rgb.shape[:2]
    out = rgb.astype(np.float32)
    drawn = np.zeros((h, w), bool)
    noise = np.random.default_rng(0).normal(0, 4, (h, w, 1))
    for colour, points, width in strokes:
        layer = Image.new("L", (w, h), 0)
        ImageDraw.Draw(layer).line(points, fill=255, width=width, joint="curve")
        alpha = np.asarray(layer.filter(ImageFilter.GaussianBlur(2)), np.float32)[..., None] / 255
        out = out * (1 - alpha) + (np.array(PEN[colour], np.float32) + noise) * alpha
        drawn |= alpha[..., 0] > 0.05
    band = np.zeros((h, w), bool)
    band[:, :border] = True
    band[h - border:, :] = True
    out[band] = np.array([12, 12, 14], np.float32) + noise[band]
    return np.clip(out, 0, 255).astype(np.uint8), drawn | band
