"""The masks of one slide as OME-Zarr (NGFF 0.4 on Zarr format 2), written tile by tile.

Layout of ``<out>/<slide_id>/masks.ome.zarr`` (model pixels; axes y, x in micrometer)::

    .zattrs              multiscales "nuclear probability": uint8, 0-255 = NP 0-1
    0/ 1/ 2/ ...         pyramid levels, each half the size of the one above (mean)
    labels/.zattrs       {"labels": ["nuclei", "tissue"]}
    labels/nuclei/0/ ... int32 label image, value = nucleus_id of the GeoParquet row (nearest)
    labels/tissue/0/ ... uint8 tissue mask (1 = tissue), the image's levels and shapes

Zarr format 2 with "/" chunk keys and Blosc, no sharding: what QuPath, Bio-Formats, OMERO
and napari read. Every array is created at open (zarr writes the metadata); ``write_tile``
writes whole chunks only (tile cores are chunk-aligned), so writers never share a chunk; the
last label chunks written are held in memory and encoded once (`OmeZarrWriter.write_labels`).
Chunk files are encoded and written straight (`ChunkFiles`: zarr's bytes, without its
per-chunk overhead), and the pyramid is built while level 0 is written (`Pyramid`: each
chunk's 2x2 reduction goes to its parent, stored once its children are in; memory: a band of
parents, capped), so nothing is read back; ``close`` stores what is left, then renames the
hidden temp folder to the final name. Level ``k`` has scale ``mpp * 2**k`` and no
translation (as ome-zarr's own writer does).

NGFF 0.4 says a label image MUST have as many levels as its image and SHOULD match its
dimensions, so viewers overlay them level by level: the tissue mask (detected at ~8 um/px)
is upsampled, nearest, to every image level, chunk by chunk (only chunks holding tissue are
stored; Blosc makes the rest of a constant chunk nearly free).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr

from nucleiflow.pipeline.outputs.atomic import discard, publish, temp_path

_KEYS = {"name": "v2", "separator": "/"}
# Blosc (codec, shuffle, level) per dtype. Encoding is most of the main process's write time:
# on a dense 1024^2 chunk of MoNuSeg, zstd level 5 took 33 ms (int32 labels, 163 kB) and 21
# ms (uint8 prob, 714 kB); zstd 2 takes 6 ms (labels, 200 kB). The probability is noisy
# bytes that no codec shrinks much: lz4 without shuffle encodes the 9 level-0 chunks of the
# ceiling mosaic in 10 ms and decodes them (pyramid) in 3.5 ms where zstd 1 + bitshuffle took
# 28 and 16 ms, for 15% more bytes (4.1 MB instead of 3.6). For the labels lz4 would save as
# much but store 2.5x the bytes (2.1 MB instead of 0.84): they stay zstd.
_CODEC = {"int32": ("zstd", numcodecs.Blosc.SHUFFLE, 2), "uint8": ("lz4", numcodecs.Blosc.NOSHUFFLE, 5)}
# Label chunks held back before they are stored (see OmeZarrWriter.write_labels): the
# stitcher paints spills into the chunks of the tile row above and the tile before, so one
# tile row plus two chunks saves every read-back and re-encode; capped in bytes.
HELD_BYTES = 128 * 2**20
# Pyramid chunks held until their children are in (`Pyramid`), per pyramid: row-major tiles
# keep about one chunk per tile column open over all levels (4 MB per 1024^2 label chunk);
# past this the oldest are stored early and rebuilt from disk at close (same result).
PYRAMID_BYTES = 128 * 2**20


def prob_to_uint8(prob: np.ndarray) -> np.ndarray:
    """NP probability -> uint8 (0-255). uint8 passes through; floats are clipped to [0, 1]."""
    prob = np.asarray(prob)
    if prob.dtype == np.uint8:
        return prob
    return np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8)


def level_shapes(shape: tuple[int, int], chunk: int) -> list[tuple[int, int]]:
    """Pyramid shapes: halve (rounding up) until the level fits in one chunk."""
    shapes = [tuple(int(s) for s in shape)]
    while max(shapes[-1]) > chunk:
        shapes.append(tuple(math.ceil(s / 2) for s in shapes[-1]))
    return shapes


def mean2(block: np.ndarray) -> np.ndarray:
    """2x2 mean (rounded half to even, same dtype); an odd last row/column is averaged with itself."""
    h, w = block.shape
    b = np.pad(block, ((0, h % 2), (0, w % 2)), mode="edge")
    if b.dtype == np.uint8:
        # Integer sums: the float mean + np.round's result exactly (sum / 4 = q + r / 4, and
        # only r = 2, a tie, depends on q's parity), at a fraction of the float pass.
        s = b[0::2, 0::2].astype(np.uint16) + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]
        q, r = s >> 2, s & 3
        return (q + ((r == 3) | ((r == 2) & (q & 1 == 1)))).astype(np.uint8)
    b = b.astype(np.float32)
    out = b.reshape(b.shape[0] // 2, 2, b.shape[1] // 2, 2).mean(axis=(1, 3))
    return np.round(out).astype(block.dtype)


def nearest2(block: np.ndarray) -> np.ndarray:
    """2x2 nearest (top-left pixel): label values are never mixed."""
    return block[::2, ::2]


class ChunkFiles:
    """The chunk files of one Zarr format 2 array (``/`` keys, one Blosc codec, fill value 0),
    read and written straight: the same bytes zarr stores (a chunk is the codec's encoding
    of the whole chunk-shaped array, edge chunks padded with the fill value), without zarr's
    async pipeline, about 1 ms a chunk each way (issue 13). Absent chunks read as 0."""

    def __init__(self, folder: Path, shape: tuple[int, int], chunks: tuple[int, int], dtype: str,
                 codec: numcodecs.abc.Codec) -> None:
        self.folder, self.shape, self.chunks, self.dtype, self.codec = folder, shape, chunks, np.dtype(dtype), codec
        self.grid = tuple(math.ceil(s / c) for s, c in zip(shape, chunks))
        self._rows: set[int] = set()  # chunk-row folders made

    def extent(self, i: int, j: int) -> tuple[int, int]:
        """(h, w) of chunk (i, j) inside the array."""
        (h, w), (ch, cw) = self.shape, self.chunks
        return min(ch, h - i * ch), min(cw, w - j * cw)

    def write(self, i: int, j: int, data: np.ndarray) -> None:
        """Store ``data`` (chunk (i, j)'s extent) as that chunk's file."""
        if data.shape != self.chunks or data.dtype != self.dtype or not data.flags.c_contiguous:
            full = np.zeros(self.chunks, self.dtype)
            full[: data.shape[0], : data.shape[1]] = data
            data = full
        if i not in self._rows:
            (self.folder / str(i)).mkdir(parents=True, exist_ok=True)
            self._rows.add(i)
        (self.folder / str(i) / str(j)).write_bytes(self.codec.encode(data))

    def read(self, i: int, j: int) -> np.ndarray:
        """Chunk (i, j)'s extent, a new writable array (zeros if absent)."""
        path = self.folder / str(i) / str(j)
        h, w = self.extent(i, j)
        if not path.exists():
            return np.zeros((h, w), self.dtype)
        full = np.empty(self.chunks, self.dtype)
        self.codec.decode(path.read_bytes(), out=full)
        return full if (h, w) == self.chunks else full[:h, :w].copy()

    def delete(self, i: int, j: int) -> None:
        (self.folder / str(i) / str(j)).unlink(missing_ok=True)

    def region(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows y0:y1, columns x0:x1 (clipped to the array), read chunk by chunk."""
        (h, w), (ch, cw) = self.shape, self.chunks
        y1, x1 = min(y1, h), min(x1, w)
        out = np.zeros((y1 - y0, x1 - x0), self.dtype)
        for i in range(y0 // ch, -(-y1 // ch)):
            for j in range(x0 // cw, -(-x1 // cw)):
                if (self.folder / str(i) / str(j)).exists():
                    a = self.read(i, j)
                    r0, c0 = max(y0, i * ch), max(x0, j * cw)
                    r1, c1 = min(y1, i * ch + a.shape[0]), min(x1, j * cw + a.shape[1])
                    out[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0] = a[r0 - i * ch : r1 - i * ch, c0 - j * cw : c1 - j * cw]
        return out


class _Parent:
    """A level-(k+1) chunk being assembled from its children's reductions."""

    def __init__(self, shape: tuple[int, int], dtype: np.dtype, children: int) -> None:
        self.data = np.zeros(shape, dtype)
        self.nonzero: dict[tuple[int, int], bool] = {}  # child (i, j) -> held any non-zero pixel
        self.children = children


class Pyramid:
    """One pyramid (levels 0, 1, ... as `ChunkFiles`, each half the one above, ``reduce``
    making a level from the one above: `mean2`, `nearest2`), built while level 0 is written.

    ``put`` stores a level-0 chunk and hands its reduction to its level-1 chunk, held in
    memory; a chunk whose children have all come is stored and handed on up in turn. So no
    level is read back from disk to build the next (that cost ~0.015 s/Mpx, issue 13). The
    result is, chunk for chunk, what reducing each finished level from disk gives: a parent
    is stored iff one of its children holds a non-zero pixel, else it stays absent. Parents
    whose children do not all come (no tissue there) are stored at ``close``; one held past
    ``cap_bytes`` is stored early. A child stored again after its parent was stored, or an
    odd chunk size (children then straddle parents), marks the parent stale: ``close``
    rebuilds it from the level above on disk.
    """

    def __init__(self, levels: list[ChunkFiles], reduce: Callable[[np.ndarray], np.ndarray],
                 cap_bytes: int = PYRAMID_BYTES) -> None:
        self.levels, self.reduce, self.cap = levels, reduce, cap_bytes
        self._cascade = all(c % 2 == 0 for lv in levels[:-1] for c in lv.chunks)
        self._open: OrderedDict[tuple[int, int, int], _Parent] = OrderedDict()
        self._bytes = 0
        self._built: set[tuple[int, int, int]] = set()
        self._stale: set[tuple[int, int, int]] = set()
        self._stored: set[tuple[int, int]] = set()  # level-0 chunks written
        self._counts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def put(self, i: int, j: int, data: np.ndarray) -> None:
        """Store level-0 chunk (i, j). An all-zero chunk never stored before stays absent
        (it reads as 0), as zarr's ``write_empty_chunks=False`` would leave it; one stored
        before is overwritten."""
        nonzero = bool(data.any())
        if nonzero or (i, j) in self._stored:
            self._stored.add((i, j))
            self.levels[0].write(i, j, data)
        self._update(0, i, j, data, nonzero)

    def _parent(self, k: int, i: int, j: int) -> tuple[tuple[int, int, int], int, int]:
        """Key of level-k chunk (i, j)'s parent and the (row, column) of its reduction there."""
        (ch, cw), (ph, pw) = self.levels[k].chunks, self.levels[k + 1].chunks
        y, x = i * ch // 2, j * cw // 2
        return (k + 1, y // ph, x // pw), y % ph, x % pw

    def _update(self, k: int, i: int, j: int, data: np.ndarray, nonzero: bool) -> None:
        """Level-k chunk (i, j) now holds ``data`` (``nonzero``: any pixel is)."""
        if k + 1 == len(self.levels):
            return
        key, y, x = self._parent(k, i, j)
        if key in self._built or not self._cascade:
            self._stale.add(key)
            return
        part = self._open.get(key)
        if part is None:
            part = self._open[key] = _Parent(self.levels[k + 1].extent(*key[1:]), self.levels[k].dtype,
                                             self._children(k, *key[1:]))
            self._bytes += part.data.nbytes
        r = self.reduce(data)
        part.data[y : y + r.shape[0], x : x + r.shape[1]] = r
        part.nonzero[(i, j)] = nonzero
        if len(part.nonzero) == part.children:
            self._emit(key)
        while self._bytes > self.cap and self._open:
            self._emit(next(iter(self._open)))

    def _children(self, k: int, pi: int, pj: int) -> int:
        """How many level-k chunks make level-(k+1) chunk (pi, pj)."""
        if k not in self._counts:  # children per parent row and column, once per level
            (gh, gw), (ph, pw) = self.levels[k].grid, self.levels[k + 1].grid
            self._counts[k] = (np.bincount([self._parent(k, i, 0)[0][1] for i in range(gh)], minlength=ph),
                               np.bincount([self._parent(k, 0, j)[0][2] for j in range(gw)], minlength=pw))
        rows, cols = self._counts[k]
        return int(rows[pi] * cols[pj])

    def _emit(self, key: tuple[int, int, int]) -> None:
        part = self._open.pop(key)
        self._bytes -= part.data.nbytes
        self._built.add(key)
        k, i, j = key
        if any(part.nonzero.values()):
            self.levels[k].write(i, j, part.data)
        self._update(k, i, j, part.data, bool(part.data.any()))

    def close(self) -> None:
        """Store the parents still held, then rebuild the stale ones from disk, level by level."""
        for k in range(1, len(self.levels)):
            for key in [key for key in self._open if key[0] == k]:
                self._emit(key)
        for k in range(1, len(self.levels)):
            for key in sorted(key for key in self._stale if key[0] == k):
                _, i, j = key
                (ch, cw), src = self.levels[k].chunks, self.levels[k - 1]
                block = src.region(2 * i * ch, 2 * (i + 1) * ch, 2 * j * cw, 2 * (j + 1) * cw)
                nonzero = bool(block.any())
                data = self.reduce(block)
                if nonzero:
                    self.levels[k].write(i, j, data)
                else:  # absent chunks read as 0, as an all-zero level above leaves them
                    self.levels[k].delete(i, j)
                if k + 1 < len(self.levels):
                    self._stale.add(self._parent(k, i, j)[0])
        self._open.clear()


def upsample_into(dst: zarr.Array, mask: np.ndarray, ratio: float) -> None:
    """Fill ``dst`` with ``mask`` resampled nearest (``ratio`` = dst um/px over mask um/px),
    one chunk at a time; chunks without any mask pixel stay absent (fill value 0)."""
    ch, cw = dst.chunks
    for i in range(0, dst.shape[0], ch):
        rows = np.minimum(((np.arange(i, min(i + ch, dst.shape[0])) + 0.5) * ratio).astype(np.int64),
                          mask.shape[0] - 1)
        for j in range(0, dst.shape[1], cw):
            cols = np.minimum(((np.arange(j, min(j + cw, dst.shape[1])) + 0.5) * ratio).astype(np.int64),
                              mask.shape[1] - 1)
            block = mask[np.ix_(rows, cols)]
            if block.any():
                dst[i : i + len(rows), j : j + len(cols)] = block.astype(np.uint8)


def _axes() -> list[dict[str, str]]:
    return [{"name": a, "type": "space", "unit": "micrometer"} for a in ("y", "x")]


def multiscales(name: str, mpps: list[float], method: str) -> dict[str, Any]:
    """NGFF 0.4 ``multiscales`` attributes for levels "0", "1", ... of ``mpps`` um/px."""
    datasets = [
        {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [m, m]}]}
        for k, m in enumerate(mpps)
    ]
    return {"multiscales": [{"version": "0.4", "name": name, "axes": _axes(), "datasets": datasets, "type": method}]}


def _label_attrs(name: str, mpps: list[float], colors: list[dict] | None = None) -> dict[str, Any]:
    label: dict[str, Any] = {"version": "0.4", "source": {"image": "../../"}}
    if colors:
        label["colors"] = colors
    return {**multiscales(name, mpps, "nearest"), "image-label": label}


class OmeZarrWriter:
    """Chunk-aligned writer of the NP probability and nucleus label rasters of one slide.

    Args:
        path: final store, e.g. ``<out>/<slide_id>/masks.ome.zarr``.
        shape: (H, W) of the slide in model pixels. chunk: chunk edge = tile core size.
        mpp: model um/px. tissue: optional (h, w) bool mask at ``tissue_mpp`` um/px.
        metadata: JSON-able facts stored under ``nucleiflow`` in the root attributes.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: tuple[int, int],
        *,
        mpp: float,
        chunk: int = 1024,
        tissue: np.ndarray | None = None,
        tissue_mpp: float | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if tissue is not None and tissue_mpp is None:
            raise ValueError("tissue_mpp is required with a tissue mask")
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.shape, self.chunk, self.mpp = (int(shape[0]), int(shape[1])), int(chunk), float(mpp)
        self.metadata = dict(metadata or {})
        self._done = False
        shapes = level_shapes(self.shape, self.chunk)
        mpps = [self.mpp * 2**k for k in range(len(shapes))]
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(str(self.tmp), mode="w", zarr_format=2)
        self.prob = [self._array(root, str(k), s, "uint8") for k, s in enumerate(shapes)]
        nuclei = root.require_group("labels/nuclei")
        self.labels = [self._array(nuclei, str(k), s, "int32") for k, s in enumerate(shapes)]
        names = ["nuclei"]
        nuclei.attrs.update(_label_attrs("nuclei", mpps))
        if tissue is not None:
            group = root.require_group("labels/tissue")
            for k, (s, m) in enumerate(zip(shapes, mpps)):
                upsample_into(self._array(group, str(k), s, "uint8"), np.asarray(tissue, dtype=bool), m / tissue_mpp)
            group.attrs.update(_label_attrs("tissue", mpps, [{"label-value": 1, "rgba": [0, 160, 0, 96]}]))
            names.append("tissue")
        root["labels"].attrs.update({"labels": names})
        root.attrs.update(multiscales("nuclear probability", mpps, "mean"))
        self._root = root
        self._held: OrderedDict[tuple[int, int, int, int], np.ndarray] = OrderedDict()
        self._pyramids = {name: Pyramid([self._files(a) for a in arrays], reduce)
                          for name, arrays, reduce in (("prob", self.prob, mean2), ("labels", self.labels, nearest2))}
        cols = math.ceil(self.shape[1] / self.chunk)
        self._hold = max(1, min(cols + 2, HELD_BYTES // (4 * self.chunk**2)))

    def _files(self, array: zarr.Array) -> ChunkFiles:
        cname, shuffle, clevel = _CODEC[str(array.dtype)]
        return ChunkFiles(self.tmp / array.path, array.shape, array.chunks, str(array.dtype),
                          numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=shuffle))

    def _array(self, group: zarr.Group, name: str, shape: tuple[int, ...], dtype: str) -> zarr.Array:
        cname, shuffle, clevel = _CODEC[dtype]
        return group.create_array(
            name,
            shape=tuple(shape),
            chunks=tuple(min(self.chunk, s) for s in shape),
            dtype=dtype,
            fill_value=0,
            compressors=numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=shuffle),
            chunk_key_encoding=_KEYS,
            # zarr's own all-fill check cost ~2 ms per 1024^2 chunk, more than encoding it
            # (issue 13); every writer here skips all-zero chunks itself (`Pyramid`,
            # `upsample_into`), so chunks of pure background still stay absent.
            config={"write_empty_chunks": True},
        )

    def _check(self, box: tuple[int, int, int, int], data: np.ndarray | None) -> None:
        if self._done:
            raise RuntimeError(f"{self.path}: writer already closed or aborted")
        x0, y0, x1, y1 = box
        h, w = self.shape
        c = self.chunk
        aligned = x0 % c == 0 and y0 % c == 0 and (x1 % c == 0 or x1 == w) and (y1 % c == 0 or y1 == h)
        if not (aligned and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(f"core {box} is not chunk-aligned ({c} px) inside {w}x{h}")
        if data is not None and np.shape(data) != (y1 - y0, x1 - x0):
            raise ValueError(f"array of shape {np.shape(data)} does not fit core {box}")

    def write_tile(
        self, tile_core: Any, labels_core: np.ndarray | None, prob_core: np.ndarray | None
    ) -> None:
        """Write one chunk-aligned core: labels (h, w) int (nucleus ids), prob (h, w) uint8 or float."""
        box = _box(tile_core)
        for data in (labels_core, prob_core):
            self._check(box, data)
        if labels_core is not None:
            self._held.pop(box, None)
            self._put("labels", box, _to_int32(labels_core))
        if prob_core is not None:
            self._put("prob", box, prob_to_uint8(prob_core))

    def _put(self, name: str, box: tuple[int, int, int, int], data: np.ndarray) -> None:
        """Store ``data`` as the level-0 chunk ``box`` of pyramid ``name`` ("labels", "prob")."""
        self._pyramids[name].put(box[1] // self.chunk, box[0] // self.chunk, data)

    # Merger calls (tiles.stitch; `layout.SlideOutputs` adds the table): whole-chunk reads and writes from the one main process.
    def read_labels(self, box: Any) -> np.ndarray:
        """Level-0 labels of a chunk-aligned box (h, w) int32 (a copy)."""
        key = _box(box)
        if key in self._held:
            return self._held[key].copy()
        self._check(key, None)
        return self._pyramids["labels"].levels[0].read(key[1] // self.chunk, key[0] // self.chunk)

    def write_labels(self, box: Any, labels: np.ndarray) -> None:
        """Like ``write_tile(box, labels, None)``, but the chunk is held in memory (the last
        few written) and encoded once, when it leaves the hold or at ``close``: spills of
        later tiles repaint it, and each repaint would otherwise decode and re-encode it."""
        key = _box(box)
        self._check(key, labels)
        self._held[key] = np.array(_to_int32(labels), copy=True)
        self._held.move_to_end(key)
        while len(self._held) > self._hold:
            self._store_held()

    def _store_held(self) -> None:
        box, labels = self._held.popitem(last=False)
        self._put("labels", box, labels)

    def write_prob(self, box: Any, prob: np.ndarray) -> None:
        self.write_tile(box, None, prob)

    def close(self, meta: Mapping[str, Any] | None = None) -> Path:
        """Build the pyramids, store ``meta``, move the store to its final name."""
        if self._done:
            raise RuntimeError(f"{self.path}: writer already closed or aborted")
        try:
            while self._held:
                self._store_held()
            for pyramid in self._pyramids.values():
                pyramid.close()
            info = {**self.metadata, **(meta or {}), "mpp": self.mpp, "chunk": self.chunk}
            self._root.attrs.update({"nucleiflow": info})
            publish(self.tmp, self.path, durable=False)  # replaces an older, complete store
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.path

    def abort(self) -> None:
        """Remove the temp store; the final name is never touched."""
        self._done = True
        self._held.clear()
        discard(self.tmp)


def _box(box: Any) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a `plan.Box` or a tuple."""
    return (box.x0, box.y0, box.x1, box.y1) if hasattr(box, "x0") else tuple(int(v) for v in box)


def _to_int32(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype != np.int32:
        if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
            raise OverflowError("label values must fit in int32")
        labels = labels.astype(np.int32)
    return labels
