"""Regenerate tests/golden/maps.npz: the bundled checkpoints' maps on one fixed input.

Run only when a model is *meant* to change (retrained checkpoint):
``.venv/bin/python tests/golden/make_golden.py``. The input is a fixed 128 x 128 crop of a
MoNuSeg test image (stored in the file, so the test needs no data set); maps are stored as
float16 (the precision the weights are stored at).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
MODELS = ("student", "student-fast", "golo")
CROP = ("TCGA-2Z-A9J9-01A-01-TS1", 400, 300, 128)  # image, x0, y0, size


def golden_input(shared: Path) -> np.ndarray:
    name, x0, y0, n = CROP
    rgb = np.asarray(Image.open(shared / "data" / "monuseg" / "images" / f"{name}.png").convert("RGB"))
    return np.ascontiguousarray(rgb[y0 : y0 + n, x0 : x0 + n])


def predict(name: str, image: np.ndarray) -> dict[str, np.ndarray]:
    """Maps of ``image`` (H, W, 3) uint8 through the checkpoint's Predictor on CPU, float32."""
    from nucleiflow.models.checkpoint import load_checkpoint

    try:
        from nucleiflow.pipeline.infer.predictor import Predictor
    except ImportError:  # before the stage subpackages
        from nucleiflow.pipeline.infer.predictor import Predictor
    net, card = load_checkpoint(name)
    return Predictor(net, card, device="cpu")(image[None])


def main() -> None:
    sys.path.insert(0, str(HERE.parent))
    from conftest import shared_dir

    image = golden_input(shared_dir())
    arrays = {"input": image}
    for name in MODELS:
        for key, arr in predict(name, image).items():
            arrays[f"{name}/{key}"] = arr[0].astype(np.float16)
    np.savez_compressed(HERE / "maps.npz", **arrays)
    print({k: v.shape for k, v in arrays.items()})


if __name__ == "__main__":
    main()
