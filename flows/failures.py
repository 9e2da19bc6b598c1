"""How a batch with failed slides ends, and why Prefect then says it once, without tracebacks.

A batch whose slides partly failed finished its job (report written, summary drawn) but
must end in a standard ``Failed`` state: every Prefect UI view, filter, alert and
``prefect deployment run --watch`` keys on the state *type*, and custom names such as
"CompletedWithFailures" drop out of the UI's run counts. The state's data is a
`SlidesFailed` exception carrying the report (Prefect resolves a failed state's data into
an exception; any other data type makes the engine crash with "Unexpected result for
failed state").

Prefect's engine re-raises a failed flow's exception at its very end and logs it with a
traceback ("Engine execution exited with unexpected exception"), and logs every failed
task state a second time with ``exc_info=True`` but no exception ("NoneType: None").
Both say nothing the final state message does not; `QuietExpectedFailures` drops exactly
those records from Prefect's run and engine loggers, so each reason is logged once. Real
exceptions (a bug, a crash) keep their tracebacks.
"""
from __future__ import annotations

import logging

MESSAGE_SLIDES = 10  # failed slides named in the state message (all are in the report)
# Prefect's loggers for flow runs, task runs and the engine entry point (`prefect.engine`).
PREFECT_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.engine", "prefect.flow_engine")


class SlidesFailed(Exception):
    """Some slides of a finished batch failed; ``report`` is the batch report."""

    def __init__(self, report: dict) -> None:
        super().__init__(report)  # args=(report,): pickles for Prefect's result store
        self.report = report

    def __str__(self) -> str:
        rows = self.report["slides"]
        bad = [r["slide_id"] for r in rows if r["status"] == "failed"]
        more = f" and {len(bad) - MESSAGE_SLIDES} more" if len(bad) > MESSAGE_SLIDES else ""
        return (f"{len(bad)} of {len(rows)} slides failed: {', '.join(bad[:MESSAGE_SLIDES])}{more} "
                f"(reasons in the logs and {self.report.get('report', 'the batch report')})")


class QuietExpectedFailures(logging.Filter):
    """Drop Prefect's repeats of an outcome already reported once (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc_info = record.exc_info
        if not exc_info:
            return True
        if isinstance(exc_info, tuple) and exc_info[0] is None:
            # exc_info=True outside any exception: Prefect's "Task run failed with state",
            # which its "Finished in state Failed(...)" line repeats; the traceback is empty.
            return False
        exc = exc_info[1] if isinstance(exc_info, tuple) else None
        return not isinstance(exc, SlidesFailed)


_FILTER = QuietExpectedFailures()


def quiet_expected_failures() -> None:
    """Install the filter on Prefect's run loggers (idempotent; per process, so every
    process that imports the flow module, worker subprocesses and Dask workers included)."""
    for name in PREFECT_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
