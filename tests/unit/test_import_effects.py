"""Nothing happens at import (STYLE: no environment set, no folder made, no logging configured), and
the one thing that relied on import order — ``loraflow plan`` giving up at once on a tracking server
that is down — holds whatever was imported first."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _all_modules() -> list[str]:
    """Every module of the installed package, tasks and flows (as loraflow.tasks / loraflow.flows) included."""
    names = []
    for folder, package in ((ROOT / "loraflow", "loraflow"), (ROOT / "tasks", "loraflow.tasks"),
                            (ROOT / "flows", "loraflow.flows")):
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            names.append(".".join([package, *parts]))
    return names


@pytest.mark.slow  # imports torch, transformers, prefect and mlflow in a fresh process: ~15 s
def test_importing_every_module_changes_no_environment_and_writes_nothing(tmp_path):
    modules = _all_modules()
    assert "loraflow.track.tracking" in modules and "loraflow.flows.common" in modules
    script = (
        "import importlib, json, os, sys\n"
        "before = dict(os.environ)\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        "after = dict(os.environ)\n"
        "print(json.dumps({k: after.get(k) for k in set(before) ^ set(after) | "
        "{k for k in before if before[k] != after.get(k)}}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    changed = json.loads(out.stdout.strip().splitlines()[-1])
    # third-party libraries may set their own; none of ours (MLFLOW_*, PREFECT_*, LORAFLOW_*, OMP_*) may
    ours = {k: v for k, v in changed.items() if k.startswith(("MLFLOW_", "PREFECT_", "LORAFLOW_", "OMP_", "TOKENIZERS"))}
    assert ours == {}
    assert list(tmp_path.iterdir()) == []  # no folder or file made in the working directory


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connections are refused


def test_plan_history_lookup_gives_up_at_once_on_a_server_that_is_down(tmp_path, monkeypatch):
    """The planner's look at the last tracked run is advice: a server that is down costs it a second,
    not MLflow's retries (3 retries = 2+4+8 s of backoff with loraflow's bounds, minutes with MLflow's)."""
    from loraflow.core.config import load_config
    from loraflow.core.paths import Paths
    from loraflow.planner.checks import last_tracked_lora
    from loraflow.track import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    tracking.bound_http_retries()  # what any earlier client() of the same process leaves behind
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    started = time.monotonic()
    assert last_tracked_lora(load_config(None, []), Paths.at(tmp_path)) is None
    assert time.monotonic() - started < 5.0
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"  # put back afterwards
