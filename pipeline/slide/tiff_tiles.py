"""Regions of a tiled TIFF pyramid level decoded straight from its tiles (tifffile + imagecodecs).

The fast path under `reader.OpenSlideReader` for TIFF-family slides (generic tiled TIFF,
Aperio SVS): on a JPEG mosaic, OpenSlide's ``read_region`` of a 2304 px window costs about
five times decoding its tiles (its tile cache, ARGB compositing, premultiplied-to-straight
alpha, then a PIL image). The same tiles decoded by the same libjpeg-turbo give the same
pixels; `TiffTiles.open` checks exactly that on probe tiles of every level against OpenSlide
and keeps only the levels that agree to the bit (another colour path or codec falls back).

Regions come as RGBX, 4 bytes a pixel (the 4th 255): the layout Pillow keeps RGB images in,
so `reader.rgbx_image` hands them to Pillow without a copy. libjpeg-turbo writes JPEG tiles
so at no extra cost (``JCS_EXT_RGBX``); other codecs' RGB tiles are widened once, when cached.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable

import imagecodecs
import numpy as np
import tifffile

WHITE = 255
EXT_RGBX = 7  # libjpeg-turbo's JCS_EXT_RGBX (imagecodecs.JPEG8.CS.EXT_RGBX)
#: Decoded tiles kept per file, least recently used out first. Neighbouring windows overlap
#: by their halos (2 x 128 level-0 px at 0.25 um/px for a 0.5 um/px model): the tiles there
#: are decoded once instead of two to four times (issue 13: about a fifth of a window's
#: JPEG decode on 256 px tiles). 64 MB (RGBX: 4 bytes a pixel) holds a window's tiles with its
#: right-hand neighbours: the 245 tiles of 256^2 px that 48 MB held as RGB.
CACHE_BYTES = 64 * 2**20

# (level, x, y, w, h) in level px -> (h, w, 3) uint8 as OpenSlide gives it (on white).
Probe = Callable[[int, int, int, int, int], np.ndarray]


def _usable(page: tifffile.TiffPage) -> bool:
    return (page.is_tiled and page.samplesperpixel == 3 and page.bitspersample == 8 and page.imagedepth == 1
            and page.planarconfig == tifffile.PLANARCONFIG.CONTIG and page.tiledepth == 1)


def to_rgbx(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> (h, w, 4): the same RGB and a 255 byte."""
    out = np.empty(rgb.shape[:2] + (4,), np.uint8)
    out[..., :3] = rgb
    out[..., 3] = WHITE
    return out


def _jpeg_rgbx(page: tifffile.TiffPage) -> Callable[[bytes], np.ndarray] | None:
    """A decoder of ``page``'s tiles straight to (th, tw, 4) RGBX: its JPEG decoded as
    tifffile does (its colour spaces for YCbCr and RGB pages), to RGBX instead of RGB. None
    for other pages."""
    if page.compression != tifffile.COMPRESSION.JPEG or page.photometric not in (2, 6) or page.extrasamples:
        return None
    colorspace = 2 if page.photometric == 2 and not page.is_jfif else None  # RGB JPEG (Aperio SVS)
    shape, tables = (page.tilelength, page.tilewidth), page.jpegtables
    return lambda data: imagecodecs.jpeg8_decode(data, tables=tables, colorspace=colorspace, outcolorspace=EXT_RGBX,
                                                 shape=shape)


class TiffTiles:
    """Tiled pages of one TIFF matched to pyramid levels: ``pages`` {level: page}."""

    def __init__(self, tiff: tifffile.TiffFile, pages: dict[int, tifffile.TiffPage]) -> None:
        self.tiff, self.pages = tiff, pages
        self._rgbx = {level: _jpeg_rgbx(page) for level, page in pages.items()}
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached = 0

    @classmethod
    def open(cls, path: str | os.PathLike, level_dimensions: tuple[tuple[int, int], ...],
             level_downsamples: tuple[float, ...], probe: Probe) -> TiffTiles | None:
        """The levels of ``path`` (OpenSlide's sizes and downsamples) this path reads exactly
        as ``probe`` (OpenSlide) does, or None when there is none (not a TIFF, no match)."""
        try:
            tiff = tifffile.TiffFile(path)
        except Exception:  # noqa: BLE001 - not a TIFF (or one tifffile cannot parse): OpenSlide reads it
            return None
        pages: dict[int, tifffile.TiffPage] = {}
        candidates = [p for p in tiff.pages if isinstance(p, tifffile.TiffPage) and _usable(p)]
        for level, ((w, h), ds) in enumerate(zip(level_dimensions, level_downsamples)):
            # Integer downsamples only: OpenSlide maps level-0 origins to fractional level px otherwise.
            match = [p for p in candidates if (p.imagewidth, p.imagelength) == (w, h)]
            if len(match) == 1 and float(ds).is_integer():
                pages[level] = match[0]
        fast = cls(tiff, pages)
        for level in list(pages):
            if not fast._agrees(level, probe):
                del pages[level]
        if not pages:
            tiff.close()
            return None
        return fast

    def _agrees(self, level: int, probe: Probe) -> bool:
        """Do the first, a middle and the last tile (plus a region across tile edges) read the same?"""
        page = self.pages[level]
        w, h, tw, th = page.imagewidth, page.imagelength, page.tilewidth, page.tilelength
        boxes = [(0, 0, tw, th), ((w // 2) // tw * tw, (h // 2) // th * th, tw, th),
                 ((w - 1) // tw * tw, (h - 1) // th * th, tw, th), (w // 2 - tw // 2, h // 2 - th // 2, tw + 3, th + 5)]
        try:
            return all(np.array_equal(self.region(level, *b)[..., :3], probe(level, *b)) for b in boxes)
        except Exception:  # noqa: BLE001 - a tile this path cannot decode: leave the level to OpenSlide
            return False

    def region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """(h, w, 4) uint8 RGBX (the 4th byte 255) of ``level`` px from (x, y); outside the
        level is white."""
        # One region at a time per file: the viewer's dask threads read concurrently and
        # tifffile's page decoding is not thread-safe (seen: 2% of pixels wrong, flakily).
        with self._lock:
            return self._region(level, x, y, w, h)

    def _region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self.pages[level]
        W, H, tw, th = page.imagewidth, page.imagelength, page.tilewidth, page.tilelength
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x0 >= x1 or y0 >= y1:
            return np.full((h, w, 4), WHITE, np.uint8)
        across = -(-W // tw)
        cells = [(ty, tx) for ty in range(y0 // th, (y1 - 1) // th + 1) for tx in range(x0 // tw, (x1 - 1) // tw + 1)]
        # White only where no tile paints: inside the level with every tile written (the
        # usual window), the tiles cover it all and filling it first is a wasted pass.
        covered = (x0, y0, x1, y1) == (x, y, x + w, y + h) and all(
            page.databytecounts[ty * across + tx] for ty, tx in cells)
        out = np.empty((h, w, 4), np.uint8) if covered else np.full((h, w, 4), WHITE, np.uint8)
        fh = self.tiff.filehandle
        for ty, tx in cells:
            index = ty * across + tx
            tile = self._tile(level, page, index, fh)
            if tile is None:  # a tile never written: OpenSlide shows it as transparent, i.e. white
                continue
            cx0, cy0 = max(x0, tx * tw), max(y0, ty * th)
            cx1, cy1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
            out[cy0 - y:cy1 - y, cx0 - x:cx1 - x] = tile[cy0 - ty * th:cy1 - ty * th, cx0 - tx * tw:cx1 - tx * tw]
        return out

    def _tile(self, level: int, page: tifffile.TiffPage, index: int, fh) -> np.ndarray | None:
        """Tile ``index`` of ``page`` decoded, (th, tw, 4) uint8 RGBX (read-only), from the cache
        when a recent region decoded it; None for a tile never written."""
        key = (level, index)
        tile = self._cache.get(key)
        if tile is not None:
            self._cache.move_to_end(key)
            return tile
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:
            return None
        with fh.lock:
            fh.seek(offset)
            data = fh.read(count)
        rgbx = self._rgbx[level]
        tile = rgbx(data) if rgbx is not None else to_rgbx(page.decode(data, index, jpegtables=page.jpegtables)[0][0])
        tile.flags.writeable = False
        self._cache[key] = tile
        self._cached += tile.nbytes
        while self._cached > CACHE_BYTES and len(self._cache) > 1:
            self._cached -= self._cache.popitem(last=False)[1].nbytes
        return tile

    def close(self) -> None:
        self._cache.clear()
        self._cached = 0
        self.tiff.close()
