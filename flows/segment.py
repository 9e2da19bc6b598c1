"""Prefect flow `segment-slides`: one task per slide; the flow only orchestrates.

* Bad input never takes the batch down: a slide that cannot be read or written fails its
  own task (a Prefect ``Failed`` task run) with a one-line reason; the others go on.
  Problems that would fail every slide fail the flow at once, before any slide: an unknown
  model, an output folder that cannot be written.
* A batch with failed slides still finishes: the report is written, the summary drawn,
  and the flow run ends in a standard ``Failed`` state whose message names the failed
  slides; its data is a `SlidesFailed` carrying the report (see `failures` for why, and
  how Prefect's repeats of each reason and its engine traceback are kept out of the logs).
* The run page shows a table artifact of the batch and a progress artifact per slide.
* Slides are claimed (``pipeline.batch.claims``): two batches on one output folder share the work
  and report the other's slides as "busy".
* ``dask_address`` (or ``segment_slides.with_options(task_runner=DaskTaskRunner(...))``)
  runs the slide tasks on a Dask cluster, one slide per Dask worker thread.

The model is loaded once per process (not passed through Prefect, which would try to hash
it). The batch report lands in ``<out>/batch-<timestamp>-<flow run>.json``, the morning-after
summary in ``<out>/summary.csv`` and ``<out>/summary.png``.
"""
from __future__ import annotations

import datetime as dt
import errno
import multiprocessing as mp
import os
import socket
import tempfile
import time
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.states import Completed, Failed, State

from nucleiflow.models.checkpoint import CARD, WEIGHTS, model_hash, resolve
from nucleiflow.pipeline.config import DEFAULT_MODEL, SegmentConfig
from nucleiflow.pipeline.infer.pools import Auto, close_shared_pools, pool_sizes, shared_pools, usable_cores
from nucleiflow.pipeline.infer.predictor import Predictor, check_weights, load_card, load_predictor
from nucleiflow.pipeline.batch.manifest import SlideJob, expand_slides
from nucleiflow.pipeline.batch.guard import read_record
from nucleiflow.pipeline.batch.run_slide import segment_slide
from nucleiflow.pipeline.slide.reader import SlideError
from nucleiflow.pipeline.batch.report import STATUSES, format_report, write_summary
from nucleiflow.pipeline.outputs.atomic import write_json_atomic
from nucleiflow.pipeline.outputs.layout import slide_paths
from nucleiflow.flows.failures import SlidesFailed, quiet_expected_failures
from nucleiflow.flows.progress import SlideProgress

TABLE_COLUMNS = ("slide_id", "status", "nuclei", "tissue_mm2", "seconds", "reason")
# Every process importing the flow (the CLI, a worker's flow-run process, a Dask worker).
quiet_expected_failures()


class OutputNotWritable(OSError):
    """The batch's output folder cannot be written: no slide could be."""


@lru_cache(maxsize=2)
def _predictor(model: str, device: str, tta: int = 1) -> tuple[Predictor, str]:
    return load_predictor(model, device=device, tta=tta), model_hash(resolve(model))


def check_model(model: str) -> None:
    """Fail fast, before any slide, when the model cannot be found (KeyError /
    FileNotFoundError), its card does not validate (CardError, a ValueError) or its weights
    do not load (CardError: a truncated file was every slide's traceback)."""
    folder = resolve(model)
    missing = [n for n in (CARD, WEIGHTS) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a checkpoint: missing {', '.join(missing)}")
    load_card(folder)
    check_weights(folder)


def check_output(out: str | os.PathLike) -> Path:
    """Create ``out`` and prove a file can be written in it; OutputNotWritable otherwise."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputNotWritable(f"{out}: output folder is not writable ({e.strerror or e}); "
                                "pick another --out or fix its permissions") from None
    return out


def failure_reason(e: BaseException) -> str:
    """One line saying what went wrong with a slide, and what to do where we know."""
    text = " ".join(str(e).split())
    if isinstance(e, SlideError):
        return text
    if isinstance(e, OSError):
        where = f" {e.filename}" if e.filename else ""
        if e.errno == errno.ENOSPC or "No space left" in text:
            return f"disk full while writing{where}: free space on the output disk and re-run"
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            return f"cannot write{where}: {e.strerror}; make the output folder writable"
        return f"I/O error{where}: {e.strerror or text}"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@task(name="segment-slide", task_run_name="segment-{job.slide_id}", cache_policy=NO_CACHE, retries=0)
def segment_slide_task(job: SlideJob, out: str, cfg: SegmentConfig) -> State:
    """One slide -> a report row (the state's data): Completed (done, or named Skipped /
    Busy) or Failed with the one-line reason as its message."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    row = {"slide_id": job.slide_id, "path": job.path, "status": "failed", "reason": None, "nuclei": None,
           "tissue_mm2": None, "seconds": None, "worker": _worker()}
    try:
        if mp.current_process().daemon:
            # Daemonic processes (Dask's default workers) may not start children: read and
            # post-process in this process. Only speed changes (these are not in the key).
            cfg = cfg.model_copy(update={"readers": 0, "workers": 0})
        predictor, mhash = _predictor(cfg.model, cfg.device, cfg.tta)
        # Sized on the cores of the process running the slide; started by the first slide,
        # kept for the next ones (`run_slides` stops them).
        sizes = pool_sizes(usable_cores(), predictor.cuda, cfg.readers, cfg.workers)
        pools = shared_pools(sizes, predictor.cuda)
        with SlideProgress(job.slide_id, logger.info) as progress:
            rec = segment_slide(job, out, cfg, predictor, mhash, log=logger.info, progress=progress, pools=pools)
    except Exception as e:  # any slide's failure is that slide's, never the batch's
        row.update(reason=failure_reason(e), seconds=round(time.perf_counter() - t0, 2))
        if not isinstance(e, SlideError | OSError):  # not an input problem we know: keep the
            logger.error(f"{job.slide_id}: unexpected error; traceback:", exc_info=True)  # traceback
        # Prefect logs this message once ("Finished in state Failed(...)"): the one line per failure.
        return Failed(message=f"{job.slide_id}: {row['reason']}", data=row)
    row.update(status=rec["status"], reason=rec.get("reason"), nuclei=rec.get("nuclei"),
               tissue_mm2=rec.get("tissue_mm2"), seconds=round(time.perf_counter() - t0, 2))
    logger.info(f"{job.slide_id}: {rec['status']}" + (f", {rec['nuclei']} nuclei" if "nuclei" in rec else ""))
    if rec["status"] == "done":
        return Completed(data=row)
    return Completed(name=rec["status"].capitalize(), message=row["reason"], data=row)


def _failed_row(job: SlideJob, reason: str) -> dict:
    return {"slide_id": job.slide_id, "path": job.path, "status": "failed", "reason": reason, "nuclei": None,
            "tissue_mm2": None, "seconds": None, "worker": None}


def _row(job: SlideJob, state: State) -> dict:
    """The report row a slide task's final state carries (or one for a crashed task)."""
    if not state.is_final():
        return _failed_row(job, f"task run ended {state.type.value}")
    data = state.result(raise_on_failure=False)
    if isinstance(data, dict):
        return data
    # The task never returned a row (it crashed, was cancelled...): say so.
    return _failed_row(job, failure_reason(data) if isinstance(data, BaseException) else f"task run {state.name}")


def _gather(job: SlideJob, future) -> dict:
    """Wait for a submitted slide task; a worker that died gives a failed row, not a crash."""
    try:
        future.wait()
        wrapped = getattr(future, "wrapped_future", None)
        if wrapped is not None and wrapped.status == "error":  # e.g. dask's KilledWorker
            return _failed_row(job, f"worker lost: {failure_reason(wrapped.exception())}")
        return _row(job, future.state)
    except Exception as e:  # noqa: BLE001 - one slide's lost worker is not the batch's
        return _failed_row(job, f"worker lost: {failure_reason(e)}")


def _is_dask(runner: object) -> bool:
    return type(runner).__module__.split(".")[0] == "prefect_dask"


def run_slides(jobs: list[SlideJob], out: str, cfg: SegmentConfig, dask_address: str | None = None) -> list[dict]:
    """Report rows of ``jobs``, in order. One slide at a time in this process, or all
    submitted at once to Dask: the flow's own DaskTaskRunner (``with_options``) or one
    connected to ``dask_address``."""
    ctx = FlowRunContext.get()
    own = ctx.task_runner if ctx is not None and _is_dask(ctx.task_runner) else None
    if dask_address is None and own is None:
        try:  # one set of reader / post-processing pools serves every slide of the batch
            return [_row(j, segment_slide_task(j, out, cfg, return_state=True)) for j in jobs]
        finally:
            close_shared_pools()
    if dask_address is not None:
        from prefect_dask import DaskTaskRunner

        runner_cm = DaskTaskRunner(address=dask_address)
    else:
        runner_cm = nullcontext(own)
    with runner_cm as runner:
        futures = [runner.submit(segment_slide_task, {"job": j, "out": out, "cfg": cfg}) for j in jobs]
        return [_gather(j, f) for j, f in zip(jobs, futures)]


@flow(name="segment-slides", log_prints=True)
def segment_slides(
    slides: list[str] | str,
    out: str,
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    mpp: float | None = None,
    tile_size: int | None = None,
    halo: int | None = None,
    batch_size: int = 4,
    readers: int | Auto = "auto",
    workers: int | Auto = "auto",
    dask_address: str | None = None,
    tta: int = 1,
    overwrite: bool = False,
) -> dict | State:
    """Segment a batch of slides (paths, globs, folders or a CSV manifest) into ``out``.

    Returns the batch report: {"slides": [{slide_id, path, status, reason, nuclei,
    tissue_mm2, seconds, worker}], "done"/"skipped"/"busy"/"failed": counts, "report": path,
    "summary": [csv, png]}; when some slides failed, a Failed state holding a `SlidesFailed`
    with the report (call with ``return_state=True`` and read it with `batch_report`).
    """
    logger = get_run_logger()
    check_model(model)
    kw = {k: v for k, v in {"tile_size": tile_size, "halo": halo}.items() if v is not None}
    cfg = SegmentConfig(model=model, device=device, mpp=None, batch_size=batch_size, readers=readers,
                        workers=workers, tta=tta, overwrite=overwrite, **kw)
    jobs = expand_slides(slides, mpp=mpp)
    check_output(out)
    where = f" on Dask at {dask_address}" if dask_address else ""
    logger.info(f"{len(jobs)} slides -> {out} with model {model}{where}")
    started = dt.datetime.now().astimezone()
    rows = run_slides(jobs, out, cfg, dask_address)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    try:
        summary = [str(p) for p in write_summary(out, log=logger.warning)]
    except Exception as e:  # noqa: BLE001 - the slides are done; a missing plot is not a failed batch
        logger.warning(f"batch summary not written: {failure_reason(e)}")
        summary = None
    ctx = FlowRunContext.get()
    run_id = str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None
    # Two batches may start in the same second on one folder: the flow run id tells them apart.
    name = f"batch-{started:%Y%m%d-%H%M%S}-{(run_id or f'{os.getpid()}')[:8]}.json"
    report = {"created": started.isoformat(timespec="seconds"), "flow_run_id": run_id, "out": str(out),
              "model": model, "config": cfg.model_dump(), "dask_address": dask_address, "slides": rows,
              "seconds": round((dt.datetime.now().astimezone() - started).total_seconds(), 1),
              "summary": summary, **counts}
    try:
        report["report"] = str(write_json_atomic(Path(out) / name, report))
    except OSError as e:  # e.g. the disk filled up with the last slide: still print the table
        report.update(report=None, report_error=f"batch report {Path(out) / name} not written: {failure_reason(e)}")
        logger.error(report["report_error"])
    _table_artifact(report, logger)
    # The counts only: each failure's reason was logged once by its task, the table is an
    # artifact (the run page) and printed by the CLI (the terminal).
    logger.info(format_report(report)[-1])
    if report["report"] is None:  # a standard Failed state (alerts), the report as its data
        return Failed(message=report["report_error"], data=SlidesFailed(report))
    if counts["failed"]:
        failed = SlidesFailed(report)
        return Failed(message=str(failed), data=failed)
    return report


def _table_artifact(report: dict, logger) -> None:
    """The batch table on the flow run's page (and under key ``nucleiflow-batch`` in Artifacts)."""
    from prefect.artifacts import create_table_artifact

    table = [{k: r.get(k) for k in TABLE_COLUMNS} for r in report["slides"]]
    try:
        create_table_artifact(table=table, key="nucleiflow-batch", description=format_report(report)[-1])
    except Exception as e:  # noqa: BLE001 - the report file is written; the UI copy is a convenience
        logger.warning(f"batch table artifact not created: {e}")


def unfinished(jobs: list[SlideJob], out: str | os.PathLike, model: str, cfg: SegmentConfig) -> list[str]:
    """Slide ids of ``jobs`` with no finished run in ``out`` for ``model`` and ``cfg``'s
    key (what an interrupted batch left to do; the slide's own mpp, the rest of the key,
    is not checked: that needs the slide opened)."""
    mhash, key = model_hash(resolve(model)), cfg.key()
    left = []
    for job in jobs:
        rec = read_record(slide_paths(out, job.slide_id)["run_json"]) or {}
        if not (rec.get("status") == "done" and rec.get("model_hash") == mhash
                and str(rec.get("config_key", "")).startswith(f"{key}@")):
            left.append(job.slide_id)
    return left


def batch_report(state: State) -> dict:
    """The batch report a finished `segment_slides` state holds, whether or not slides
    failed; raises what the flow raised when it did not get to write one (bad model,
    output folder not writable, bad slide list)."""
    data = state.result(raise_on_failure=False)
    if isinstance(data, SlidesFailed):
        return data.report
    if isinstance(data, BaseException):
        raise data
    return data


def run_batch(**params) -> dict:
    """Run the flow and return its report whether or not slides failed (the CLI's entry)."""
    return batch_report(segment_slides(**params, return_state=True))
