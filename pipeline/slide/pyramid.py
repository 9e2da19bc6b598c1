"""A slide as a lazy multiscale image: one array per resolution, read region by region.

`SlideLevel` is an (H, W, 3) uint8 array-like over `SlideReader.read`: indexing reads only
the indexed region, at that level's um/px, so a viewer panning over a 100k px slide never
holds more than what it shows. `slide_pyramid` wraps the levels as dask arrays (chunked
reads, cached and threaded by whoever computes them, e.g. napari).
"""
from __future__ import annotations

import math

import dask.array as da
import numpy as np

from nucleiflow.pipeline.slide.reader import LEVEL_TOL, SlideReader

CHUNK = 512  # px a side per read: one or a few OpenSlide tiles (typically 240-512 px)


class SlideLevel:
    """The slide at ``mpp`` um/px (square pixels) as a read-on-index (H, W, 3) uint8 array.

    Pixel (i, j) covers level-0 px ``j * mpp / mpp_x`` across and ``i * mpp / mpp_y`` down,
    as `SlideReader.read` defines; past the slide edge reads white.
    """

    def __init__(self, reader: SlideReader, mpp: float) -> None:
        info = reader.info
        self.reader, self.mpp = reader, float(mpp)
        self.shape = (math.ceil(info.height * info.mpp_y / mpp), math.ceil(info.width * info.mpp_x / mpp), 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis or k is None for k in key) or len(key) > 3:
            raise IndexError(f"SlideLevel takes up to 3 ints or slices, got {key!r}")
        key = key + (slice(None),) * (3 - len(key))
        (y0, y1, ly), (x0, x1, lx) = (_span(k, n) for k, n in zip(key[:2], self.shape[:2]))
        info = self.reader.info
        if y1 > y0 and x1 > x0:
            # Level-0 origin of the box: read() places output px mpp / mpp_x level-0 px apart.
            box = self.reader.read(x0 * self.mpp / info.mpp_x, y0 * self.mpp / info.mpp_y,
                                   x1 - x0, y1 - y0, self.mpp)
        else:
            box = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        return box[ly, lx, key[2]]  # steps and ints on the read box (an int drops its axis)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self[:, :, :]
        return a if dtype is None else a.astype(dtype)


def _span(k, n: int) -> tuple[int, int, slice | int]:
    """The [start, stop) of an axis of length ``n`` that index ``k`` touches, and ``k``
    relative to that start, to apply on the read box (a step, or 0 for an int)."""
    if isinstance(k, (int, np.integer)):
        i = int(k) + n if k < 0 else int(k)
        if not 0 <= i < n:
            raise IndexError(f"index {k} out of range for length {n}")
        return i, i + 1, 0
    if not isinstance(k, slice):
        raise IndexError(f"SlideLevel takes ints or slices, got {k!r}")
    start, stop, step = k.indices(n)
    if step < 0:
        raise IndexError("SlideLevel does not take negative steps")
    if stop <= start:
        return start, start, slice(None)
    return start, start + (stop - start - 1) // step * step + 1, slice(None, None, step)


def pyramid_mpps(reader: SlideReader, coarsest_px: int = 2048) -> list[float]:
    """um/px of each view level: the slide's own levels (at level-0 mpp x downsample, so
    each is read without resampling), then halvings until the whole slide fits in
    ``coarsest_px`` a side (a slide without a pyramid still zooms out cheaply)."""
    info = reader.info
    mpps: list[float] = []
    for ds in sorted(info.level_downsamples):
        m = info.mpp_x * ds
        if not mpps or m > mpps[-1] * (1 + LEVEL_TOL):
            mpps.append(m)
    extent_um = max(info.width * info.mpp_x, info.height * info.mpp_y)
    while extent_um / mpps[-1] > coarsest_px:
        mpps.append(mpps[-1] * 2)
    return mpps


def slide_pyramid(reader: SlideReader, coarsest_px: int = 2048, chunk: int = CHUNK) -> list[da.Array]:
    """The slide as dask arrays (H_k, W_k, 3) uint8, finest first, at `pyramid_mpps` um/px.

    Nothing is read until a region is computed; each chunk is one ``reader.read``. The
    reader must stay open while the arrays are in use (OpenSlide reads are thread-safe).
    """
    return [da.from_array(SlideLevel(reader, m), chunks=(chunk, chunk, 3), asarray=False, lock=False,
                          name=f"slide-{reader.info.fingerprint}-{m:.6g}", meta=np.empty((0, 0, 0), np.uint8))
            for m in pyramid_mpps(reader, coarsest_px)]
