"""Annotated data sets in the shared layout: records, splits, images and their targets.

A data set root holds ``images/<name>.png`` (RGB uint8), ``labels/<name>.png`` (16-bit
instance labels, 0 = background) and ``splits.csv`` (at least ``name, split, mpp``).
Images are resampled from their own mpp to the training mpp on load. The patches training
draws from them are cut in `train.sampler`.
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.segmentation import relabel_sequential

from nucleiflow.pipeline.postprocess.labels import resample_nearest
from nucleiflow.pipeline.slide import stain
from nucleiflow.pipeline.train.targets import make_targets

REQUIRED_COLUMNS = ("name", "split", "mpp")


@dataclass(frozen=True)
class ImageRecord:
    """One annotated image: its split, resolution (um/px) and files."""

    name: str
    split: str
    mpp: float
    image_path: Path
    label_path: Path
    group: str | None = None  # e.g. the patient: validation is carved by whole groups


def read_splits(root: str | Path, group_by: str | None = None, blank_mpp: str = "error") -> list[ImageRecord]:
    """Records of ``<root>/splits.csv``, in file order; a clear error names a bad file.
    ``group_by`` names a column (e.g. "patient") copied into each record's ``group``;
    ``blank_mpp`` "skip" leaves out rows whose mpp is blank (unknown) instead of failing."""
    root = Path(root)
    path = root / "splits.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: splits file not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        needed = REQUIRED_COLUMNS + ((group_by,) if group_by else ())
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (needs {', '.join(needed)})")
        records = []
        for line, row in enumerate(reader, start=2):
            if blank_mpp == "skip" and not (row["mpp"] or "").strip():
                continue
            try:
                mpp = float(row["mpp"])
            except (TypeError, ValueError):
                mpp = float("nan")
            if not mpp > 0:
                raise ValueError(f"{path}, line {line}: mpp must be a positive number, got {row['mpp']!r}")
            name = row["name"]
            records.append(ImageRecord(name, row["split"], mpp, root / "images" / f"{name}.png",
                                       root / "labels" / f"{name}.png", row[group_by] if group_by else None))
    return records


def resample_labels(inst: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of (H, W) labels to ``shape`` by pixel centres; instances
    that vanish are dropped and ids relabelled 1..N. Returns int32."""
    out = resample_nearest(inst, shape[0], shape[1]).astype(np.int32)
    return relabel_sequential(out)[0].astype(np.int32)


def read_pair(record: ImageRecord) -> tuple[np.ndarray, np.ndarray]:
    """(rgb (H, W, 3) uint8, labels (H, W) int32) of a record at its own mpp; ValueError
    when the two PNGs differ in size. The one image + label loader (training, tuning,
    evaluation)."""
    with Image.open(record.image_path) as im, Image.open(record.label_path) as lab:
        rgb, inst = np.array(im.convert("RGB")), np.array(lab).astype(np.int32)
    if inst.shape != rgb.shape[:2]:
        raise ValueError(f"{record.label_path}: labels {inst.shape} do not match image {rgb.shape[:2]}")
    return rgb, inst


def load_image(record: ImageRecord, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """(rgb (H, W, 3) uint8, inst (H, W) int32) of a record, resampled from ``record.mpp``
    to ``mpp`` um/px (image: Lanczos, antialiased; labels: nearest, ids 1..N)."""
    rgb, inst = read_pair(record)
    img = Image.fromarray(rgb)
    scale = record.mpp / mpp
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    rgb = np.array(img)
    return rgb, resample_labels(inst, rgb.shape[:2])


def validation_split(records: Sequence[ImageRecord], fraction: float = 0.2, seed: int = 0
                     ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, val): a random ``fraction`` of the *training* images held out for validation.

    Every record must have split "train" (validation is never carved from test): filter first,
    e.g. ``[r for r in read_splits(root) if r.split == "train"]``. Deterministic for a seed.
    Records with a ``group`` (patient, source image) are held out by whole groups, in a random
    group order until at least ``fraction`` of the images are held out, so no patient is on
    both sides.
    """
    bad = sorted({r.split for r in records if r.split != "train"})
    if bad:
        raise ValueError(f"validation is carved from split 'train' only; got records of split(s) {bad}")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    recs = sorted(records, key=lambda r: r.name)
    if len(recs) < 2:
        raise ValueError(f"need at least 2 training images to hold some out, got {len(recs)}")
    n_val = min(len(recs) - 1, max(1, round(fraction * len(recs))))
    if any(r.group is not None for r in recs):
        return _group_split(recs, n_val, seed)
    order = np.random.default_rng(seed).permutation(len(recs))
    val = set(order[:n_val].tolist())
    return [r for i, r in enumerate(recs) if i not in val], [r for i, r in enumerate(recs) if i in val]


def _group_split(recs: list[ImageRecord], n_val: int, seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    groups = sorted({str(r.group) for r in recs})
    if len(groups) < 2:
        raise ValueError(f"need at least 2 groups to hold one out, got {groups}")
    held: set[str] = set()
    for g in np.random.default_rng(seed).permutation(groups):
        if sum(str(r.group) in held for r in recs) >= n_val or len(held) == len(groups) - 1:
            break
        held.add(str(g))
    return [r for r in recs if str(r.group) not in held], [r for r in recs if str(r.group) in held]


class AnnotatedDataset:
    """Images and their training targets at the training mpp.

    ``select`` is a split name ("train", "test") or the image names (or records) to use;
    ``blank_mpp`` as in `read_splits`.
    Item ``i`` is a dict: "image" (H, W, 3) uint8 plus `make_targets`' arrays. With
    ``stain_ref`` images are stain-normalised on load. ``cache`` keeps items in memory.
    """

    def __init__(self, root: str | Path, select: str | Sequence[str | ImageRecord], mpp: float,
                 cache: bool = True, stain_ref: stain.StainReference | None = None, blank_mpp: str = "error"):
        self.root, self.mpp, self.stain_ref = Path(root), float(mpp), stain_ref
        records = read_splits(self.root, blank_mpp=blank_mpp)
        if isinstance(select, str):
            self.records = [r for r in records if r.split == select]
            if not self.records:
                splits = sorted({r.split for r in records})
                raise ValueError(f"{self.root}: no images of split {select!r} (splits: {splits})")
        else:
            by_name = {r.name: r for r in records}
            names = [s.name if isinstance(s, ImageRecord) else s for s in select]
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise KeyError(f"{self.root}: images not in splits.csv: {unknown}")
            self.records = [by_name[n] for n in names]
        self._cache: dict[int, dict[str, np.ndarray]] | None = {} if cache else None
        if cache:
            for i in range(len(self)):
                self._cache[i] = self._load(i)

    def _load(self, i: int) -> dict[str, np.ndarray]:
        rgb, inst = load_image(self.records[i], self.mpp)
        if self.stain_ref is not None:
            rgb = stain.normalise(rgb, self.stain_ref)
        return {"image": rgb, **make_targets(inst)}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self._cache[i] if self._cache is not None else self._load(i)
