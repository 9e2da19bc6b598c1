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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import zarr

from nucleiflow.pipeline.outputs.atomic import discard, publish, temp_path
from nucleiflow.pipeline.outputs.chunk_pyramid import ChunkFiles, Pyramid, mean2, nearest2

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
