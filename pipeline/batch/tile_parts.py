"""Resume inside a slide: every finished tile's result, kept on disk until the slide is done.

While a slide streams, each tile's `TileNuclei` as it leaves post-processing (local ids,
before the stitcher numbers it) is written to ``<out>/<slide_id>/.resume/tile-<index>.npz``
(temp name + rename: a part is whole or absent), beside a ``manifest.json`` naming what the
parts belong to: the run key (slide fingerprint, model hash, config key), a digest of the
tile plan and the part format. A run of the slide whose key matches the manifest takes the
parts over: `infer.segment_reader` replays them through the stitcher in tile order and
streams only the missing tiles, so ids, spills, dropped seam duplicates and row order come
out exactly as in an uninterrupted run. Any other manifest (another slide, model, config or
part format) and the folder is wiped before the first tile.

Why the stitcher's *inputs* and not the chunks it wrote: a tile paints its spills into
chunks written before it (read-modify-write), so a chunk is final only when its last
neighbour is, and a run killed half-way through a tile leaves chunks holding part of it.
Raw parts never depend on what the killed run managed to write; the killed run's temp
table and store are removed (`cleanup.clean_partial`) and rebuilt by the replay.

The folder is hidden and lies beside the slide's outputs, never under ``nuclei/``: readers
of the batch never see a part. Only the slide's claim holder opens, writes or removes it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections.abc import Collection
from pathlib import Path

import numcodecs
import numpy as np
import shapely

from nucleiflow.pipeline.outputs.atomic import TEMP_PATTERN, atomic_write, write_json_atomic
from nucleiflow.pipeline.outputs.layout import slide_paths
from nucleiflow.pipeline.postprocess.plausible import REASONS
from nucleiflow.pipeline.tiles.ownership import Spill, TileNuclei
from nucleiflow.pipeline.tiles.plan import Box, Tile, TilePlan

PARTS_DIR = ".resume"
MANIFEST = "manifest.json"
# Bump when the part layout or what a TileNuclei holds changes. 2: the dropped counts (tiles
# drop objects that are not nuclei since then: parts of format 1 hold them).
FORMAT = 2
# lz4: a 1024 px tile's part in ~15 ms at ~1.3 MB; zlib (np.savez_compressed) took ~260 ms,
# which on a GPU would cost more than the tile's inference.
_CODEC = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)


def parts_folder(out: str | Path, slide_id: str) -> Path:
    """``<out>/<slide_id>/.resume``: where a slide's unfinished tiles wait."""
    return slide_paths(out, slide_id)["run_json"].parent / PARTS_DIR


def plan_digest(plan: TilePlan) -> str:
    """16 hex digits over the plan's grid and every tile's core and read box."""
    data = [plan.width, plan.height, plan.mpp, plan.scale, plan.tile_size, plan.halo, list(plan.origin),
            [[t.index, t.row, t.col, *_box(t.core), *_box(t.read)] for t in plan]]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def parts_key(run_key: dict, plan: TilePlan, *, batch_size: int, device: str) -> dict:
    """What the parts of a run belong to: run.json's key, the plan, the part format, and the
    model batch size and device type: speed-only settings for "done", but the model's floats
    differ in the last bit with the batch a tile sits in (and more across devices), so
    parts made with others would not give an uninterrupted run's result."""
    return {"format": FORMAT, **run_key, "plan": plan_digest(plan), "batch_size": batch_size, "device": device}


def whole_batches(done: Collection[int], tiles: int, batch_size: int) -> frozenset[int]:
    """The tiles of ``done`` whose whole model batch is in ``done``: batch j holds plan
    positions ``j * batch_size`` up to ``tiles``. A run killed mid-batch saved part of one;
    it is run again whole, so every remaining tile sits in the batch it had uninterrupted.

    >>> sorted(whole_batches({0, 1, 2, 3, 4, 6}, 8, 2))   # 5 and 7 missing
    [0, 1, 2, 3]
    >>> sorted(whole_batches({4, 5, 6}, 7, 2))   # the last batch may be short
    [4, 5, 6]
    """
    done = set(done)
    return frozenset(i for j in range(0, tiles, batch_size)
                     if all(k in done for k in range(j, min(j + batch_size, tiles)))
                     for i in range(j, min(j + batch_size, tiles)))


def _box(b: Box) -> list[int]:
    return [b.x0, b.y0, b.x1, b.y1]


# -- pure: TileNuclei <-> named arrays (no pickle: parts are data, never code) ---------
def pack(tn: TileNuclei) -> dict[str, np.ndarray]:
    """``tn`` as named plain arrays for ``np.savez``: labels, prob, spills flattened
    (cells (k, 2), boxes (k, 4), labels concatenated), table columns in order (geometry as
    WKB bytes + offsets, strings as unicode)."""
    t = tn.tile
    arrays = {
        "tile": np.array([t.index, t.row, t.col, tn.n, tn.n_halo_edge], np.int64),
        "core_labels": tn.core_labels, "prob": tn.prob,
        "dropped": np.array([tn.dropped.get(k, 0) for k in REASONS], np.int64),
        "spill_cells": np.array([sp.cell for sp in tn.spills], np.int64).reshape(-1, 2),
        "spill_boxes": np.array([_box(sp.box) for sp in tn.spills], np.int64).reshape(-1, 4),
        "spill_labels": (np.concatenate([sp.labels.ravel() for sp in tn.spills]) if tn.spills
                         else np.zeros(0, tn.core_labels.dtype)),
    }
    if tn.table is not None:
        arrays["columns"] = np.array(list(tn.table), dtype=str)
        for name, values in tn.table.items():
            values = np.asarray(values)
            if name == "geometry":
                wkb = shapely.to_wkb(values)
                arrays["col:geometry"] = np.frombuffer(b"".join(wkb), np.uint8)
                arrays["col:geometry:ends"] = np.cumsum([len(w) for w in wkb], dtype=np.int64)
            elif values.dtype == object:  # class_name
                arrays[f"col:{name}"] = values.astype(str)
            else:
                arrays[f"col:{name}"] = values
    return arrays


def unpack(arrays: dict[str, np.ndarray], tile: Tile) -> TileNuclei:
    """The `TileNuclei` ``pack`` stored, for ``tile`` (ValueError if the part is another tile's)."""
    index, row, col, n, n_halo_edge = (int(v) for v in arrays["tile"])
    if (index, row, col) != (tile.index, tile.row, tile.col):
        raise ValueError(f"part of tile {index} ({row}, {col}) read for tile {tile.index} ({tile.row}, {tile.col})")
    spills, flat, at = [], arrays["spill_labels"], 0
    for cell, b in zip(arrays["spill_cells"], arrays["spill_boxes"]):
        box = Box(*(int(v) for v in b))
        spills.append(Spill((int(cell[0]), int(cell[1])), box, flat[at : at + box.area].reshape(box.height, box.width)))
        at += box.area
    table = None
    if "columns" in arrays:
        table = {}
        for name in arrays["columns"].tolist():
            if name == "geometry":
                buf, ends = arrays["col:geometry"].tobytes(), arrays["col:geometry:ends"].tolist()
                starts = [0, *ends[:-1]]
                table[name] = shapely.from_wkb(np.array([buf[a:b] for a, b in zip(starts, ends)], dtype=object))
            else:
                values = arrays[f"col:{name}"]
                table[name] = values.astype(object) if values.dtype.kind == "U" else values
    return TileNuclei(tile=tile, core_labels=arrays["core_labels"], prob=arrays["prob"], spills=spills, n=n,
                      n_halo_edge=n_halo_edge, table=table,
                      dropped={k: int(v) for k, v in zip(REASONS, arrays["dropped"])})


def encode(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each array Blosc-compressed to uint8 bytes, with its dtype and shape beside it."""
    out = {}
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        out[name] = np.frombuffer(_CODEC.encode(a) if a.size else b"", np.uint8)  # Blosc cannot decode b""
        out[f"{name}:dtype"], out[f"{name}:shape"] = np.array(a.dtype.str), np.array(a.shape, np.int64)
    return out


def decode(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays ``encode`` stored."""
    names = [k for k in stored if not k.endswith((":dtype", ":shape"))]
    # bytearray: writable arrays, like the ones post-processing hands the stitcher
    return {k: np.frombuffer(bytearray(_CODEC.decode(stored[k].tobytes()) if stored[k].size else b""),
                             np.dtype(str(stored[f"{k}:dtype"]))).reshape(tuple(stored[f"{k}:shape"])) for k in names}


# -- IO: the parts folder of one slide ---------------------------------------------------
class TileParts:
    """The parts of one slide run under ``key`` (see the module doc); ``done`` holds the
    indices (= plan positions) of the tiles taken over from an earlier run: those with a
    whole part, in whole model batches (`whole_batches`)."""

    def __init__(self, folder: Path, key: dict) -> None:
        self.folder, self.key = Path(folder), key
        self.done: frozenset[int] = frozenset()

    @classmethod
    def open(cls, folder: str | Path, key: dict, tiles: int) -> TileParts:
        """Take over the parts in ``folder`` if its manifest is ``key`` (a plan of ``tiles``
        tiles, batched by ``key["batch_size"]``), else start the folder afresh."""
        parts = cls(Path(folder), key)
        if _read_json(parts.folder / MANIFEST) == key:
            for tmp in parts.folder.glob(TEMP_PATTERN):  # a part the killed run was writing
                tmp.unlink(missing_ok=True)
            whole = {i for i, p in parts._present() if _readable(p)}
            parts.done = whole_batches(whole, tiles, key["batch_size"])
        else:
            remove_parts(parts.folder)
            parts.folder.mkdir(parents=True)
            write_json_atomic(parts.folder / MANIFEST, key)
        return parts

    def _path(self, index: int) -> Path:
        return self.folder / f"tile-{index:06d}.npz"

    def _present(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.folder.glob("tile-*.npz"):
            try:
                found.append((int(p.stem.removeprefix("tile-")), p))
            except ValueError:
                continue
        return found

    def save(self, tn: TileNuclei) -> None:
        """Store ``tn`` (before the stitcher changes it). Not fsynced: a SIGKILL keeps what
        the kernel holds; a part torn by a power cut fails ``_readable`` and is redone."""
        with atomic_write(self._path(tn.tile.index), durable=False) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **encode(pack(tn)))

    def load(self, tile: Tile) -> TileNuclei:
        """The stored result of ``tile`` (one of ``done``)."""
        with np.load(self._path(tile.index), allow_pickle=False) as z:
            return unpack(decode({k: z[k] for k in z.files}), tile)


def _readable(path: Path) -> bool:
    """Is ``path`` a whole npz (its zip directory, written last, is there)?"""
    try:
        with zipfile.ZipFile(path) as z:
            return "tile.npy" in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def remove_parts(folder: str | Path) -> None:
    """Delete a slide's parts folder (claim holder only: the slide is done, or its key changed)."""
    shutil.rmtree(folder, ignore_errors=True)
