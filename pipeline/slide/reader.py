"""Whole-slide readers: one interface over OpenSlide files and in-memory arrays.

Coordinates are level-0 pixels (x right, y down); resolutions are microns per pixel (mpp),
never pyramid levels: a reader picks the level and resamples. Everything outside the slide
reads as white glass, so callers never clip.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from nucleiflow.pipeline.slide.tiff_tiles import TiffTiles

WHITE = (255, 255, 255)
LEVEL_TOL = 0.01  # a level up to 1% coarser than asked counts as "at" the asked mpp (0.5 vs 0.499)
MAX_READ_PX = 4096  # level px per side of one read in thumbnail(): keeps memory flat in slide size
MPP_SOURCES = ("metadata", "override")


class SlideError(Exception):
    """A slide cannot be used. The message is one line: the file, the reason, what to do."""


# Level-0 um/px of real brightfield scans: ~0.1-0.25 at 60-40x, 0.5 at 20x, 1-2 at 10-5x.
# Outside this, tags or --mpp are wrong, and the plan would be absurd (50 um/px plans 36k
# tiles for a 2000 px slide; 0.001 shrinks every nucleus below a pixel).
MPP_RANGE = (0.05, 2.0)


def check_mpp(mpp: float, where: str, size: tuple[int, int] | None = None, source: str = "override") -> float:
    """``mpp`` if plausible for a slide scan, else SlideError with the numbers and the fix."""
    lo, hi = MPP_RANGE
    if lo <= mpp <= hi:
        return mpp
    extent = (f"; the {size[0]}x{size[1]} px slide would be {size[0] * mpp / 1000:.3g} x "
              f"{size[1] * mpp / 1000:.3g} mm") if size else ""
    fix = ("pass the scan's real --mpp (or a manifest mpp)" if source == "metadata"
           else "fix --mpp or the manifest's mpp column")
    said = "its metadata says" if source == "metadata" else "given"
    raise SlideError(f"{where}: {mpp:g} um/px ({said}) is not a plausible slide resolution "
                     f"({lo:g}-{hi:g}; 0.25 at 40x, 0.5 at 20x){extent}; {fix}")


@dataclass(frozen=True)
class SlideInfo:
    """Facts about one slide. Sizes in level-0 px; ``mpp_x/y`` in um/px at level 0.

    ``fingerprint`` is a hex hash of the size, the sorted properties and a few level-0 pixel
    regions: the same file gives the same value in any process, another file another value.
    """

    path: str
    width: int
    height: int
    level_count: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_x: float
    mpp_y: float
    mpp_source: str
    vendor: str
    objective_power: float | None
    fingerprint: str

    def __post_init__(self) -> None:
        n = self.level_count
        if min(self.width, self.height, n) <= 0 or {len(self.level_dimensions), len(self.level_downsamples)} != {n}:
            raise ValueError(f"{self.path}: bad size or levels: {self.width}x{self.height}, {n} levels, "
                             f"sizes {self.level_dimensions}, downsamples {self.level_downsamples}")
        if not all(math.isfinite(m) and m > 0 for m in (self.mpp_x, self.mpp_y)):
            raise ValueError(f"{self.path}: mpp must be positive, got {self.mpp_x}, {self.mpp_y}")
        if self.mpp_source not in MPP_SOURCES:
            raise ValueError(f"{self.path}: mpp_source must be one of {MPP_SOURCES}, got {self.mpp_source!r}")

    def to_dict(self) -> dict:
        """A JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


class SlideReader(ABC):
    """Reads regions of a slide at any mpp. Subclasses supply ``info`` and ``_region``."""

    info: SlideInfo

    @abstractmethod
    def _region(self, level: int, x: int, y: int, w: int, h: int) -> Image.Image:
        """RGB image (w x h) of ``level`` pixels from level px (x, y); outside = white."""

    def close(self) -> None:
        """Release the file handle (no-op for in-memory slides)."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def best_level(self, mpp: float) -> int:
        """Coarsest level whose mpp is <= ``mpp`` (within LEVEL_TOL); 0 when none is."""
        ok = [i for i, ds in enumerate(self.info.level_downsamples)
              if self.info.mpp_x * ds <= mpp * (1 + LEVEL_TOL)]
        return max(ok, key=lambda i: self.info.level_downsamples[i]) if ok else 0

    def read(self, x: int, y: int, w: int, h: int, mpp: float) -> np.ndarray:
        """Region with top-left level-0 px (x, y), ``w x h`` px at ``mpp`` um/px.

        It covers ``w * mpp / mpp_x`` level-0 px across. Returns uint8 RGB (h, w, 3); parts
        past the slide edge (negative x, y included) are white.
        """
        if w <= 0 or h <= 0 or not mpp > 0:
            raise ValueError(f"read needs w, h > 0 and mpp > 0, got {w}, {h}, {mpp}")
        return self._resampled(float(x), float(y), int(w), int(h), float(mpp))

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` um/px (ceil of size / scale), uint8 RGB (h, w, 3).

        Read in blocks of at most MAX_READ_PX level px a side, so memory stays flat.
        """
        sx, sy = mpp / self.info.mpp_x, mpp / self.info.mpp_y  # level-0 px per thumbnail px
        w, h = math.ceil(self.info.width / sx), math.ceil(self.info.height / sy)
        ds = self.info.level_downsamples[self.best_level(mpp)]
        step = max(1, int(MAX_READ_PX / max(sx / ds, sy / ds, 1.0)))
        out = np.empty((h, w, 3), np.uint8)
        for y0 in range(0, h, step):
            for x0 in range(0, w, step):
                bw, bh = min(step, w - x0), min(step, h - y0)
                out[y0:y0 + bh, x0:x0 + bw] = self._resampled(x0 * sx, y0 * sy, bw, bh, mpp)
        return out

    def _resampled(self, x: float, y: float, w: int, h: int, mpp: float) -> np.ndarray:
        """``read`` with a float level-0 origin (thumbnail blocks start between pixels)."""
        level = self.best_level(mpp)
        ds = self.info.level_downsamples[level]
        fx, fy = mpp / (self.info.mpp_x * ds), mpp / (self.info.mpp_y * ds)  # level px / out px
        lx, ly = x / ds, y / ds
        bw, bh = w * fx, h * fy
        # Within half a level pixel everywhere: read as is, no resampling blur.
        if abs(lx - round(lx)) + abs(bw - w) < 0.5 and abs(ly - round(ly)) + abs(bh - h) < 0.5:
            return np.array(self._region(level, round(lx), round(ly), w, h))
        ix, iy = math.floor(lx), math.floor(ly)
        box = (lx - ix, ly - iy, lx - ix + bw, ly - iy + bh)
        img = self._region(level, ix, iy, math.ceil(box[2]), math.ceil(box[3]))
        # BOX is an exact area average when shrinking (and the fastest antialiased filter).
        resample = Image.Resampling.BOX if fx >= 1 and fy >= 1 else Image.Resampling.BILINEAR
        return np.array(img.resize((w, h), resample, box=box))


def rgb_image(rgb: np.ndarray) -> Image.Image:
    """``Image.fromarray(rgb)`` for (h, w, 3) uint8, the same pixels without Pillow first
    zero-filling the image it then overwrites (about half its cost: issue 13)."""
    h, w = rgb.shape[:2]
    img = Image.new("RGB", (w, h), None)  # None: not initialised
    img.frombytes(np.ascontiguousarray(rgb, np.uint8))
    return img


def _map_rgbx(rgbx: np.ndarray) -> Image.Image:
    h, w = rgbx.shape[:2]
    img = Image.new("RGB", (0, 0))._new(Image.core.map_buffer(rgbx, (w, h), "raw", 0, ("RGB", 0, 1)))
    img.readonly = 1  # Pillow copies before any change in place: the array is never written
    return img


def _can_map_rgbx() -> bool:
    """Does this Pillow map an RGBX array as an "RGB" image (what `Image.frombuffer` does for
    "RGBX", Pillow's own calls) and read the right pixels from it?"""
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    try:
        img = _map_rgbx(a)
        return img.mode == "RGB" and np.array_equal(np.array(img), a[..., :3])
    except Exception:  # noqa: BLE001 - a Pillow without it: rgbx_image copies
        return False


_MAPS_RGBX = _can_map_rgbx()


def rgbx_image(rgbx: np.ndarray) -> Image.Image:
    """An "RGB" image of (h, w, 4) uint8 RGBX (the 4th byte ignored), without a copy where
    Pillow allows: it keeps RGB as 4 bytes a pixel, so it reads the array in place (read
    only; the image keeps it alive). `rgb_image`'s 3 -> 4 byte copy cost ~0.006 CPU s/Mpx of
    a 0.25 -> 0.42 um/px read (issue 13)."""
    if _MAPS_RGBX and rgbx.flags.c_contiguous:
        return _map_rgbx(rgbx)
    return rgb_image(rgbx[..., :3])


def _on_white(img: Image.Image) -> Image.Image:
    """RGBA from OpenSlide (transparent outside the scanned area) composited on white."""
    alpha = img.getchannel("A")
    if alpha.getextrema()[0] == 255:  # the common case: fully opaque, just drop alpha
        return img.convert("RGB")
    out = Image.new("RGB", img.size, WHITE)
    out.paste(img, mask=alpha)  # openslide-python un-premultiplies, so this is "over"
    return out


def _positive(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _open(path: Path):
    """An openslide.OpenSlide handle, or a SlideError saying why not and what to do."""
    if not path.exists():
        raise SlideError(f"{path}: file not found; check the path (or the manifest entry)")
    if path.is_dir():
        raise SlideError(f"{path}: is a directory, not a slide; pass the slide file itself")
    if not os.access(path, os.R_OK):
        raise SlideError(f"{path}: permission denied; make the file readable")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"{path}: not a slide OpenSlide can read (unsupported format, or a truncated "
                         "or corrupt file); check or re-copy the file, or convert it to a pyramidal "
                         "TIFF") from None
    except openslide.OpenSlideError as e:
        raise SlideError(_read_failed(path, e)) from None


def _read_failed(path: Path, e: Exception) -> str:
    reason = " ".join(str(e).split())
    return f"{path}: cannot read slide data ({reason}); the file is probably truncated or corrupt: re-copy it"


class OpenSlideReader(SlideReader):
    """A slide file through OpenSlide. ``mpp`` overrides the metadata's um/px.

    Levels that are plain tiled TIFF pages (generic TIFF, Aperio SVS with JPEG tiles) are
    decoded straight from their tiles (`tiff_tiles`), where that gives OpenSlide's pixels to
    the bit (checked at open); ``fast_tiff = False`` reads everything through OpenSlide.
    Picklable: a copy in another process reopens the file by path (one handle per process).
    """

    fast_tiff = True

    def __init__(self, path: str | os.PathLike, mpp: float | None = None) -> None:
        self.path = Path(path)
        self._mpp = mpp
        self._slide = _open(self.path)
        self._tiles: TiffTiles | None = None
        try:
            self.info = self._make_info()
            self._open_tiles()
        except BaseException:
            self.close()
            raise

    def _open_tiles(self) -> None:
        if self.fast_tiff:
            self._tiles = TiffTiles.open(self.path, self.info.level_dimensions, self.info.level_downsamples,
                                         lambda *box: np.array(self._openslide_region(*box)))

    def _make_info(self) -> SlideInfo:
        s, props = self._slide, self._slide.properties
        if self._mpp is not None:
            if _positive(self._mpp) is None:
                raise SlideError(f"{self.path}: --mpp must be a positive number, got {self._mpp}")
            mpp_x = mpp_y = float(self._mpp)
        else:
            mpp_x = _positive(props.get(openslide.PROPERTY_NAME_MPP_X))
            mpp_y = _positive(props.get(openslide.PROPERTY_NAME_MPP_Y))
            if mpp_x is None and mpp_y is None:
                raise SlideError(f"{self.path}: no microns-per-pixel in the slide metadata; pass --mpp "
                                 "(e.g. --mpp 0.25) or an mpp column in the manifest")
            mpp_x, mpp_y = mpp_x or mpp_y, mpp_y or mpp_x
        for m in (mpp_x, mpp_y):
            check_mpp(m, str(self.path), s.dimensions, "override" if self._mpp is not None else "metadata")
        try:
            fingerprint = self._fingerprint()
        except openslide.OpenSlideError as e:
            raise SlideError(_read_failed(self.path, e)) from None
        return SlideInfo(
            path=str(self.path), width=s.dimensions[0], height=s.dimensions[1],
            level_count=s.level_count, level_dimensions=tuple(tuple(d) for d in s.level_dimensions),
            level_downsamples=tuple(float(d) for d in s.level_downsamples),
            mpp_x=float(mpp_x), mpp_y=float(mpp_y),  # type: ignore[arg-type]
            mpp_source="override" if self._mpp is not None else "metadata",
            vendor=props.get(openslide.PROPERTY_NAME_VENDOR) or "unknown",
            objective_power=_positive(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
            fingerprint=fingerprint,
        )

    def _fingerprint(self) -> str:
        """Hash of size, properties and a few level-0 regions. The corner tiles of every
        level are decoded too, so a truncated file fails here, at open, not mid-run."""
        s = self._slide
        (w, h), digest = s.dimensions, hashlib.sha256()
        digest.update(json.dumps([w, h, sorted(s.properties.items())]).encode())
        for fx, fy in ((0.5, 0.5), (0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)):
            digest.update(s.read_region((int(fx * w), int(fy * h)), 0, (32, 32)).tobytes())
        for level, ((lw, lh), ds) in enumerate(zip(s.level_dimensions, s.level_downsamples)):
            for cx, cy in ((0, 0), (lw - 1, 0), (0, lh - 1), (lw - 1, lh - 1)):
                digest.update(s.read_region((int(cx * ds), int(cy * ds)), level, (1, 1)).tobytes())
        return digest.hexdigest()[:32]

    def _region(self, level: int, x: int, y: int, w: int, h: int) -> Image.Image:
        if self._slide is None:
            raise SlideError(f"{self.path}: reader is closed; open the slide again")
        if self._tiles is not None and level in self._tiles.pages:
            try:
                return rgbx_image(self._tiles.region(level, x, y, w, h))
            except Exception as e:  # noqa: BLE001 - a damaged tile: OpenSlide's error names it as such
                raise SlideError(_read_failed(self.path, e)) from None
        return self._openslide_region(level, x, y, w, h)

    def _openslide_region(self, level: int, x: int, y: int, w: int, h: int) -> Image.Image:
        ds = self.info.level_downsamples[level]
        try:
            img = self._slide.read_region((round(x * ds), round(y * ds)), level, (w, h))
        except openslide.OpenSlideError as e:
            raise SlideError(_read_failed(self.path, e)) from None
        return _on_white(img)

    def close(self) -> None:
        if getattr(self, "_slide", None) is not None:
            self._slide.close()
        if getattr(self, "_tiles", None) is not None:
            self._tiles.close()
        self._slide = self._tiles = None

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "mpp": self._mpp, "info": self.info}

    def __setstate__(self, state: dict) -> None:
        self.path, self._mpp, self.info = Path(state["path"]), state["mpp"], state["info"]
        self._slide = _open(self.path)  # info (and its probe) travel with the pickle
        self._tiles = None
        self._open_tiles()


class ArraySlide(SlideReader):
    """An in-memory slide: one level, ``array`` (H, W, 3) uint8 at ``mpp`` um/px.

    ``mpp_source`` is "override" (the caller states it); the fingerprint hashes the pixels.
    """

    def __init__(self, array: np.ndarray, mpp: float, name: str = "array") -> None:
        a = np.ascontiguousarray(array)
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise ValueError(f"{name}: ArraySlide needs an (H, W, 3) uint8 array, got {a.shape} {a.dtype}")
        digest = hashlib.sha256(repr(a.shape).encode())
        digest.update(a.data)
        h, w = a.shape[:2]
        self.array = a
        self.info = SlideInfo(name, w, h, 1, ((w, h),), (1.0,), float(mpp), float(mpp), "override",
                              "array", None, digest.hexdigest()[:32])

    def _region(self, level: int, x: int, y: int, w: int, h: int) -> Image.Image:
        out = np.full((h, w, 3), 255, np.uint8)
        H, W = self.array.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if x0 < x1 and y0 < y1:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = self.array[y0:y1, x0:x1]
        return rgb_image(out)


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> SlideReader:
    """Open a slide file; ``mpp`` overrides its metadata. Raises SlideError with the fix."""
    return OpenSlideReader(path, mpp)
