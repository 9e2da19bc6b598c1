"""The `nightly` deployment of the `segment-slides` flow on a Prefect process work pool.

The deployment names the flow by its installed module path,
``nucleiflow.flows.segment.segment_slides``, not by a file in a checkout: a process worker
imports it from whatever nucleiflow its Python has installed (editable or from a wheel).
Nothing machine-specific goes into the deployment (no source folder, no pull step), so
workers on several GPU machines can serve the same pool. The source folder is not put on
``sys.path`` either, so the flow module is the one the rest of the package imports.

    nucleiflow deploy --pool nucleiflow            # or: python -m nucleiflow.flows.deploy
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from nucleiflow.pipeline.config import DEFAULT_MODEL

FLOW_NAME = "segment-slides"
ENTRYPOINT = "nucleiflow.flows.segment.segment_slides"


def deploy(
    pool: str = "nucleiflow",
    name: str = "nightly",
    *,
    model: str = DEFAULT_MODEL,
    device: str = "auto",
    slides: list[str] | str | None = None,
    out: str | Path | None = None,
    working_dir: str | Path | None = None,
    cron: str | None = None,
    tags: tuple[str, ...] = ("nucleiflow",),
) -> str:
    """Create or update deployment ``segment-slides/<name>`` on work pool ``pool``; returns its id.

    ``model`` and ``device`` (and ``slides``, ``out`` when given) become the deployment's
    default parameters; each run may override them (``--param``). Relative paths in a run's
    parameters resolve against ``working_dir`` on the worker (default: the current folder),
    the folder the flow process starts in. ``cron`` schedules runs, which then need default
    ``slides`` and ``out``. Raises ValueError when the pool does not exist, the model cannot
    be found, or a schedule lacks its defaults; Prefect's errors when the server is down.
    """
    from prefect.deployments.runner import EntrypointType
    from prefect.settings import get_current_settings

    from nucleiflow.flows.segment import check_model, segment_slides

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    if cron and (slides is None or out is None):
        raise ValueError("a scheduled deployment (--cron) needs default --slides and --out")
    try:
        check_model(model)  # a typo fails here, not at 2 am on the worker
    except (KeyError, FileNotFoundError) as e:
        raise ValueError(str(e).strip("'\"")) from None
    if not get_current_settings().api.url:
        # Without it Prefect would deploy into a throw-away ephemeral server.
        raise ValueError("PREFECT_API_URL is not set; start a server (prefect server start) and "
                         "export PREFECT_API_URL=http://HOST:4200/api")
    parameters: dict = {"model": model, "device": device}
    if slides is not None:
        parameters["slides"] = slides
    if out is not None:
        parameters["out"] = str(out)
    deployment_id = segment_slides.deploy(
        name=name,
        work_pool_name=pool,
        build=False,
        push=False,
        entrypoint_type=EntrypointType.MODULE_PATH,
        parameters=parameters,
        # A process worker otherwise starts each run in a temporary folder it deletes
        # afterwards: a relative --param out=... would vanish with it.
        job_variables={"working_dir": str(Path(working_dir or os.getcwd()).resolve())},
        cron=cron,
        tags=list(tags),
        print_next_steps=False,
        ignore_warnings=True,  # "a process pool? try .serve": we want a pool and workers
    )
    return str(deployment_id)


def deploy_command(
    pool: str = typer.Option("nucleiflow", "--pool", help="Process work pool (prefect work-pool create POOL --type process)."),
    name: str = typer.Option("nightly", "--name", help="Deployment name: runs are 'segment-slides/NAME'."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help="Default model: a registered checkpoint name or folder."),
    device: str = typer.Option("auto", "--device", help="Default device: auto, cpu or cuda."),
    slides: Optional[list[str]] = typer.Option(
        None, "--slides", help="Default slides (paths, globs, folders, CSV manifests); repeatable."),
    out: Optional[Path] = typer.Option(None, "--out", help="Default output folder."),
    working_dir: Optional[Path] = typer.Option(
        None, "--working-dir", help="Folder runs start in on the worker (relative paths resolve here); default: here."),
    cron: Optional[str] = typer.Option(None, "--cron", help="Schedule, e.g. '0 20 * * *' (needs --slides and --out)."),
) -> None:
    """Create or update the `segment-slides/NAME` deployment on a process work pool.

    Needs a running Prefect server (PREFECT_API_URL) and an existing pool. Then start a
    worker (prefect worker start --pool POOL --type process --limit 1) and queue batches with
    prefect deployment run 'segment-slides/NAME' --param slides=... --param out=...
    """
    import httpx

    try:
        deployment_id = deploy(pool, name, model=model, device=device, slides=slides,
                               out=out.resolve() if out else None, working_dir=working_dir, cron=cron)
    except (ValueError, httpx.HTTPError) as e:
        typer.echo(f"nucleiflow: error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"deployment '{FLOW_NAME}/{name}' ({deployment_id}) on work pool '{pool}'")
    typer.echo(f"start a worker:  prefect worker start --pool {pool} --type process --limit 1")
    typer.echo(f"queue a batch:   prefect deployment run '{FLOW_NAME}/{name}' --param slides=... --param out=...")


if __name__ == "__main__":  # python -m nucleiflow.flows.deploy
    os.environ.setdefault("DO_NOT_TRACK", "1")
    typer.run(deploy_command)
