"""Which torch device inference and training run on."""
from __future__ import annotations

import torch


def pick_device(device: str) -> torch.device:
    """'auto' -> CUDA when there is one, else CPU; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(device)
