"""Helpers for the reliability tier: real projects on tiny models, the CLI in-process and as a process.

Each test injects a real fault (a killed process, a corrupted file, a hostile folder, an allocation
that cannot succeed) and asserts what the user sees and what is left on disk.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

QA = [
    ("What is the opposite of hot?", "cold"),
    ("What day comes after Monday?", "Tuesday"),
    ("Is 37 even or odd?", "odd"),
    ("What is the capital of France?", "Paris"),
    ("What color is the sky?", "blue"),
    ("How many legs does a dog have?", "four"),
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every reliability test runs torch on one thread (tests/conftest.py ``one_thread``)."""


def alpaca(i: int) -> dict:
    return {"instruction": f"What is {i} plus one?", "input": "", "output": str(i + 1)}


def write_params(root: Path, base: Path, **sections) -> Path:
    """params.yaml for a project at ``root`` on the tiny ``base``; ``sections`` update the defaults."""
    params = {
        "model": {"base": str(base)},
        "data": {"path": "data/raw/x.jsonl", "max_length": 64},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"max_steps": 4, "learning_rate": 1e-2, "batch_size": 4, "warmup_ratio": 0.0,
                  "lr_scheduler": "constant", "logging_steps": 1, "save_steps": 100},
        "eval": {"num_samples": 2, "max_new_tokens": 2, "batch_size": 4},
    }
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values} if isinstance(values, dict) else values
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def write_raw(root: Path, content: bytes | list[dict], rel: str = "data/raw/x.jsonl") -> Path:
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, list):
        content = "".join(json.dumps(r) + "\n" for r in content).encode()
    target.write_bytes(content)
    return target


def write_prepared(root: Path, n_train: int = 24, n_val: int = 0, n_test: int = 0) -> None:
    """Prepared splits of a small, repetitive alpaca-style dataset (what `stage prepare` would write)."""
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        rows = [
            {"id": f"{name}{i}", "prompt": f"### Instruction:\n{QA[i % 6][0]}\n\n### Response:\n",
             "completion": QA[i % 6][1]}
            for i in range(n)
        ]
        (prepared / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def env(root: Path) -> dict[str, str]:
    """The environment of a stage process: this checkout's code, one thread, a private MLflow store, offline."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


@contextlib.contextmanager
def cli_in_process(root: Path):
    """Run ``loraflow.cli.main`` as the console script would, from ``root``; yields a call that returns (rc, stderr)."""
    from loraflow import cli

    old = Path.cwd()
    os.chdir(root)

    def call(*argv: str) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli.main(list(argv))
        return rc, err.getvalue()

    try:
        yield call
    finally:
        os.chdir(old)


def run_cli(root: Path, *argv: str, timeout: float = 300, extra_env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    """``loraflow ARGV`` as a real process in ``root``."""
    return subprocess.run([str(BIN / "loraflow"), *argv], cwd=root, env=env(root) | (extra_env or {}),
                          capture_output=True, text=True, timeout=timeout)


def error_line(stderr: str) -> str:
    """The one error line the CLI printed; fails when there is a traceback or more than one error line."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("loraflow: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def start(argv: list[str], root: Path, log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process in its own session (so a kill reaches only it), output to ``log``."""
    fh = open(log, "wb")
    try:
        return subprocess.Popen(argv, cwd=root, env=env(root) | (extra_env or {}), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        fh.close()


def wait_for(predicate, proc: subprocess.Popen, deadline_s: float, log: Path, what: str) -> None:
    """Poll ``predicate`` until true; fail (killing ``proc``) when the process ends first or the deadline passes."""
    end = time.monotonic() + deadline_s
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > end:
            kill(proc)
            pytest.fail(f"no {what} after {deadline_s:.0f} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)


def kill(proc: subprocess.Popen) -> int:
    """kill -9 the process (its session), and reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=30)


@pytest.fixture(scope="package")
def prefect_api(tmp_path_factory):
    """One real Prefect server (``prefect server start``) for the tier's tests that run `loraflow run` as
    processes: with ``PREFECT_API_URL`` set, no process starts a temporary server of its own (8-12 s each)."""
    from tests.system.servers import free_port, start as start_server, stop, wait_http

    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    log = home / "server.log"
    quiet = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
             "PREFECT_UI_ENABLED": "false"}
    proc = start_server([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], log,
                        env={k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | quiet, cwd=home)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(proc, f"{url}/health", log)
        yield url
    finally:
        stop(proc)
