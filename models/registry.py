"""Architecture registry: a name + keyword arguments (stored in the model card) -> a module."""
from __future__ import annotations

from typing import Any

from torch import nn

from .enhancement import EnhancedStudent, Enhancement, TwoStage
from .golo import GoLo
from .student import Student
from .unet import UNet

MODELS: dict[str, type[nn.Module]] = {
    "unet": UNet,
    "golo": GoLo,
    "twostage": TwoStage,
    "student": Student,
    "enhancement": Enhancement,
    "student-enhanced": EnhancedStudent,
}


def create_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build `MODELS[arch](**kwargs)`; an unknown arch raises KeyError naming the valid ones."""
    try:
        cls = MODELS[arch]
    except KeyError:
        raise KeyError(f"unknown model arch {arch!r}; valid: {', '.join(sorted(MODELS))}") from None
    return cls(**kwargs)
