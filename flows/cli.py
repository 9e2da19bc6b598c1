"""The `nucleiflow` command line: a thin layer over the flows and the pipeline.

Expected failures (bad slide, bad config, missing model) print one line on stderr naming
the file and the fix, and exit with status 2; no traceback.
"""
from __future__ import annotations

import gc
import json
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, Optional

import typer

from nucleiflow.pipeline.config import DEFAULT_HALO, DEFAULT_MODEL, DEFAULT_TILE, TISSUE_MPP, SegmentConfig

# Offline machines: no telemetry (its background writes also contend for Prefect's SQLite).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Prefect waits 20 s for its temporary API server; on a loaded box (2 cores, training next
# door) it once took longer and the batch died before any slide. Users may still set it.
STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
os.environ.setdefault(STARTUP_TIMEOUT_ENV, "180")

app = typer.Typer(
    help="Whole-slide H&E nuclei segmentation: inspect, segment, train, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr, then exit: the contract for expected errors."""
    typer.echo(f"nucleiflow: error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def inspect(
    slide: Path = typer.Argument(..., help="A slide file OpenSlide can read (.svs, .tif, .ndpi, ...)."),
    as_json: bool = typer.Option(False, "--json", help="Print exactly one JSON object."),
    mpp: Optional[float] = typer.Option(
        None, "--mpp", help="Level-0 microns per pixel, for slides whose metadata lacks it."
    ),
    overlay: Optional[Path] = typer.Option(
        None, "--overlay", help="Write a PNG thumbnail with the tissue mask and tile cores."
    ),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Checkpoint whose mpp the tiles are planned at (as segment)."),
    model_mpp: Optional[float] = typer.Option(None, help="um/px the tiles are planned at (default: the model card's)."),
    tile_size: int = typer.Option(DEFAULT_TILE, help="Tile core edge in model pixels."),
    halo: int = typer.Option(DEFAULT_HALO, help="Context pixels around each core."),
) -> None:
    """Slide facts, tissue fraction and the planned tile count.

    Keys: width, height, level_count, mpp_x, mpp_y, vendor, objective_power, fingerprint,
    tissue_fraction, tile_count (plus level_dimensions, level_downsamples, mpp_source, path).
    """
    from nucleiflow.pipeline.infer.predictor import load_card
    from nucleiflow.pipeline.slide.reader import SlideError, open_slide
    from nucleiflow.pipeline.outputs.overlays import overlay_png
    from nucleiflow.pipeline.slide.tissue import detect_tissue
    from nucleiflow.pipeline.tiles.plan import plan_slide

    if model_mpp is None:
        try:
            model_mpp = load_card(model).mpp
        except (KeyError, FileNotFoundError, ValueError) as e:
            fail(str(e).strip("'\""))
    try:
        with open_slide(slide, mpp=mpp) as reader:
            info = reader.info
            tissue = detect_tissue(reader, mpp=TISSUE_MPP)
            plan = plan_slide(info, tissue, model_mpp, tile_size=tile_size, halo=halo)
            if overlay is not None:
                overlay_png(reader, tissue, plan, overlay)
    except SlideError as e:
        fail(str(e))
    except ValueError as e:  # bad tile geometry options
        fail(f"{slide}: {e}")
    facts = info.to_dict()
    facts.update(tissue_fraction=round(tissue.fraction, 4), tile_count=len(plan))
    if tissue.warning:
        facts["warning"] = tissue.warning
        typer.echo(f"nucleiflow: warning: {slide}: {tissue.warning}", err=True)
    if as_json:
        typer.echo(json.dumps(facts))
        return
    width = max(len(k) for k in facts)
    for k, v in facts.items():
        typer.echo(f"{k:<{width}}  {v}")
    if overlay is not None:
        typer.echo(f"overlay written to {overlay}")


def _no_server(e: RuntimeError, nothing: str) -> NoReturn:
    """The one line (exit 2) for Prefect's temporary API server not starting in time (a busy
    machine); any other RuntimeError is raised again. ``nothing``: what did not start."""
    if "ephemeral Prefect API server" not in str(e):
        raise e
    fail(f"Prefect's temporary API server did not start within {os.environ.get(STARTUP_TIMEOUT_ENV)} s "
         f"(a busy machine?); {nothing}. Re-run, raise {STARTUP_TIMEOUT_ENV}, or start "
         "`prefect server start` and set PREFECT_API_URL")


def main() -> None:  # pragma: no cover - console entry point
    app()


@app.command()
def train(
    config: Path = typer.Argument(..., help="Training YAML (see configs/)."),
    retune: bool = typer.Option(False, "--retune", help="Do not train: choose the post-processing of the "
                                "checkpoint this config trained (its `out`) again on its validation images, "
                                "re-score the held-out splits and rewrite the card (weights unchanged)."),
) -> None:
    """Train, evaluate on held-out data, write the checkpoint + card, compare with the old one.

    Re-running the same config after an interruption resumes from the last finished epoch.
    """
    from nucleiflow.flows.train import read_config, retune_model, train_model

    try:
        cfg = read_config(config)  # fail fast, before Prefect starts
        if retune:
            from nucleiflow.flows.train import check_retune

            card_path = Path(cfg.out) / "model.json"
            if not card_path.is_file():
                raise FileNotFoundError(f"{config}: out {cfg.out} holds no checkpoint to re-tune (train it first)")
            check_retune(config, cfg, json.loads(card_path.read_text()))
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    from nucleiflow.flows.api_server import start_temporary_server

    try:
        start_temporary_server()  # as segment's: more time, its own session, dies with us
        (retune_model if retune else train_model)(str(config))
    except RuntimeError as e:
        _no_server(e, "training was not started")


@app.command()
def evaluate(
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Registered checkpoint name or a checkpoint folder."),
    data: Path = typer.Option(..., "--data", help="Data set folder: images/, labels/, splits.csv (with mpp)."),
    split: str = typer.Option("test", "--split", help="Which split of splits.csv to score."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: per_image and mean."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    tile_size: int = typer.Option(512, help="Tile core edge in model pixels."),
    halo: int = typer.Option(DEFAULT_HALO, help="Context pixels around each core."),
    tta: int = typer.Option(1, "--tta", min=1, max=8,
                            help="Test-time augmentation: average the maps of this many flipped/rotated views."),
) -> None:
    """Per-image and mean Dice, IoU, AJI, PQ, DQ, SQ, F1 through the slide segmentation path."""
    from nucleiflow.pipeline.infer.predictor import load_predictor
    from nucleiflow.pipeline.train.evaluation import METRICS, evaluate as run_evaluate

    try:
        predictor = load_predictor(model, device=device, tta=tta)
    except (KeyError, FileNotFoundError, ValueError) as e:  # ValueError: a card that does not validate
        fail(str(e).strip("'\""))
    if not (data / "splits.csv").is_file():
        fail(f"{data}: no splits.csv; expected images/, labels/ and splits.csv with an mpp column")
    progress = None if as_json else (lambda name, row: typer.echo(
        f"{name:<28} " + " ".join(f"{row[k]:.4f}" for k in METRICS), err=False))
    if not as_json:
        typer.echo(f"{'image':<28} " + " ".join(f"{k:>6}" for k in METRICS))
    try:
        res = run_evaluate(predictor, data, split=split, tile_size=tile_size, halo=halo, progress=progress)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    res["model"] = model
    if as_json:
        typer.echo(json.dumps(res))
    else:
        typer.echo(f"{'mean':<28} " + " ".join(f"{res['mean'][k]:.4f}" for k in METRICS))


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print the cards' summaries as JSON.")) -> None:
    """The bundled checkpoints: name, architecture, parameters, training data, held-out metrics."""
    from nucleiflow.models.checkpoint import list_checkpoints

    rows = []
    for card in list_checkpoints():
        m = (card.get("metrics") or {}).get("mean", {})
        rows.append({
            "name": card.get("name"), "arch": card.get("arch"), "mpp": card.get("mpp"),
            "parameters": card.get("parameters"),
            "trained_on": (card.get("data") or {}).get("root"),
            "held_out": (card.get("metrics") or {}).get("split"),
            **{k: m.get(k) for k in ("dice", "aji", "pq", "f1")},
            # Every data set's held-out split (cards of multi-data-set training runs).
            "by_data": {n: r.get("mean", {}) for n, r in ((card.get("metrics") or {}).get("by_data") or {}).items()},
        })
    if as_json:
        typer.echo(json.dumps(rows))
        return
    typer.echo(f"{'name':<12} {'arch':<10} {'params':>9} {'mpp':>5} {'held-out':<10} {'dice':>6} {'aji':>6} {'pq':>6}"
               "  other held-out sets (aji)")
    for r in rows:
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        others = " ".join(f"{n} {f(m.get('aji'))}" for n, m in list(r["by_data"].items())[1:])
        typer.echo(f"{r['name']:<12} {r['arch']:<10} {r['parameters'] or 0:>9} {r['mpp']:>5} "
                   f"{r['held_out'] or '-':<10} {f(r['dice']):>6} {f(r['aji']):>6} {f(r['pq']):>6}  {others or '-'}")


def _short_log_lines() -> None:
    """One flow run in a terminal: no run names in every line, so lines fit 100 columns.
    (Prefect's default prefix is ~50 characters; set before Prefect configures logging.)"""
    fmt = "%(asctime)s %(levelname)-7s %(message)s"
    for key, value in {"FORMAT": fmt, "FLOW_RUN_FMT": fmt, "DATEFMT": "%H:%M:%S",
                       "TASK_RUN_FMT": "%(asctime)s %(levelname)-7s %(task_run_name)s - %(message)s"}.items():
        os.environ.setdefault(f"PREFECT_LOGGING_FORMATTERS_STANDARD_{key}", value)


def _processes(option: str, value: str, most: int) -> int | str:
    """``auto`` or a process count 0..most (exit 2 otherwise)."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) > most:
        fail(f"{option} must be auto or a number of processes 0-{most}, not {value!r}")
    return int(value)


@app.command()
def segment(
    slides: list[str] = typer.Argument(..., help="Slide paths, globs, folders or CSV manifests (path[,mpp][,slide_id])."),
    out: Path = typer.Option(..., "--out", help="Output folder: <out>/<slide_id>/, <out>/nuclei/, batch reports."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Registered checkpoint name or a checkpoint folder."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present), cpu or cuda."),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="Level-0 um/px for slides whose metadata lacks it."),
    tile_size: int = typer.Option(DEFAULT_TILE, "--tile-size", help="Tile core edge in model px (= Zarr chunk)."),
    halo: int = typer.Option(DEFAULT_HALO, "--halo", help="Context px around each core (>= largest nucleus)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Tiles per model batch."),
    readers: str = typer.Option("auto", "--readers", help="Reader processes (0: read in the main process; "
                                "auto: from the usable cores and the device)."),
    workers: str = typer.Option("auto", "--workers", help="Post-processing processes (0: in the main process; "
                                "auto: from the usable cores and the device)."),
    dask_address: Optional[str] = typer.Option(
        None, "--dask-address", help="Run the slides on this Dask scheduler (e.g. tcp://10.0.0.5:8786)."
    ),
    tta: int = typer.Option(1, "--tta", min=1, max=8,
                            help="Test-time augmentation: average the maps of this many flipped/rotated views."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace results of another slide (or a changed scan) under the same id."
    ),
) -> None:
    """Segment slides into OME-Zarr masks and GeoParquet nuclei; one Prefect flow run.

    Exit 0 when every slide is done (or was already done, or is being done by another
    worker), 1 when some failed (the table and <out>/batch-*.json say why), 2 when nothing
    could start (unknown model, output folder not writable, bad slide list).
    """
    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device must be auto, cpu or cuda, not {device!r}")
    readers, workers = _processes("--readers", readers, 32), _processes("--workers", workers, 64)
    _short_log_lines()
    from nucleiflow.flows.segment import check_model, check_output, format_report, run_batch
    from nucleiflow.pipeline.batch.manifest import expand_slides

    try:
        check_model(model)  # card and weights, before Prefect starts
    except (KeyError, FileNotFoundError, ValueError) as e:  # ValueError: a card that does not validate
        fail(str(e).strip("'\""))
    try:
        jobs = expand_slides(slides, mpp=mpp)  # fail fast on an empty glob, a bad manifest, bad ids, --mpp 50
        check_output(out)
    except (ValueError, OSError) as e:
        fail(str(e))
    from nucleiflow.flows.api_server import start_temporary_server

    try:
        with _interruptible():
            start_temporary_server()  # out of the terminal's Ctrl-C, dies with us (flows.api_server)
            report = run_batch(
                slides=slides, out=str(out), model=model, device=device, mpp=mpp, tile_size=tile_size, halo=halo,
                batch_size=batch_size, readers=readers, workers=workers, dask_address=dask_address,
                tta=tta, overwrite=overwrite,
            )
    except KeyboardInterrupt:
        _interrupted(jobs, out, model, SegmentConfig(model=model, tile_size=tile_size, halo=halo, tta=tta))
    except RuntimeError as e:
        _no_server(e, "no slide was started")
    typer.echo("")
    for line in format_report(report):
        typer.echo(line)
    if report.get("report_error"):  # the slides' outputs stand; the record of the batch does not
        fail(report["report_error"], code=3)
    raise typer.Exit(1 if report["failed"] else 0)


INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


@contextmanager
def _interruptible() -> Iterator[None]:
    """The first Ctrl-C raises KeyboardInterrupt as usual: the slide in hand removes its
    partial outputs and releases its claim, the pools stop, Prefect records the run as
    Crashed (a few seconds). A second Ctrl-C meanwhile exits at once, without tracebacks;
    the helper processes end with this one (`pipeline.lifeline`) and a re-run still resumes."""

    def again(signum: int, frame: object) -> None:
        os.write(2, b"\nnucleiflow: interrupted again: stopping now; a re-run resumes\n")
        os._exit(INTERRUPTED)

    def first(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, again)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted(jobs: list, out: Path, model: str, cfg: SegmentConfig) -> NoReturn:
    """Two lines on what an interrupted batch left unfinished, then exit 130."""
    from nucleiflow.flows.segment import unfinished

    left = unfinished(jobs, out, model, cfg)
    named = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
    typer.echo(f"\nnucleiflow: interrupted: {len(left)} of {len(jobs)} slides not finished"
               + (f" ({named}); their finished tiles are kept" if left else ""), err=True)
    typer.echo("nucleiflow: re-run the same command to resume: finished slides are skipped, an "
               "interrupted slide runs only its remaining tiles", err=True)
    # The interpreter's last garbage collection walks every object left (torch, Prefect):
    # 5 s of a loaded 2-core box after the lines above. Nothing there needs finalising.
    gc.freeze()
    raise typer.Exit(INTERRUPTED)


@app.command("export-qupath")
def export_qupath(
    slide_dir: Path = typer.Argument(..., help="A slide's output folder, <out>/<slide_id>."),
    dest: Optional[Path] = typer.Option(None, "--dest", help="GeoJSON path (default <slide_dir>/nuclei.geojson)."),
) -> None:
    """Nuclei as GeoJSON detections for QuPath (File > Import objects), streamed from the table."""
    from nucleiflow.pipeline.outputs.qupath import export_slide

    try:
        path, n = export_slide(slide_dir, dest)
    except FileNotFoundError as e:
        fail(str(e))
    typer.echo(f"{n} detections written to {path}")


@app.command()
def view(
    slide_dir: Path = typer.Argument(..., help="A slide's output folder, <out>/<slide_id>."),
    slide: Optional[Path] = typer.Option(None, "--slide", help="The slide file, when it moved since run.json was written."),
    screenshot: Optional[Path] = typer.Option(
        None, "--screenshot", help="Render the view to this PNG and exit (no display needed; uses Xvfb)."),
    zoom: float = typer.Option(1.0, "--zoom", min=1.0,
                               help="Zoom in this many times from the whole slide, centred on its densest nuclei."),
) -> None:
    r"""The slide's H&E with its nuclei (contours), tissue and nucleus probability in napari.

    Needs the viewer extra (pip install -e '.\[viewer]'). Layers: "H&E", "nucleus
    probability" (hidden), "tissue" (hidden), "nuclei"; all in micrometres.
    """
    # (The backslash above stops rich, which renders --help, from eating "[viewer]" as markup.)
    from nucleiflow.flows.view import ViewError, require_napari, screenshot as render, show, summary
    from nucleiflow.pipeline.outputs.results import open_results
    from nucleiflow.pipeline.slide.reader import SlideError

    try:
        require_napari()  # the missing extra first: it is the one fix that always applies
        with open_results(slide_dir, slide) as results:
            if screenshot is None:
                show(results, zoom)
                return
            info = render(results, screenshot, zoom)
    except (ViewError, SlideError) as e:
        fail(str(e))
    typer.echo(summary(info))
    typer.echo(f"screenshot written to {screenshot}")


def _register_deploy() -> None:
    from nucleiflow.flows.deploy import deploy_command

    app.command("deploy")(deploy_command)


_register_deploy()
