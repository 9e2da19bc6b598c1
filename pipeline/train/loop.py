"""Training: a resumable loop with early stopping and distillation (config in `train.config`).

The Prefect flow in flows/train.py only orchestrates these functions. The loop saves its
whole state (weights, optimiser, scheduler, RNGs, best weights, patience) after every epoch
to ``<work>/last.pt`` (atomic rename), and a re-run with the same config resumes there.
"""
from __future__ import annotations

import copy
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nucleiflow.models import losses
from nucleiflow.models.checkpoint import load_checkpoint
from nucleiflow.models.registry import create_model
from nucleiflow.models.tta import tta_maps
from nucleiflow.models.enhancement import EnhancedStudent
from nucleiflow.models.golo import GoLo
from nucleiflow.models.unet import UNet
from nucleiflow.models.widen import widen_unet
from nucleiflow.pipeline.train.config import DataConfig, TrainConfig
from nucleiflow.pipeline.train.ema import WeightAverage
from nucleiflow.pipeline.train.datasets import AnnotatedDataset, read_splits, validation_split
from nucleiflow.pipeline.train.sampler import PatchSampler, tiles
from nucleiflow.pipeline.train.unlabelled import unlabelled_tiles
from nucleiflow.pipeline.infer.device import pick_device
from nucleiflow.pipeline.outputs.atomic import atomic_write


def _loss(arch: str, out: dict, tgt: dict | None, teacher_out: dict | None, cfg: TrainConfig,
          stage: str | None = None) -> torch.Tensor:
    """The paper's loss for each architecture (distillation when there is a teacher)."""
    if teacher_out is not None:
        t = cfg.teacher
        assert t is not None
        return losses.hover_unet_loss(out, tgt, teacher_out, alpha=t.alpha, T=t.temperature)[0]
    if arch == "student" or "hv" in out:
        total = losses.student_loss(out, tgt)[0]
        if "coarse" in out:  # GoLo with NP + HV heads: its global stage learns the mask
            total = total + losses.bce_dice(out["coarse"], tgt["mask"])
        return total
    if arch == "twostage":
        return losses.twostage_loss(out, tgt, stage=stage or "finetune")[0]
    return losses.golo_loss(out, tgt)[0]


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _stage(cfg: TrainConfig, epoch: int) -> str | None:
    """twostage schedule (enhancement paper): stage1, then frozen stage1 + stage2, then both."""
    if cfg.arch != "twostage" or not cfg.train.stage_epochs:
        return None
    bounds = np.cumsum(cfg.train.stage_epochs)
    return ("stage1", "stage2", "finetune")[min(int(np.searchsorted(bounds, epoch, side="right")), 2)]


def _save_state(path: Path, state: dict) -> None:
    with atomic_write(path, durable=False) as tmp:
        torch.save(state, tmp)


def split_data(d: DataConfig, seed: int) -> tuple[list[str], list[str]]:
    """(train names, validation names) of one data set, carved from its train split only."""
    records = [r for r in read_splits(d.root, d.group_by, d.blank_mpp) if r.split == "train"]
    if d.names:
        # A name outside the train split (a typo, or a test image) is an error, not skipped.
        unknown = sorted(set(d.names) - {r.name for r in records})
        if unknown:
            raise ValueError(f"data.names not in the train split of {d.root}: {unknown}")
        records = [r for r in records if r.name in set(d.names)]
    if d.val_fraction == 0:  # an auxiliary set: all of it trains
        return [r.name for r in records], []
    train, val = validation_split(records, fraction=d.val_fraction, seed=seed)
    return [r.name for r in train], [r.name for r in val]


def split_records(cfg: TrainConfig) -> list[tuple[list[str], list[str]]]:
    """(train names, validation names) per data set of ``cfg.data``, in order; ValueError
    when no set holds any out (validation drives early stopping, the checkpoint and tuning)."""
    splits = [split_data(d, cfg.train.seed) for d in cfg.data]
    if not any(val for _, val in splits):
        raise ValueError("no data set holds validation images out: give one a val_fraction > 0")
    return splits


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) and return {"model", "history", "epochs", "best_val", "seconds", ...}."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.train.seed if cfg.train.sample_seed is None else cfg.train.sample_seed)
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    splits, sampler, val_batches = _data(cfg, log)
    model = create_model(cfg.arch, **cfg.kwargs).to(device)
    if cfg.init:
        log(initial_weights(model, cfg.init))
    teacher, unlabelled = _teacher(cfg, device, log)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.train.epochs, eta_min=cfg.train.lr * 0.05)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    # With `train.ema`, validation, early stopping and the checkpoint use the weight average.
    ema = WeightAverage(model, cfg.train.ema) if cfg.train.ema else None
    parts = {"model": model, "opt": opt, "sched": sched, "sampler": sampler, "unlabelled": unlabelled,
             "ema": ema}

    state_path = work / "last.pt"
    run = _resume(state_path, cfg, device, parts, log)
    t_start = time.perf_counter() - run.elapsed
    for epoch in range(run.start, cfg.train.epochs if not run.stopped else run.start):
        stage = _stage(cfg, epoch)
        t0 = time.perf_counter()
        train_loss = _epoch(cfg, device, stage, parts, teacher, scaler)
        sched.step()
        scored = ema.model if ema is not None else model
        val = validation_loss(scored, val_batches, cfg, device, stage)
        improved = val < run.best_val - 1e-4
        if improved:
            run.best_val, run.bad = val, 0
            run.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in scored.state_dict().items()})
        else:
            run.bad += 1
        run.history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val,
                            "seconds": round(time.perf_counter() - t0, 2), "stage": stage})
        log(f"epoch {epoch + 1}/{cfg.train.epochs}  train {train_loss:.4f}  val {val:.4f}"
            f"{'  *' if improved else ''}  ({time.perf_counter() - t0:.1f} s)")
        run.stopped = _stop_reason(cfg, run.bad, epoch, stage, time.perf_counter() - t_start)
        # The stop decision is saved too, so a re-run of a stopped run does not train on.
        _save_state(state_path, {
            "key": cfg.key(), "epoch": epoch + 1, "model": model.state_dict(), "opt": opt.state_dict(),
            "sched": sched.state_dict(), "sampler": sampler.get_state(), "torch_rng": torch.get_rng_state(),
            "unlabelled_rng": unlabelled.rng.bit_generator.state if unlabelled is not None else None,
            "history": run.history, "best_val": run.best_val, "best_state": run.best_state, "bad": run.bad,
            "seconds": time.perf_counter() - t_start, "stopped": run.stopped,
            "ema": ema.state_dict() if ema is not None else None,
        })
        if run.stopped:
            log(run.stopped)
            break
    if ema is not None and run.best_state is None:  # resumed a run stopped before any improvement
        run.best_state = ema.model.state_dict()
    if cfg.train.keep == "last":
        run.best_state = copy.deepcopy((ema.model if ema is not None else model).state_dict())
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    model.eval()
    return {
        "model": model, "history": run.history, "epochs": len(run.history), "best_val": run.best_val,
        "seconds": round(time.perf_counter() - t_start, 1),
        "train_names": [n for t, _ in splits for n in t], "val_names": [n for _, v in splits for n in v],
        "splits": splits, "sampled": dict(zip((d.root for d in cfg.data), sampler.counts)),
        "device": str(device), "hardware": hardware(device),
    }


def initial_weights(model: torch.nn.Module, init: str) -> str:
    """Load checkpoint `init` into `model`; a narrower U-Net of the same depth is widened
    (Net2Net, models/widen.py) so a wide teacher starts from the student's accuracy."""
    src = load_checkpoint(init, map_location="cpu")[0]
    src_shapes = {k: v.shape for k, v in src.state_dict().items()}
    dst_shapes = {k: v.shape for k, v in model.state_dict().items()}
    if src_shapes == dst_shapes:
        model.load_state_dict(src.state_dict())
        return f"initial weights: {init}"
    device = next(model.parameters()).device
    if isinstance(src, UNet) and isinstance(model, EnhancedStudent):
        # The enhancement stage goes on top of a trained student, which it starts from exactly.
        model.stage1.load_state_dict(src.state_dict())
        return f"initial weights: {init} as stage 1 (the enhancement starts as the identity)"
    if isinstance(src, UNet) and isinstance(model, GoLo):
        # Both GoLo stages start as the trained U-Net: the global one on the downscaled tile
        # (its "np" head as a "mask" logit), the local one with a zero-weight coarse input.
        widen_unet(src, model.global_net.cpu())
        widen_unet(src, model.local_net.cpu())
        model.to(device)
        return f"initial weights: {init}, both GoLo stages from its U-Net"
    if not (isinstance(src, UNet) and isinstance(model, UNet)):
        raise ValueError(f"init {init!r}: its weights do not fit this model and only U-Nets can be widened")
    widen_unet(src, model.cpu()).to(device)
    return f"initial weights: {init}, widened (Net2Net) from {src.down[0][0].out_channels} to " \
           f"{model.down[0][0].out_channels} base channels"


def _data(cfg: TrainConfig, log: Callable[[str], None]) -> tuple[list, PatchSampler, list[dict]]:
    """(per-set (train, validation) names, the patch sampler over every set's train images,
    fixed validation batches of every set)."""
    splits = split_records(cfg)
    train_sets, val_batches = [], []
    for d, (train_names, val_names) in zip(cfg.data, splits):
        log(f"data {d.root}: {len(train_names)} train / {len(val_names)} validation images at {cfg.mpp} um/px"
            f" (weight {d.weight})")
        train_sets.append(AnnotatedDataset(d.root, train_names, mpp=cfg.mpp, blank_mpp=d.blank_mpp))
        if val_names:
            val_ds = AnnotatedDataset(d.root, val_names, mpp=cfg.mpp, blank_mpp=d.blank_mpp)
            val_batches += list(tiles(val_ds, patch=cfg.train.patch, batch_size=cfg.train.batch_size))
    sampler = PatchSampler(train_sets, patch=cfg.train.patch,
                           seed=cfg.train.seed if cfg.train.sample_seed is None else cfg.train.sample_seed,
                           weights=[d.weight for d in cfg.data], aug=cfg.augment)
    return splits, sampler, val_batches


def _teacher(cfg: TrainConfig, device: torch.device, log: Callable[[str], None]):
    """(teacher model or None, UnlabelledTiles or None) for a distillation config."""
    if cfg.teacher is None:
        return None, None
    teacher, tcard = load_checkpoint(cfg.teacher.model, map_location=device)
    teacher.eval().requires_grad_(False)
    log(f"teacher: {cfg.teacher.model} ({tcard.get('arch')}), alpha={cfg.teacher.alpha}"
        + (f", maps averaged over {cfg.teacher.tta} views" if cfg.teacher.tta > 1 else ""))
    if abs(float(tcard.get("mpp", cfg.mpp)) - cfg.mpp) > 1e-6:
        # The teacher sees the student's tiles: at another scale its outputs are off.
        log(f"warning: teacher was trained at {tcard['mpp']} um/px, the student trains at {cfg.mpp}")
    unlabelled = None
    if cfg.teacher.unlabelled_slides and cfg.teacher.unlabelled_tiles:
        unlabelled = unlabelled_tiles(
            cfg.teacher.unlabelled_slides, cfg.mpp, cfg.train.patch, cfg.teacher.unlabelled_tiles, seed=cfg.train.seed
        )
        log(f"unlabelled: {len(unlabelled.arrays)} tissue tiles from {len(unlabelled.sources)} of "
            f"{len(cfg.teacher.unlabelled_slides)} slides")
    return teacher, unlabelled


@dataclass
class _Run:
    """Where a run stands: what `_save_state` stores besides weights and optimiser."""

    start: int = 0
    history: list = field(default_factory=list)
    best_val: float = math.inf
    best_state: dict | None = None
    bad: int = 0
    elapsed: float = 0.0
    stopped: str | None = None


def _resume(state_path: Path, cfg: TrainConfig, device: torch.device, parts: dict, log: Callable[[str], None]) -> _Run:
    """Load ``state_path`` into ``parts`` (model, opt, sched, sampler, unlabelled) when it
    belongs to this config; the run's position either way."""
    if not state_path.exists():
        return _Run()
    st = torch.load(state_path, map_location=device, weights_only=False)
    if st.get("key") != cfg.key():
        log(f"{state_path} belongs to another config; starting afresh")
        return _Run()
    for name in ("model", "opt", "sched"):
        parts[name].load_state_dict(st[name])
    parts["sampler"].set_state(st["sampler"])
    if parts["ema"] is not None:
        parts["ema"].load_state_dict(st["ema"])
    torch.set_rng_state(st["torch_rng"])
    run = _Run(st["epoch"], st["history"], st["best_val"], st["best_state"], st["bad"], st.get("seconds", 0.0),
               st.get("stopped"))
    if parts["unlabelled"] is not None and st.get("unlabelled_rng") is not None:
        parts["unlabelled"].rng.bit_generator.state = st["unlabelled_rng"]
    if run.stopped:  # early stop / time budget: a re-run must not train on past it
        log(f"training already finished at epoch {run.start} ({run.stopped}); not training further")
    else:
        log(f"resuming from epoch {run.start} (best validation loss {run.best_val:.4f})")
    return run


def _epoch(cfg: TrainConfig, device: torch.device, stage: str | None, parts: dict, teacher, scaler) -> float:
    """One epoch of ``cfg.train.steps_per_epoch`` steps; returns the mean training loss."""
    model, opt, sampler, unlabelled = parts["model"], parts["opt"], parts["sampler"], parts["unlabelled"]
    if stage is not None:
        model.set_stage(stage)
    model.train()
    if stage == "stage2":  # frozen stage 1 keeps its BatchNorm statistics
        model.set_stage(stage)
    amp, running = device.type == "cuda", []
    for step in range(cfg.train.steps_per_epoch):
        batch = _to(sampler.sample(cfg.train.batch_size), device)
        x = batch.pop("image")
        tgt = batch
        # The last step of every N is unlabelled (N = 1: all of them).
        if unlabelled is not None and step % cfg.teacher.unlabelled_every == cfg.teacher.unlabelled_every - 1:
            x, tgt = unlabelled.sample(cfg.train.batch_size)["image"].to(device), None
        if amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            out = model(x)
            t_out = None
            if teacher is not None:
                with torch.no_grad():
                    n_views = cfg.teacher.tta
                    t_out = tta_maps(teacher, x, n_views) if n_views > 1 else teacher(x)
            loss = _loss(cfg.arch, out, tgt, t_out, cfg, stage)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if parts["ema"] is not None:
            parts["ema"].update(model)
        running.append(float(loss.detach()))
    return float(np.mean(running))


def _stop_reason(cfg: TrainConfig, bad: int, epoch: int, stage: str | None, seconds: float) -> str | None:
    """Why training stops after ``epoch`` (0-based), or None to go on."""
    stage_change = _stage(cfg, epoch + 1) != stage
    if bad >= cfg.train.patience and not stage_change and stage in (None, "finetune"):
        return f"early stop: no validation improvement for {bad} epochs"
    if cfg.train.max_minutes and seconds > cfg.train.max_minutes * 60:
        return f"time budget of {cfg.train.max_minutes} min reached"
    return None


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: list[dict], cfg: TrainConfig, device, stage=None) -> float:
    """Mean loss over fixed validation crops (the labelled loss only, without a teacher)."""
    model.eval()
    vals = []
    for batch in batches:
        b = _to(batch, device)
        x = b.pop("image")
        vals.append(float(_loss(cfg.arch, model(x), b, None, cfg, stage)))
    return float(np.mean(vals))


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"
