"""Tiles done of one slide, shown where whoever waits can see it.

* On a terminal (stdout is a TTY, e.g. ``nucleiflow segment``): one rich bar per slide with
  tiles done/total, rate and ETA.
* Otherwise (a Prefect worker, a pipe, CI): a plain log line at the first tile and then every
  ``every_s`` seconds, so a big slide is never minutes of silence and a log is not flooded.
* On the Prefect run page: a progress artifact per slide, updated at most every
  ``artifact_every_s`` seconds (each update is an API call) and at the last tile.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn,
                           TimeRemainingColumn)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Tiles per second (rich's own speed column is for bytes)."""

    def render(self, task: Task) -> Text:
        return Text("-- tiles/s" if task.speed is None else f"{task.speed:.2f} tiles/s", style="cyan")


def eta_text(done: int, total: int, since_first: float) -> str:
    """"12/33 tiles, 0.41 tiles/s, ETA 51 s". The rate counts from the first tile on: the
    first one also pays for model warm-up and the reader pool, and would skew the ETA."""
    if done < 2 or since_first <= 0:
        return f"{done}/{total} tiles"
    rate = (done - 1) / since_first
    eta = (total - done) / rate
    eta_s = f"{eta / 60:.1f} min" if eta >= 90 else f"{eta:.0f} s"
    return f"{done}/{total} tiles, {rate:.2f} tiles/s, ETA {eta_s}"


class SlideProgress:
    """A ``progress(done, total)`` callback for `segment_slide`; use as a context manager."""

    def __init__(self, slide_id: str, log: Callable[[str], Any], *, tty: bool | None = None,
                 every_s: float = 30.0, artifact: bool = True, artifact_every_s: float = 5.0) -> None:
        self.slide_id, self.log, self.every_s = slide_id, log, every_s
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.artifact, self.artifact_every_s = artifact, artifact_every_s
        self._bar: Progress | None = None
        self._bar_task: Any = None
        self._artifact_id: Any = None
        self._t0: float | None = None  # the first call (tile count known)
        self._t_first = self._last_line = self._last_artifact = 0.0

    def __enter__(self) -> SlideProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = self._last_line = now
        if done == 1:
            self._t_first = now
        if self.tty:
            self._draw(done, total)
        elif done == 1:
            self._last_line = now
            self.log(f"{self.slide_id}: 1/{total} tiles, the first after {now - self._t0:.0f} s")
        elif now - self._last_line >= self.every_s and done < total:
            self._last_line = now
            self.log(f"{self.slide_id}: {eta_text(done, total, now - self._t_first)}")
        if self.artifact and (done in (0, total) or now - self._last_artifact >= self.artifact_every_s):
            self._last_artifact = now
            self._update_artifact(done, total)

    def _draw(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("tiles"), RateColumn(), TextColumn("ETA"), TimeRemainingColumn())
            self._bar.start()
            self._bar_task = self._bar.add_task(self.slide_id, total=total)
        self._bar.update(self._bar_task, completed=done, total=total)

    def _update_artifact(self, done: int, total: int) -> None:
        """Create the slide's progress artifact, then update it (needs a Prefect run context)."""
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.context import TaskRunContext, FlowRunContext

        if TaskRunContext.get() is None and FlowRunContext.get() is None:
            return  # called outside a run (library use): nowhere to show it
        pct = 100.0 * done / total if total else 100.0
        description = f"{self.slide_id}: {done}/{total} tiles"
        try:
            if self._artifact_id is None:
                self._artifact_id = create_progress_artifact(progress=pct, description=description)
            else:
                update_progress_artifact(self._artifact_id, progress=pct, description=description)
        except Exception as e:  # noqa: BLE001 - a lost progress update must not fail the slide
            self.log(f"{self.slide_id}: progress artifact not updated: {e}")
            self.artifact = False
