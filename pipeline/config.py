"""Typed configuration: how a slide is segmented (`SegmentConfig`), what a checkpoint is
(`ModelCard`, with its `PostprocessConfig`), shared by the CLI, the flows and configs/.

The training run's own schema (`TrainConfig` and its parts) lives beside the loop in
`train.config`; both hash themselves with `config_hash`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    readers: Annotated[int, Field(ge=0, le=32)] | Literal["auto"] = Field(
        "auto", description="Reader processes; 0 reads in the main process; auto: `infer.pools.pool_sizes`.")
    workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field(
        "auto", description="Post-processing processes; 0 = in-process; auto: `infer.pools.pool_sizes`.")
    tissue_mpp: float = Field(TISSUE_MPP, gt=0)
    tta: int = Field(1, ge=1, le=8, description="Test-time augmentation: views averaged per tile (1 = off).")
    overwrite: bool = Field(False, description="Replace another slide's results under the same id.")

    def key(self, exclude: tuple[str, ...] = ("device", "batch_size", "readers", "workers", "overwrite")) -> str:
        """Hash of the fields that change results (not the ones that only change speed)."""
        data = self.model_dump(exclude=set(exclude))
        if data.get("tta") == 1:  # off: keys stay those of runs made before TTA existed
            del data["tta"]
        return config_hash(data)


def config_hash(data: Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over the sorted-key JSON of ``data``: the config keys."""
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


class _Params(BaseModel):
    """Post-processing parameters of one method (thresholds above 1 are allowed: "nothing").
    Unset (None) = the method's own default
    (`postprocess.watershed`), so the card and the function never disagree on defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Every method: objects whose mean probability is below are dropped (0 / unset = none).
    min_mean_prob: float | None = Field(None, ge=0, le=1)

    def params(self) -> dict[str, Any]:
        """Keyword arguments for the method's function (everything set, except ``method``)."""
        return self.model_dump(exclude={"method"}, exclude_none=True)


class HvPostprocess(_Params):
    """`hv_watershed`: probability + horizontal/vertical distance maps (HoVer-Net)."""

    method: Literal["hv"] = "hv"
    prob_threshold: float | None = Field(None, ge=0)
    marker_threshold: float | None = Field(None, ge=0)
    min_size: int | None = Field(None, ge=0)
    ksize: int | None = Field(None, ge=1)
    opening_radius: int | None = Field(None, ge=0)
    normalise: Literal["fixed", "tile"] | None = None
    gradient_range: tuple[float, float] | None = None


class MarkerPostprocess(_Params):
    """`marker_watershed`: probability + shape-marker map (GoLo, USE-Net)."""

    method: Literal["marker"]
    prob_threshold: float | None = Field(None, ge=0)
    marker_threshold: float | None = Field(None, ge=0)
    min_size: int | None = Field(None, ge=0)


class DistancePostprocess(_Params):
    """`distance_watershed`: probability alone, split at distance-transform peaks."""

    method: Literal["distance"]
    prob_threshold: float | None = Field(None, ge=0)
    min_distance: int | None = Field(None, ge=1)
    min_size: int | None = Field(None, ge=0)
    smooth_sigma: float | None = Field(None, ge=0)


PostprocessConfig = Annotated[
    HvPostprocess | MarkerPostprocess | DistancePostprocess, Field(discriminator="method")
]


class Normalisation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    stain: dict[str, Any] | None = None  # a `StainReference.to_dict()`, or None: no normalisation


class ModelCard(BaseModel):
    """A checkpoint's ``model.json``, validated when the checkpoint loads.

    Typed where the pipeline reads it (arch, mpp, outputs, normalisation, postprocess);
    ``kwargs`` go to the model's constructor; ``training``, ``data``, ``metrics`` and
    ``tuning`` are free-form records (e.g. metrics per held-out data set) that only people read.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    arch: str | None = None  # required in a model.json (`load`); None only for in-memory test models
    kwargs: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, int] = Field(default_factory=dict)
    mpp: float = Field(gt=0, description="um/px the model was trained at")
    input: str | None = None
    normalisation: Normalisation = Field(default_factory=Normalisation)
    # No entry means "hv" with its defaults, as before cards carried one.
    postprocess: PostprocessConfig = Field(default_factory=HvPostprocess)
    parameters: int | None = Field(None, ge=0)
    training: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    tuning: dict[str, Any] = Field(default_factory=dict)  # how `train --retune` chose postprocess

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str | None) -> str | None:
        from nucleiflow.models.registry import MODELS  # lazy: worker processes stay torch-free

        if v is not None and v not in MODELS:
            raise ValueError(f"unknown arch {v!r}; known: {sorted(MODELS)}")
        return v

    @property
    def has_classes(self) -> bool:
        """Does the model have a type head (class columns in the nuclei table)?"""
        return "tp" in self.outputs

    @classmethod
    def of(cls, card: ModelCard | Mapping[str, Any], source: str | Path = "model card") -> ModelCard:
        """``card`` validated; CardError names ``source`` and the offending key in one line."""
        if isinstance(card, ModelCard):
            return card
        try:
            return cls.model_validate(dict(card))
        except ValidationError as e:
            raise CardError(f"{source}: {one_line(e)}") from None

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """Read and validate a ``model.json``."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except ValueError as e:
            raise CardError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise CardError(f"{p}: expected a JSON object")
        missing = [k for k in ("arch", "kwargs", "mpp") if k not in data]
        if missing:  # what the model is rebuilt from
            raise CardError(f"{p}: {missing[0]}: Field required")
        return cls.of(data, p)


class CardError(ValueError):
    """A model card that does not validate: the message is one line naming file and key."""


def one_line(e: ValidationError) -> str:
    """The first error of a pydantic ValidationError as ``key.path: message``."""
    err = e.errors()[0]
    # Drop the discriminator tag pydantic inserts ("postprocess.hv.min_size" -> "postprocess.min_size").
    loc = [str(x) for x in err["loc"]]
    if len(loc) > 1 and loc[0] == "postprocess" and loc[1] in ("hv", "marker", "distance"):
        loc.pop(1)
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{'.'.join(loc) or '(top level)'}: {err['msg']}{more}"
