"""Prefect's temporary API server for one CLI command: out of the terminal's Ctrl-C, and
gone when the command is gone.

Prefect's ephemeral mode starts its server as a plain child process. A terminal's Ctrl-C
(SIGINT to the whole foreground process group) stopped the server first; the interrupted
flow then retried the dead API for 2-3 minutes, with pages of tracebacks, to record its
Crashed state. And a SIGTERMed or SIGKILLed command left the server running (~230 MB,
still listening): Prefect stops it only from ``atexit``.

`start_temporary_server` starts the same server (Prefect's `SubprocessASGIServer`, same
command, same settings) before Prefect would, registered as Prefect's default instance,
as ``prefect.testing.utilities.prefect_test_harness`` does, so every Prefect client of
this process uses it. The difference: it runs in its own session (no Ctrl-C from the
terminal; the command stops it at exit, as Prefect does) and under
`nucleiflow.pipeline.lifeline`, which gives it SIGTERM when this process ends.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, get_current_settings


class _OwnedServer(SubprocessASGIServer):
    """Prefect's subprocess server, started in its own session with a parent-death signal."""

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        # Prefect 3.8's own command and environment (SubprocessASGIServer._run_uvicorn_command).
        uvicorn = [
            sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
            "--port", str(self.port), "--log-level", "error", "--lifespan", "on",
        ]
        env = {
            **os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        wrapper = [sys.executable, "-m", "nucleiflow.pipeline.lifeline", str(os.getpid()), "--"]
        return subprocess.Popen(wrapper + uvicorn, env=env, start_new_session=True)


def start_temporary_server() -> str | None:
    """Start the temporary API server Prefect would start, unless PREFECT_API_URL names a
    server. Call it from the main thread (the parent-death signal follows the thread that
    starts the process). Returns its API URL, or None when none was started. Raises
    Prefect's RuntimeError ("Timed out while attempting to connect to ephemeral Prefect
    API server") when it does not start in PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS."""
    if PREFECT_API_URL.value():
        return None
    server = _OwnedServer()  # the default (port None) instance: Prefect's clients find it
    server.start()  # no-op when already running; registers Prefect's atexit stop
    return server.api_url
