"""Typed training configuration, as written in configs/*.yaml (`nucleiflow train CONFIG`)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nucleiflow.pipeline.config import config_hash
from nucleiflow.pipeline.train.augment import AugmentConfig


class DataConfig(BaseModel):
    """One annotated data set of a training run (``data:`` is one of these or a list)."""

    model_config = ConfigDict(extra="forbid")
    root: str = Field(description="Data set in the shared/data layout (images/, labels/, splits.csv).")
    weight: float = Field(1.0, ge=0, description="Share of training patches drawn from this set (relative).")
    group_by: str | None = Field(None, description="splits.csv column (e.g. patient): validation holds out whole groups.")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="Share of the train split held out for validation; "
                                "0: all of it trains (an auxiliary set; validation comes from the others).")
    names: list[str] | None = Field(None, description="Train on these train-split images only.")
    eval_split: str | None = Field("test", description="Split scored after training; None: not scored "
                                   "(a set with no held-out split, e.g. dsb2018-he).")
    blank_mpp: Literal["error", "skip"] = Field("error", description="Images with a blank mpp in splits.csv: an "
                                                "error, or left out (dsb2018-he has two).")
    eval_names: list[str] | None = None


class TeacherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="Registered checkpoint name or path.")
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the student (label) loss.")
    temperature: float = Field(1.0, gt=0)
    unlabelled_slides: list[str] = Field(default_factory=list, description="Slides to cut unlabelled tiles from.")
    unlabelled_tiles: int = Field(64, ge=0)
    unlabelled_every: int = Field(2, ge=1, description="One unlabelled batch every N steps.")
    tta: int = Field(1, ge=1, le=8, description="Views (flips/rotations, models/tta.py) the teacher's maps are "
                     "averaged over: the student learns the averaged maps at the cost of one forward.")


class LoopConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(40, ge=1)
    steps_per_epoch: int = Field(25, ge=1)
    batch_size: int = Field(8, ge=1)
    patch: int = Field(256, ge=32)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(8, ge=1, description="Epochs without validation improvement before stopping.")
    max_minutes: float | None = Field(None, gt=0, description="Stop (and finish) after this long.")
    seed: int = Field(0, description="Picks the validation images, and the patches unless sample_seed is set.")
    sample_seed: int | None = Field(None, description="Seed of patch sampling and augmentation: a later round "
                                    "that keeps its validation images (seed) still sees new batches.")
    ema: float | None = Field(None, gt=0, lt=1, description="Decay per step of a weight average (e.g. 0.995): "
                              "validation and the checkpoint use the averaged weights.")
    stage_epochs: list[int] | None = Field(None, description="twostage: epochs of stage1, stage2, finetune.")
    keep: Literal["best", "last"] = Field("best", description="The checkpoint: the epoch of lowest validation "
                                          "loss, or the last epoch's (a refit on every labelled image, with the "
                                          "epochs an earlier run's curve fixed, has no validation to pick by).")


class TrainConfig(BaseModel):
    """One training run, as written in configs/*.yaml."""

    model_config = ConfigDict(extra="forbid")
    name: str
    arch: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    mpp: float = Field(0.5, gt=0)
    data: list[DataConfig] = Field(description="One data set or a list; the first is the primary one.")
    train: LoopConfig = Field(default_factory=LoopConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    init: str | None = Field(None, description="Checkpoint (name or path) whose weights training starts from.")
    teacher: TeacherConfig | None = None
    postprocess: dict[str, Any] = Field(default_factory=lambda: {"method": "hv"})
    tune_postprocess: bool = Field(True, description="Choose thresholds on the validation images.")
    out: str = Field(description="Checkpoint folder to write (model.safetensors + model.json).")
    work: str = Field(description="Folder for resumable training state.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_tile_size: int = 512

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @field_validator("data")
    @classmethod
    def _primary_is_scored(cls, v: list[DataConfig]) -> list[DataConfig]:
        if v and v[0].eval_split is None:
            raise ValueError("the first data set's eval_split gives the card's metrics: it cannot be None")
        return v

    @property
    def primary(self) -> DataConfig:
        """The first data set: its eval split is the card's headline metrics."""
        return self.data[0]

    def key(self) -> str:
        """Hash of everything that shapes the trained weights (not where they go). Options
        added after runs were made are left out while at their default (`_LATE_DEFAULTS`), so
        those runs keep their keys and still resume."""
        data = self.model_dump(exclude={"out", "device", "eval_tile_size", "tune_postprocess"})
        for section, name, default in _LATE_DEFAULTS:
            parts = data[section]  # "data" is a list of sets; the others one dict (teacher: or None)
            for part in parts if isinstance(parts, list) else [parts]:
                if part is not None and part.get(name) == default:
                    del part[name]
        return config_hash(data)


# (section of the dumped config, option, default): options added after runs existed.
_LATE_DEFAULTS: tuple[tuple[str, str, Any], ...] = (
    ("train", "sample_seed", None),
    ("train", "ema", None),
    ("data", "blank_mpp", "error"),
    ("teacher", "tta", 1),
    ("train", "keep", "best"),
)
