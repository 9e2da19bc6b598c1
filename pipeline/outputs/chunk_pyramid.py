"""The chunk files and pyramid of an OME-Zarr label or probability image, written without
zarr's per-chunk overhead and without reading a level back (issue 13).

`ChunkFiles` reads and writes one Zarr format 2 array's chunk files (the bytes zarr stores);
`Pyramid` builds levels 1, 2, ... while level 0 is written, each chunk's 2x2 reduction
(`mean2` for the probability, `nearest2` for labels) held in its parent until the parent's
children are in. `omezarr.OmeZarrWriter` creates the arrays and their metadata with zarr and
hands their chunks to these.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numcodecs
import numpy as np

# Pyramid chunks held until their children are in (`Pyramid`), per pyramid: row-major tiles
# keep about one chunk per tile column open over all levels (4 MB per 1024^2 label chunk);
# past this the oldest are stored early and rebuilt from disk at close (same result).
PYRAMID_BYTES = 128 * 2**20


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
