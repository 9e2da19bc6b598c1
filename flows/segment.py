"""Prefect flow `segment-slides`: one task per slide; the flow only orchestrates.

The model is loaded once per process (not passed through Prefect, which would try to hash
it); a bad slide fails its own task with a one-line reason and the batch goes on. The
batch report lands in ``<out>/batch-<timestamp>.json``.
"""
from __future__ import annotations

import datetime as dt
import time
from functools import lru_cache
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from nucleiflow.models.checkpoint import load_checkpoint, model_hash, resolve
from nucleiflow.pipeline.config import SegmentConfig
from nucleiflow.pipeline.inference import Predictor
from nucleiflow.pipeline.manifest import SlideJob, expand_slides
from nucleiflow.pipeline.slidejob import segment_slide
from nucleiflow.pipeline.slides import SlideError
from nucleiflow.pipeline.writers import write_json_atomic


@lru_cache(maxsize=2)
def _predictor(model: str, device: str) -> tuple[Predictor, str]:
    net, card = load_checkpoint(model)
    return Predictor(net, card, device=device), model_hash(resolve(model))


def check_model(model: str) -> None:
    """Fail fast, before any slide, when the model cannot be found."""
    resolve(model)


@task(name="segment-slide", cache_policy=NO_CACHE, retries=0)
def segment_slide_task(job: SlideJob, out: str, cfg: SegmentConfig) -> dict:
    logger = get_run_logger()
    predictor, mhash = _predictor(cfg.model, cfg.device)
    t0 = time.perf_counter()
    try:
        rec = segment_slide(job, out, cfg, predictor, mhash, log=logger.info)
    except (SlideError, OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        logger.error(f"{job.slide_id}: failed: {reason}")
        return {"slide_id": job.slide_id, "path": job.path, "status": "failed", "reason": reason,
                "nuclei": None, "seconds": round(time.perf_counter() - t0, 2)}
    logger.info(f"{job.slide_id}: {rec['status']}, {rec.get('nuclei', '-')} nuclei")
    return {"slide_id": job.slide_id, "path": job.path, "status": rec["status"], "reason": None,
            "nuclei": rec.get("nuclei"), "tissue_mm2": rec.get("tissue_mm2"),
            "seconds": round(time.perf_counter() - t0, 2)}


@flow(name="segment-slides", log_prints=True)
def segment_slides(
    slides: list[str] | str,
    out: str,
    model: str = "student",
    device: str = "auto",
    mpp: float | None = None,
    tile_size: int | None = None,
    halo: int | None = None,
    batch_size: int = 4,
    readers: int = 1,
    workers: int = 1,
) -> dict:
    """Segment a batch of slides (paths, globs, folders or a CSV manifest) into ``out``.

    Returns the batch report: {"slides": [{slide_id, path, status, reason, nuclei, seconds}],
    "failed": n, "done": n, "skipped": n, "report": path}.
    """
    logger = get_run_logger()
    check_model(model)
    kw = {k: v for k, v in dict(tile_size=tile_size, halo=halo).items() if v is not None}
    cfg = SegmentConfig(model=model, device=device, mpp=None, batch_size=batch_size, readers=readers,
                        workers=workers, **kw)
    jobs = expand_slides(slides, mpp=mpp)
    logger.info(f"{len(jobs)} slides -> {out} with model {model}")
    Path(out).mkdir(parents=True, exist_ok=True)
    rows = [segment_slide_task(job, out, cfg) for job in jobs]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    report = {"created": stamp, "out": str(out), "model": model, "config": cfg.model_dump(),
              "slides": rows, **counts}
    path = write_json_atomic(Path(out) / f"batch-{stamp}.json", report)
    report["report"] = str(path)
    return report
