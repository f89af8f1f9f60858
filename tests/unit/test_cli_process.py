"""The `loraflow` process itself: its early temporary Prefect server and its fast exit.

Both run in a fresh Python process (what the console script is), with real Prefect: the server is
Prefect's own uvicorn app, and a real flow run must land on it, not on a server Prefect starts itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PYTHONPATH": str(ROOT),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}  # as `loraflow` sets them
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_exit_fast_joins_threads_runs_exit_handlers_flushes_and_keeps_the_code(tmp_path):
    proc = _python("""
        import atexit, threading
        from pathlib import Path
        from loraflow.cli import exit_fast

        def work():  # a non-daemon thread still running when the command returns
            Path("thread.txt").write_text(str(sum(range(3_000_000))))

        threading.Thread(target=work).start()
        atexit.register(lambda: Path("atexit.txt").write_text("ran"))
        print("no newline, still buffered", end="")
        exit_fast(3)
        Path("after.txt").write_text("exit_fast returned")
    """, tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "no newline, still buffered"
    assert (tmp_path / "thread.txt").read_text() == str(sum(range(3_000_000)))
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert not (tmp_path / "after.txt").exists()


@pytest.mark.slow  # starts a Prefect server in a fresh process: ~10 s
def test_early_server_serves_the_flow_and_stops_without_importing_prefects_server(tmp_path):
    proc = _python("""
        import json, sys, urllib.request
        from loraflow.flows.local import TemporaryServer, prefect_api
        from loraflow.core.config import Config

        server = TemporaryServer.spawn(Config())  # first, as `loraflow run` does; then the flow's imports
        assert server is not None
        from prefect import flow

        url = server.wait_until_ready()
        assert url == server.api_url, url

        @flow(name="early-server-probe")
        def probe() -> int:
            return 7

        with prefect_api(url):
            from prefect.settings import get_current_settings

            assert get_current_settings().flows.heartbeat_frequency is None  # nobody reads them after us
            state = probe(return_state=True)
        assert state.result() == 7
        run = json.load(urllib.request.urlopen(f"{url}/flow_runs/{state.state_details.flow_run_id}", timeout=10))
        print(server.proc.pid, run["state_type"], [m for m in sys.modules if m.startswith("prefect.server")])
        # no stop here: the exit handler stops it, after Prefect has sent its last logs to it
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pid, state, server_modules = proc.stdout.strip().split(" ", 2)
    assert state == "COMPLETED"  # the probe's run is on our server (Prefect started no server of its own)
    assert server_modules == "[]"  # the CLI's process never imports Prefect's server package
    assert "Starting temporary server on http://127.0.0.1:" in proc.stderr
    assert "Error logging to API" not in proc.stderr  # the server outlived Prefect's last log batch
    with pytest.raises(ProcessLookupError):  # stopped (and reaped) at exit, not orphaned
        os.kill(int(pid), 0)
