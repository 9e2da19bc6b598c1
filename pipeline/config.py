"""Typed run configuration shared by the CLI, the flows and the YAML files in configs/."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MODEL = "student"
DEFAULT_MPP = 0.5  # um/px the bundled models were trained at; a model card overrides it
DEFAULT_TILE = 1024  # core edge in model px = Zarr chunk edge
DEFAULT_HALO = 64  # model px of context per side (32 um at 0.5 um/px > largest nucleus)
TISSUE_MPP = 8.0  # um/px of the thumbnail tissue detection runs on


class SegmentConfig(BaseModel):
    """How one slide is segmented. Everything that changes the output is in here (see `key`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = DEFAULT_MODEL
    mpp: float | None = Field(None, gt=0, description="Override of the slide's level-0 um/px.")
    tile_size: int = Field(DEFAULT_TILE, ge=64, le=8192)
    halo: int = Field(DEFAULT_HALO, ge=0, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(4, ge=1, le=256)
    readers: int = Field(1, ge=0, le=32, description="Reader processes; 0 reads in the main process.")
    workers: int = Field(1, ge=0, le=64, description="Post-processing processes; 0 = in-process.")
    tissue_mpp: float = Field(TISSUE_MPP, gt=0)
    overwrite: bool = Field(False, description="Replace another slide's results under the same id.")

    def key(self, exclude: tuple[str, ...] = ("device", "batch_size", "readers", "workers", "overwrite")) -> str:
        """Hash of the fields that change results (not the ones that only change speed)."""
        data = self.model_dump(exclude=set(exclude))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a clear error names the file when it is not one."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{p}: config file not found") from e
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a YAML mapping at the top level")
    return data
