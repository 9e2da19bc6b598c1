"""The patches training draws: random augmented ones (`PatchSampler`, `UnlabelledTiles`) and
fixed ones for a validation loss (`tiles`), as torch batches laid out as the training
contract says (see `PatchSampler`).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from nucleiflow.pipeline.slide import stain
from nucleiflow.pipeline.train.augment import AugmentConfig, degrade, focus_origin, resize_patch, scaled_window
from nucleiflow.pipeline.train.datasets import AnnotatedDataset
from nucleiflow.pipeline.train.targets import dihedral, dihedral_targets


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
                 augment: bool = True, sources: Sequence[str] = ()):
        if not arrays:
            raise ValueError("UnlabelledTiles needs at least one image")
        self.arrays, self.patch, self.augment = list(arrays), patch, augment
        self.sources = list(sources)  # where the arrays came from (slides), for logs
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
    ``unlabelled`` images were given. ``dataset`` is one data set or several: a data set is
    drawn with probability proportional to its ``weights`` entry, then an image in proportion
    to its area, then a crop (uniform, or centred on a nucleus for ``aug.focus`` of them);
    ``counts`` tallies the patches drawn per data set. HV maps are computed on whole images
    before cropping, so cut nuclei keep their true centroid. Augmentation: flips and 90-degree
    rotations (HV turned with them), scale, mild stain and brightness/contrast jitter, blur
    and JPEG (`AugmentConfig`). One numpy Generator seeded with ``seed`` drives everything,
    so equal seeds give equal batches.
    """

    def __init__(self, dataset: AnnotatedDataset | Sequence[AnnotatedDataset], patch: int = 256, seed: int = 0,
                 augment: bool = True, stain_augment: bool = True, unlabelled: Sequence[np.ndarray] | None = None,
                 weights: Sequence[float] | None = None, aug: AugmentConfig | None = None):
        sets = [dataset] if isinstance(dataset, AnnotatedDataset) else list(dataset)
        if not sets or any(len(d) == 0 for d in sets):
            raise ValueError("PatchSampler needs non-empty data sets")
        w = np.ones(len(sets)) if weights is None else np.asarray(weights, float)
        if w.shape != (len(sets),) or not (w >= 0).all() or w.sum() <= 0:
            raise ValueError(f"weights must be {len(sets)} non-negative numbers, not all 0; got {weights}")
        self.sets, self.patch, self.augment, self.stain_augment = sets, patch, augment, stain_augment
        self.aug = aug or AugmentConfig()
        self.rng = np.random.default_rng(seed)
        self._items = [(s, i) for s, d in enumerate(sets) for i in range(len(d))]
        p = []
        for s, d in enumerate(sets):
            area = np.array([d[i]["mask"].size for i in range(len(d))], float)
            p.append(w[s] / w.sum() * area / area.sum())
        self._p = np.concatenate(p)
        self.counts = [0] * len(sets)
        self.unlabelled = UnlabelledTiles(unlabelled, patch, self.rng, augment) if unlabelled else None

    @property
    def dataset(self) -> AnnotatedDataset:
        """The first (or only) data set."""
        return self.sets[0]

    def _origin(self, item: dict[str, np.ndarray], q: int) -> tuple[int, int]:
        rng = self.rng
        if self.aug.focus > 0 and rng.random() < self.aug.focus:
            yx = focus_origin(item["mask"], q, rng)
            if yx is not None:
                return yx
        h, w = item["mask"].shape
        return int(rng.integers(max(h - q, 0) + 1)), int(rng.integers(max(w - q, 0) + 1))

    def _one(self, with_inst: bool) -> dict[str, np.ndarray]:
        rng, p = self.rng, self.patch
        s, i = self._items[int(rng.choice(len(self._p), p=self._p))]
        self.counts[s] += 1
        item = self.sets[s][i]
        q = scaled_window(p, rng, self.aug.scale) if self.augment else p
        y0, x0 = self._origin(item, q)
        out = {k: _crop(v, y0, x0, q) for k, v in item.items() if k != "image" and (with_inst or k != "inst")}
        img, out = resize_patch(_crop(np.moveaxis(item["image"], -1, 0), y0, x0, q), out, p)
        if self.stain_augment:
            a = self.aug
            img = np.moveaxis(_colour(np.moveaxis(img, 0, -1), rng, a.stain_sigma, a.jitter), -1, 0)
        if self.augment:
            img = degrade(img, rng, self.aug)
        out["image"] = img
        if self.augment:
            out = dihedral_targets(out, int(rng.integers(4)), bool(rng.random() < 0.5))
        return out

    def get_state(self) -> dict:
        """RNG state and counts, so a resumed training run draws the batches it would have drawn."""
        return {"rng": self.rng.bit_generator.state, "counts": list(self.counts)}

    def set_state(self, state: dict) -> None:
        if "rng" not in state:  # a state saved before counts were kept: the bare RNG state
            state = {"rng": state, "counts": self.counts}
        self.rng.bit_generator.state = state["rng"]
        self.counts = list(state["counts"])

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
