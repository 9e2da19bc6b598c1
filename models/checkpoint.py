"""Checkpoint IO: a folder with `model.safetensors` (weights) and `model.json` (the model card).

The card holds at least "arch", "kwargs" (the constructor arguments: the model is rebuilt
from them) and "mpp" (the resolution it was trained at, um/px); usually also "name",
"outputs", "normalisation", "postprocess", "training", "data", "metrics". `model.json`
is written last, so a folder whose card exists is complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .outputs import postprocess_method
from .registry import MODELS, create_model

WEIGHTS, CARD = "model.safetensors", "model.json"
REQUIRED = ("arch", "kwargs", "mpp")
BUNDLED = Path(__file__).resolve().parent / "checkpoints"
# Weights are stored in float16: half the size (bundled checkpoints stay a few MB), and
# inference runs in float32 (or AMP) after loading. `storage_roundtrip` lets a trainer
# evaluate exactly the weights it is about to store.
STORAGE_DTYPE = torch.float16


def storage_roundtrip(model: nn.Module) -> nn.Module:
    """Round `model`'s floating-point parameters and buffers to STORAGE_DTYPE, in place."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(STORAGE_DTYPE).to(t.dtype))
    return model


def _replace_atomically(path: Path, write) -> None:
    """Call write(tmp_path) on a temp name in the same folder, then rename over `path`."""
    # The temp-name convention of pipeline.outputs.atomic (models may not import pipeline).
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(model: nn.Module, folder: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Write `model`'s weights and `card` to `folder` (created); returns the folder.

    Missing "name", "outputs" and "postprocess" entries are filled in from the folder name
    and the model; everything else in the card is stored as given (it must be JSON).
    """
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise ValueError(f"model card lacks {missing}; required: {list(REQUIRED)}")
    if MODELS.get(card["arch"]) is not type(model):
        raise ValueError(f"card arch {card['arch']!r} does not match {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card = dict(card)
    card.setdefault("name", folder.name)
    if hasattr(model, "outputs"):
        card.setdefault("outputs", dict(model.outputs))
        card.setdefault("postprocess", {"method": postprocess_method(model.outputs)})
    text = json.dumps(card, indent=2)  # fails before anything is written if not JSON
    state = {k: (v.to(STORAGE_DTYPE) if v.is_floating_point() else v).detach().to("cpu").contiguous()
             for k, v in model.state_dict().items()}
    # Remove the old card first: weights and card never disagree under a present card.
    (folder / CARD).unlink(missing_ok=True)
    _replace_atomically(folder / WEIGHTS,
                        lambda p: save_file(state, str(p), metadata={"arch": card["arch"]}))
    _replace_atomically(folder / CARD, lambda p: p.write_text(text + "\n"))
    for name in (WEIGHTS, CARD):  # temp files are private (0600); the checkpoint is not
        (folder / name).chmod(0o644)
    return folder


def bundled_names() -> list[str]:
    """Names of the checkpoints shipped in models/checkpoints/ (folders with a card)."""
    if not BUNDLED.is_dir():
        return []
    return sorted(p.parent.name for p in BUNDLED.glob(f"*/{CARD}"))


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Checkpoint folder of a path (folder or its model.json) or of a bundled name."""
    path, text = Path(name_or_path), str(name_or_path)
    if path.is_file():
        return path.parent
    if (path / CARD).is_file():
        return path
    if text in bundled_names():
        return BUNDLED / text
    if path.is_dir():
        return path  # not a checkpoint: load_checkpoint says so
    if os.sep in text or "/" in text or text.endswith(".json"):
        raise FileNotFoundError(f"no checkpoint at {text}")
    raise KeyError(f"unknown checkpoint {text!r}; bundled: {bundled_names() or 'none'} "
                   f"(a path to a checkpoint folder or its {CARD} also works)")


def load_checkpoint(name_or_path: str | os.PathLike,
                    map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from its card, load the weights -> (model in eval mode, card)."""
    folder = resolve(name_or_path)
    if not (folder / CARD).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint: needs {CARD} and {WEIGHTS}")
    card = json.loads((folder / CARD).read_text())
    model = create_model(card["arch"], **card["kwargs"])
    model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    return model.to(map_location).eval(), card


# Card entries that change what a checkpoint outputs (not its history or metrics): a
# re-tuned threshold must make done slides count as not done with this model.
_OUTPUT_KEYS = ("arch", "kwargs", "mpp", "normalisation", "postprocess")


def save_card(folder: str | os.PathLike, card: dict[str, Any]) -> Path:
    """Replace the card of the checkpoint in ``folder`` (its weights stay as they are), e.g.
    with re-tuned post-processing; the card must still name the weights' architecture."""
    folder = Path(folder)
    stored = json.loads((folder / CARD).read_text())
    if card.get("arch") != stored.get("arch") or card.get("kwargs") != stored.get("kwargs"):
        raise ValueError(f"{folder / CARD}: a new card must keep arch and kwargs (the weights' shape)")
    text = json.dumps(card, indent=2)
    _replace_atomically(folder / CARD, lambda p: p.write_text(text + "\n"))
    (folder / CARD).chmod(0o644)
    return folder


def model_hash(folder: str | os.PathLike, length: int = 16) -> str:
    """Short sha256 hex digest of a checkpoint (folder, card path or name): its weights file
    and the card entries that change its outputs (``_OUTPUT_KEYS``, e.g. post-processing)."""
    folder = resolve(folder)
    digest = hashlib.sha256()
    with open(folder / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if (folder / CARD).is_file():
        card = json.loads((folder / CARD).read_text())
        digest.update(json.dumps({k: card.get(k) for k in _OUTPUT_KEYS}, sort_keys=True).encode())
    return digest.hexdigest()[:length]


def list_checkpoints() -> list[dict[str, Any]]:
    """The bundled checkpoints' cards, each with its folder under "path"."""
    return [json.loads((BUNDLED / n / CARD).read_text()) | {"path": str(BUNDLED / n)}
            for n in bundled_names()]
