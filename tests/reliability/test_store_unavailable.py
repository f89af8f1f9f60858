"""The MLflow tracking store is unavailable: before the run (nothing listens at MLFLOW_TRACKING_URI),
and mid-run (the real ``mlflow server`` is killed while training)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.reliability.conftest import (
    alpaca,
    error_line,
    run_cli,
    write_params,
    write_prepared,
    write_raw,
)
from tests.system.servers import free_port


@pytest.mark.parametrize("argv", [("stage", "train"), ("run",)], ids=["stage-train", "run"])
def test_an_unreachable_tracking_server_is_one_line_before_anything_runs(tmp_path, tiny_llama, argv):
    root = tmp_path / "p"
    write_params(root, tiny_llama)
    write_raw(root, [alpaca(i) for i in range(20)])
    if argv[0] == "stage":
        write_prepared(root)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t = time.monotonic()
    proc = run_cli(root, *argv, timeout=120, extra_env={"MLFLOW_TRACKING_URI": uri})
    elapsed = time.monotonic() - t
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = error_line(proc.stderr)
    assert f"MLflow tracking server at {uri} is not reachable" in line, line
    assert "start it or unset MLFLOW_TRACKING_URI" in line
    assert elapsed < 30, f"took {elapsed:.0f} s: MLflow's retries were not bounded"
    # Nothing ran: no adapter, no checkpoint, no report, nothing prepared by `run`.
    assert not (root / "outputs").exists(), sorted(p.name for p in (root / "outputs").rglob("*"))
    assert not (root / "reports" / "train.json").exists()
    if argv[0] == "run":
        assert not (root / "data" / "prepared").exists()


def _server(store: Path, port: int, log: Path):
    import os

    from tests.reliability.conftest import BIN
    from tests.system.servers import start, wait_http

    proc = start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                  "--artifacts-destination", str(store / "art"), "--serve-artifacts",
                  "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], log,
                 env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        wait_http(proc, f"http://127.0.0.1:{port}/health", log, timeout=120)
    except BaseException:
        _kill(proc)
        raise
    return proc


def _kill(proc) -> None:
    import contextlib
    import os
    import signal

    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_a_tracking_server_killed_mid_training_is_one_line_and_the_run_is_ended_on_the_next_start(
        tmp_path, tiny_llama, monkeypatch):
    import subprocess

    from mlflow import MlflowClient
    from tests.reliability.conftest import BIN, env, wait_for

    store = tmp_path / "store"
    store.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _server(store, port, tmp_path / "server1.log")
    root = tmp_path / "p"
    write_params(root, tiny_llama, train={"max_steps": 5000, "logging_steps": 1, "save_steps": 100000})
    write_prepared(root)
    log = tmp_path / "train.log"
    run_env = env(root) | {"MLFLOW_TRACKING_URI": url}
    train = None
    try:
        with open(log, "wb") as fh:
            train = subprocess.Popen([str(BIN / "loraflow"), "stage", "train"], cwd=root, env=run_env, stdout=fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        train_log = root / "reports" / "train_log.csv"
        wait_for(lambda: train_log.exists() and len(train_log.read_text().splitlines()) >= 3, train, 120, log,
                 "two logged training steps")
        _kill(server)  # kill -9 of the tracking server while training logs to it
        t = time.monotonic()
        rc = train.wait(timeout=120)
        waited = time.monotonic() - t
    finally:
        if train is not None:
            _kill(train)
        _kill(server)
    out = log.read_text()
    assert rc == 1, out[-4000:]
    line = error_line(out)
    assert f"MLflow tracking server at {url} stopped answering" in line and "retries with backoff" in line, line
    assert "could not be ended (server unreachable)" in out
    assert 5 < waited < 90, f"{waited:.0f} s: retried with backoff, bounded"  # MLflow retries 3 times: ~14 s
    assert not (root / "outputs" / "adapter").exists()
    assert not (root / "reports" / "train.json").exists()

    # The server comes back on the same store: the run is still RUNNING there (nobody could end it) ...
    server = _server(store, port, tmp_path / "server2.log")
    try:
        cl = MlflowClient(tracking_uri=url)
        runs = cl.search_runs([e.experiment_id for e in cl.search_experiments()])
        assert [r.info.status for r in runs] == ["RUNNING"]
        orphan = runs[0].info.run_id
        # ... until the next loraflow run on this machine starts (tracking.start_run, what `stage train` and
        # `run` call first): it ends the orphan FAILED and opens its own run.
        from loraflow.core.config import load_config
        from loraflow.core.paths import Paths
        from loraflow.track import tracking

        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        cfg = load_config(str(root / "params.yaml"), [])
        nxt = tracking.start_run(Paths.at(root), cfg.register.model_name, "next run")
        tracking.finish(nxt, True)
        old = cl.get_run(orphan)
        assert old.info.status == "FAILED" and "orphan cleanup" in old.data.tags["loraflow.ended_by"]
        assert cl.get_run(nxt.run_id).info.status == "FINISHED"
    finally:
        _kill(server)
