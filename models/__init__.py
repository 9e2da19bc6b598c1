"""Torch modules only: UNet, GoLo, enhancement, student, losses, registry, checkpoint IO.

Build a model from its card's arch + kwargs with `create_model`, or load a trained one with
`load_checkpoint(name_or_path)`; `to_maps` turns raw outputs into post-processing maps.
"""
from .checkpoint import list_checkpoints, load_checkpoint, model_hash, save_checkpoint
from .enhancement import Enhancement, TwoStage
from .golo import GoLo
from .outputs import postprocess_method, to_maps
from .registry import MODELS, create_model
from .student import Student
from .unet import UNet

__all__ = [
    "MODELS", "Enhancement", "GoLo", "Student", "TwoStage", "UNet", "create_model",
    "list_checkpoints", "load_checkpoint", "model_hash", "postprocess_method",
    "save_checkpoint", "to_maps",
]
