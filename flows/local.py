"""``loraflow run``: the finetune flow on this machine, with Prefect's temporary server started early.

The command line calls :func:`run_pipeline`; everything Prefect-specific about running the flow from a
terminal lives here (the temporary server, its API URL for the run, one-line user errors in Prefect's
log), so ``loraflow/cli.py`` stays argument parsing and dispatch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from loraflow.core import private_api
from loraflow.core.config import Config
from loraflow.core.errors import LoraflowError
from loraflow.core.paths import Paths


def run_pipeline(cfg: Config, paths: Paths) -> dict[str, Any]:
    """The whole DAG as one flow run of ``finetune``; returns every stage's result."""
    _hide_user_error_tracebacks()
    server = TemporaryServer.spawn(cfg)
    api_url = None
    try:
        from loraflow.flows.finetune import finetune, require_server

        if server is None:  # a configured server must answer; no server where one is needed: one line
            require_server(cfg.orchestration.train_deployment)
        _warm_tracking_store(paths)
        if server is not None:
            api_url = server.wait_until_ready()  # the flow may only talk to it once it answers /health
    finally:
        if server is not None and api_url is None:
            server.stop()  # an error, or it never answered: the flow starts Prefect's own the usual way
    from loraflow.track.secretref import externalize

    with prefect_api(api_url):
        # Prefect stores the parameters at creation, before the flow runs: secrets go as ${env:...} references
        out = finetune(config=externalize(cfg.model_dump(mode="json")), root=str(paths.root))
    return out


def prefect_api(url: str | None):
    """Point Prefect at our temporary server ``url`` for the flow (a no-op without one).

    Without flow-run heartbeats: they let a server mark the runs of a crashed worker, but this
    server ends with this process, so nobody would read them, and each flow run's end waits up to
    a second for the heartbeat thread's sleep (two flow runs per pipeline)."""
    if url is None:
        return contextlib.nullcontext()
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    return temporary_settings(updates={PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


class TemporaryServer:
    """Prefect's temporary server, started before anything is imported, and stopped at exit.

    Without a configured server the flow's first API call starts one (``SubprocessASGIServer``) and
    waits for it: 8-12 s here (docs/traps.md §6), a subprocess that imports the server and opens its database,
    after this process has already spent seconds importing the server module itself just to start
    it. Spawned first, with the same command, it boots on another core while this process imports
    the flow and opens the MLflow store; the flow then gets its URL as ``PREFECT_API_URL`` for the
    run. This process never imports Prefect's server package (2.4 s of imports that only the
    server needs). It is stopped by an exit handler registered before Prefect is imported, so it
    runs after Prefect's own (which send the last logs and events to it). If it exits or does not
    answer in time it is stopped, and the flow starts one the usual way.
    """

    def __init__(self, proc, port: int) -> None:
        self.proc, self.port = proc, port

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @classmethod
    def spawn(cls, cfg) -> "TemporaryServer | None":
        import atexit
        import importlib.util
        import socket
        import subprocess

        if os.environ.get("PREFECT_API_URL") or cfg.orchestration.train_deployment:
            return None  # a configured server (or a missing one, which require_server reports)
        spec = importlib.util.find_spec("prefect")  # its folder, without importing it (seconds)
        if spec is None or not spec.submodule_search_locations:
            return None
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        argv, env = private_api.prefect_server_command(sys.executable, Path(spec.submodule_search_locations[0]), port)
        proc = subprocess.Popen(argv, env=env)
        server = cls(proc, port)
        atexit.register(server.stop)
        return server

    def wait_until_ready(self) -> str | None:
        """Its API URL once it answers /health; None if it exited or took too long."""
        import time
        import urllib.request

        from prefect.logging import get_logger
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        get_logger().info(f"Starting temporary server on http://127.0.0.1:{self.port}")
        deadline = time.monotonic() + max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), 60)
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as r:
                    if r.status == 200:
                        return self.api_url
            except OSError:
                pass
            time.sleep(0.1)
        return None

    def stop(self) -> None:
        """SIGTERM; SIGINT if it is still up after 1 s; SIGKILL after 2 more.

        On SIGTERM uvicorn shuts down gracefully, waiting for open connections and tasks; one
        bench run's exit took 5 s (Prefect's own stop waits that long before it kills; the cause
        was not reproduced: an open events websocket did not hold it). uvicorn exits at once on a
        SIGINT after that, so a stuck shutdown costs at most 1 s. Its database is sqlite, whose
        transactions survive any of these."""
        import signal
        import subprocess

        steps = ((self.proc.terminate, 1.0), (lambda: self.proc.send_signal(signal.SIGINT), 2.0),
                 (self.proc.kill, None))
        for signal_, wait in steps:
            if self.proc.poll() is not None:
                return
            signal_()
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _warm_tracking_store(paths) -> None:
    """Open the MLflow store (imports, and for a new sqlite store its tables) while the server boots."""
    from loraflow.track import tracking

    try:
        tracking.client(paths).search_experiments(max_results=1)
    except Exception:  # noqa: BLE001 - the flow's first MLflow call reports a real problem with one line
        pass


def _hide_user_error_tracebacks() -> None:
    """Prefect logs a task's exception with its traceback; a user error needs only its one line."""

    class UserErrorFilter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            exc = record.exc_info[1] if record.exc_info else None
            if isinstance(exc, LoraflowError):
                record.exc_info, record.exc_text = None, None
            return True

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(UserErrorFilter())
