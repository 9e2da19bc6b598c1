"""Annotated data sets in the shared layout, and the patches training draws from them.

A data set root holds ``images/<name>.png`` (RGB uint8), ``labels/<name>.png`` (16-bit
instance labels, 0 = background) and ``splits.csv`` (at least ``name, split, mpp``).
Images are resampled from their own mpp to the training mpp on load. `PatchSampler` cuts
random, augmented patches into torch batches laid out as the training contract says;
`tiles` cuts fixed ones for a validation loss.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.segmentation import relabel_sequential

from nucleiflow.pipeline.postprocess.labels import resample_nearest
from nucleiflow.pipeline.slide import stain
from nucleiflow.pipeline.train.targets import dihedral, dihedral_targets, make_targets

REQUIRED_COLUMNS = ("name", "split", "mpp")


@dataclass(frozen=True)
class ImageRecord:
    """One annotated image: its split, resolution (um/px) and files."""

    name: str
    split: str
    mpp: float
    image_path: Path
    label_path: Path


def read_splits(root: str | Path) -> list[ImageRecord]:
    """Records of ``<root>/splits.csv``, in file order; a clear error names a bad file."""
    root = Path(root)
    path = root / "splits.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: splits file not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (needs {', '.join(REQUIRED_COLUMNS)})")
        records = []
        for line, row in enumerate(reader, start=2):
            try:
                mpp = float(row["mpp"])
            except (TypeError, ValueError):
                mpp = float("nan")
            if not mpp > 0:
                raise ValueError(f"{path}, line {line}: mpp must be a positive number, got {row['mpp']!r}")
            name = row["name"]
            records.append(ImageRecord(name, row["split"], mpp, root / "images" / f"{name}.png",
                                       root / "labels" / f"{name}.png"))
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
    order = np.random.default_rng(seed).permutation(len(recs))
    val = set(order[:n_val].tolist())
    return [r for i, r in enumerate(recs) if i not in val], [r for i, r in enumerate(recs) if i in val]


class AnnotatedDataset:
    """Images and their training targets at the training mpp.

    ``select`` is a split name ("train", "test") or the image names (or records) to use.
    Item ``i`` is a dict: "image" (H, W, 3) uint8 plus `make_targets`' arrays. With
    ``stain_ref`` images are stain-normalised on load. ``cache`` keeps items in memory.
    """

    def __init__(self, root: str | Path, select: str | Sequence[str | ImageRecord], mpp: float,
                 cache: bool = True, stain_ref: stain.StainReference | None = None):
        self.root, self.mpp, self.stain_ref = Path(root), float(mpp), stain_ref
        records = read_splits(self.root)
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


def _crop(a: np.ndarray, y0: int, x0: int, p: int) -> np.ndarray:
    """(..., p, p) window of a (..., H, W) array at (y0, x0), zero-padded past the edge."""
    out = np.zeros(a.shape[:-2] + (p, p), a.dtype)
    sub = a[..., y0:y0 + p, x0:x0 + p]
    out[..., :sub.shape[-2], :sub.shape[-1]] = sub
    return out


def _starts(n: int, p: int, stride: int) -> list[int]:
    """Window starts covering [0, n) with windows of p; the last one flush with the edge."""
    if n <= p:
        return [0]
    s = list(range(0, n - p + 1, stride))
    return s if s[-1] == n - p else s + [n - p]


def _to_batch(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack per-patch numpy arrays into the contract's torch layout."""
    b: dict[str, torch.Tensor] = {}
    for key in items[0]:
        a = np.stack([it[key] for it in items])
        if key == "image":
            b[key] = torch.from_numpy(a.astype(np.float32) / 255.0)
        elif key in ("mask", "marker"):
            b[key] = torch.from_numpy(a[:, None].astype(np.float32))
        elif key in ("type", "inst"):
            b[key] = torch.from_numpy(a.astype(np.int64))
        else:
            b[key] = torch.from_numpy(np.ascontiguousarray(a, np.float32))
    return b


def _colour(rgb: np.ndarray, rng: np.random.Generator, stain_sigma: tuple[float, float], jitter: float) -> np.ndarray:
    """Mild H&E stain jitter, then brightness/contrast jitter: (H, W, 3) uint8 -> same."""
    rgb = stain.stain_augment(rgb, rng, *stain_sigma)
    c, b = rng.uniform(1 - jitter, 1 + jitter), rng.uniform(-jitter, jitter) * 128
    f = rgb.astype(np.float32)
    f = (f - f.mean()) * c + f.mean() + b
    return np.clip(f, 0, 255).round().astype(np.uint8)


class UnlabelledTiles:
    """Random RGB-only patches from (H, W, 3) uint8 arrays (e.g. tiles cut from slides) for
    distillation. ``sample(n)`` -> {"image": (n, 3, P, P) float32 in [0, 1]}."""

    def __init__(self, arrays: Sequence[np.ndarray], patch: int = 256, rng: np.random.Generator | int = 0,
                 augment: bool = True):
        if not arrays:
            raise ValueError("UnlabelledTiles needs at least one image")
        self.arrays, self.patch, self.augment = list(arrays), patch, augment
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        out = []
        for _ in range(batch_size):
            a = self.arrays[self.rng.integers(len(self.arrays))]
            y0 = self.rng.integers(max(a.shape[0] - self.patch, 0) + 1)
            x0 = self.rng.integers(max(a.shape[1] - self.patch, 0) + 1)
            img = _crop(np.moveaxis(a, -1, 0), y0, x0, self.patch)
            if self.augment:
                img = dihedral(img, int(self.rng.integers(4)), bool(self.rng.random() < 0.5))
            out.append({"image": img})
        return _to_batch(out)


class PatchSampler:
    """Random training patches: ``sample(B)`` -> torch batch per the training contract.

    "image" (B, 3, P, P) float32 in [0, 1], "mask" (B, 1, P, P), "hv" (B, 2, P, P),
    "marker" (B, 1, P, P) float32, "type" (B, P, P) int64 if the data set has types,
    "inst" (B, P, P) int64 with ``with_inst=True``, and "unlabelled" (B, 3, P, P) when
    ``unlabelled`` images were given. Images are drawn in proportion to their area, crops
    uniformly; HV maps are computed on whole images before cropping, so cut nuclei keep
    their true centroid. Augmentation: flips and 90-degree rotations (HV turned with them),
    mild stain and brightness/contrast jitter. One numpy Generator seeded with ``seed``
    drives everything, so equal seeds give equal batches.
    """

    def __init__(self, dataset: AnnotatedDataset, patch: int = 256, seed: int = 0, augment: bool = True,
                 stain_augment: bool = True, unlabelled: Sequence[np.ndarray] | None = None,
                 stain_sigma: tuple[float, float] = (0.1, 0.05), jitter: float = 0.1):
        if len(dataset) == 0:
            raise ValueError("PatchSampler needs a non-empty data set")
        self.dataset, self.patch, self.augment = dataset, patch, augment
        self.stain_augment, self.stain_sigma, self.jitter = stain_augment, stain_sigma, jitter
        self.rng = np.random.default_rng(seed)
        area = np.array([dataset[i]["mask"].size for i in range(len(dataset))], float)
        self._p = area / area.sum()
        self.unlabelled = UnlabelledTiles(unlabelled, patch, self.rng, augment) if unlabelled else None

    def _one(self, with_inst: bool) -> dict[str, np.ndarray]:
        rng, p = self.rng, self.patch
        item = self.dataset[int(rng.choice(len(self._p), p=self._p))]
        h, w = item["mask"].shape
        y0, x0 = int(rng.integers(max(h - p, 0) + 1)), int(rng.integers(max(w - p, 0) + 1))
        out = {k: _crop(v, y0, x0, p) for k, v in item.items() if k != "image" and (with_inst or k != "inst")}
        img = _crop(np.moveaxis(item["image"], -1, 0), y0, x0, p)
        if self.stain_augment:
            img = np.moveaxis(_colour(np.moveaxis(img, 0, -1), rng, self.stain_sigma, self.jitter), -1, 0)
        out["image"] = img
        if self.augment:
            out = dihedral_targets(out, int(rng.integers(4)), bool(rng.random() < 0.5))
        return out

    def get_state(self) -> dict:
        """RNG state, so a resumed training run draws the batches it would have drawn."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def sample(self, batch_size: int, with_inst: bool = False) -> dict[str, torch.Tensor]:
        batch = _to_batch([self._one(with_inst) for _ in range(batch_size)])
        if self.unlabelled is not None:
            batch["unlabelled"] = self.unlabelled.sample(batch_size)["image"]
        return batch


def tiles(dataset: AnnotatedDataset, patch: int = 256, stride: int | None = None, batch_size: int = 8
          ) -> Iterator[dict[str, torch.Tensor]]:
    """Fixed, unaugmented crops covering every image (last ones flush with the edges, zero
    padding for images smaller than ``patch``), batched like `PatchSampler.sample`."""
    stride = stride or patch
    buf: list[dict[str, np.ndarray]] = []
    for i in range(len(dataset)):
        item = dataset[i]
        h, w = item["mask"].shape
        for y0 in _starts(h, patch, stride):
            for x0 in _starts(w, patch, stride):
                crop = {k: _crop(v, y0, x0, patch) for k, v in item.items() if k not in ("image", "inst")}
                crop["image"] = _crop(np.moveaxis(item["image"], -1, 0), y0, x0, patch)
                buf.append(crop)
                if len(buf) == batch_size:
                    yield _to_batch(buf)
                    buf = []
    if buf:
        yield _to_batch(buf)
