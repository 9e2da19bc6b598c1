"""The log filter that keeps Prefect's repeats out, and the per-slide progress display."""
from __future__ import annotations

import logging
import pickle
import sys

from nucleiflow.flows.failures import QuietExpectedFailures, SlidesFailed
from nucleiflow.flows.progress import SlideProgress, eta_text

REPORT = {"slides": [{"slide_id": "a", "status": "done"}, {"slide_id": "bad", "status": "failed"},
                     {"slide_id": "worse", "status": "failed"}], "report": "/out/batch-1.json"}


def record(exc_info) -> logging.LogRecord:
    return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "msg", None, exc_info)


def test_slides_failed_names_the_slides_and_survives_pickling():
    e = SlidesFailed(REPORT)
    assert str(e) == "2 of 3 slides failed: bad, worse (reasons in the logs and /out/batch-1.json)"
    assert pickle.loads(pickle.dumps(e)).report == REPORT  # Prefect's result store pickles it


def test_filter_drops_our_expected_failure_and_empty_tracebacks_only():
    f = QuietExpectedFailures()
    assert f.filter(record(None))
    assert not f.filter(record((None, None, None)))  # exc_info=True outside an exception
    try:
        raise SlidesFailed(REPORT)
    except SlidesFailed:
        assert not f.filter(record(sys.exc_info()))
    try:
        raise ValueError("a real bug")
    except ValueError:
        assert f.filter(record(sys.exc_info()))  # real errors keep their traceback


def test_filter_is_on_prefects_run_loggers_after_importing_the_flow():
    import nucleiflow.flows.segment  # noqa: F401 - installs it

    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.engine"):
        assert any(isinstance(f, QuietExpectedFailures) for f in logging.getLogger(name).filters), name


def test_eta_counts_from_the_first_tile():
    assert eta_text(1, 10, 0.0) == "1/10 tiles"
    assert eta_text(3, 10, 4.0) == "3/10 tiles, 0.50 tiles/s, ETA 14 s"
    assert eta_text(2, 200, 1.0).endswith("ETA 3.3 min")


def test_plain_lines_without_a_terminal_first_tile_then_periodic(monkeypatch):
    lines: list[str] = []
    clock = iter([0.0, 40.0, 41.0, 42.0, 80.0, 81.0])
    monkeypatch.setattr("nucleiflow.flows.progress.time.monotonic", lambda: next(clock))
    with SlideProgress("s1", lines.append, tty=False, every_s=30, artifact=False) as p:
        for done in range(6):
            p(done, 5)
    # tile 1 at 40 s, then quiet until 30 s later (tile 4 at 80 s), nothing at the last tile
    assert lines == ["s1: 1/5 tiles, the first after 40 s", "s1: 4/5 tiles, 0.07 tiles/s, ETA 13 s"]


def test_a_terminal_gets_a_bar_not_lines(capsys):
    lines: list[str] = []
    with SlideProgress("s1", lines.append, tty=True, artifact=False) as p:
        for done in range(4):
            p(done, 3)
        assert p._bar is not None and p._bar.tasks[0].completed == 3 and p._bar.tasks[0].total == 3
    assert lines == [] and p._bar is None
