"""Prefect in production: a real Prefect server, a real MLflow tracking server, two process workers.

The cpu worker runs in a project folder (params.yaml, data); the gpu worker runs in an empty
folder with its own PREFECT_HOME: nothing is shared on disk, stages hand over through MLflow.
Servers and workers are started in their own sessions and stopped by process group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.tiny import alpaca_records

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODEL_NAME = "sys-pipe"

RECORDS = alpaca_records(60)


def _overrides(tiny_llama: Path, **extra: Any) -> list[str]:
    base = {
        "model.base": str(tiny_llama), "data.path": "data/raw/tiny.jsonl", "data.max_length": 64,
        "train.max_steps": 12, "train.batch_size": 8, "train.learning_rate": 0.005, "train.save_steps": 100,
        "train.logging_steps": 4, "eval.num_samples": 4, "eval.max_new_tokens": 4, "register.model_name": MODEL_NAME,
        "register.gate_metric": "loss", "orchestration.retry_delay_s": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, deadline_s: float) -> None:
    import httpx

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not up after {deadline_s} s:\n{log.read_text()[-3000:]}")


class Procs:
    """Child processes in their own sessions, stopped by process group (never by name)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        fh = open(log, "w")
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        fh.close()
        self.procs.append(proc)
        return proc, log

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_models):
    """Prefect server + MLflow server + pools + deployments + a cpu and a gpu worker in different folders."""
    tmp = tmp_path_factory.mktemp("prefect-stack")
    logs = tmp / "logs"
    logs.mkdir()
    procs = Procs(logs)
    prefect_port, mlflow_port = _free_port(), _free_port()
    api = f"http://127.0.0.1:{prefect_port}/api"
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    quiet = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false",
             "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
             "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
             "PREFECT_LOGGING_LEVEL": "INFO", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))} | quiet
    try:
        server_home = tmp / "server-home"
        server, server_log = procs.start(
            "prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            tmp, base_env | {"PREFECT_HOME": str(server_home)})
        store = tmp / "mlflow-server"
        store.mkdir()
        mlflow, mlflow_log = procs.start(
            "mlflow-server", [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
                              "--artifacts-destination", str(store / "artifacts"), "--serve-artifacts",
                              "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
            store, base_env)
        _wait_http(f"{api}/health", server, server_log, 180)  # MLflow comes up meanwhile; waited for below

        # The CPU box: a project folder (params.yaml, prefect.yaml, data) but no code: workers import the package.
        cpu_dir = tmp / "cpu-project"
        (cpu_dir / "data" / "raw").mkdir(parents=True)
        shutil.copy(ROOT / "params.yaml", cpu_dir / "params.yaml")
        shutil.copy(ROOT / "prefect.yaml", cpu_dir / "prefect.yaml")
        (cpu_dir / "data" / "raw" / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
        # The GPU box: an empty folder.
        gpu_dir = tmp / "gpu-box"
        gpu_dir.mkdir()

        # The workers run a snapshot of the code, as an installed package would be: the cache keys
        # include the code digest, and this checkout may be edited while the test runs.
        code = tmp / "code"
        for package in ("loraflow", "tasks", "flows"):
            shutil.copytree(ROOT / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
        client_env = base_env | {"PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow_uri, "PYTHONPATH": str(code)}
        deploy = subprocess.run([sys.executable, "-m", "loraflow.cli", "deploy"], cwd=cpu_dir, env=client_env
                                | {"PREFECT_HOME": str(cpu_dir / ".prefect")}, capture_output=True, text=True,
                                timeout=300)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        assert "work pool cpu: created" in deploy.stdout and "work pool gpu: created" in deploy.stdout

        worker_env = client_env | {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
        procs.start("worker-cpu", [str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--type", "process"],
                    cpu_dir, worker_env | {"PREFECT_HOME": str(cpu_dir / ".prefect")})
        procs.start("worker-gpu", [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--type", "process"],
                    gpu_dir, worker_env | {"PREFECT_HOME": str(gpu_dir / ".prefect"),
                                           "LORAFLOW_WORK_DIR": str(gpu_dir / "work")})
        _wait_http(f"{mlflow_uri}/health", mlflow, mlflow_log, 180)
        yield {"api": api, "mlflow": mlflow_uri, "cpu_dir": cpu_dir, "gpu_dir": gpu_dir, "logs": logs,
               "tiny_llama": tiny_models["llama"], "runs": {}}
    finally:
        # Deliver this process's pending Prefect events while the server is up: a later
        # prefect_test_harness drains every events worker without a timeout, and one still
        # aimed at a stopped server would hang it.
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        EventsWorker.drain_all(timeout=30)
        APILogWorker.drain_all(timeout=30)
        procs.stop()


def _client(stack):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class Ctx:
        def __enter__(self):
            self.settings = temporary_settings({PREFECT_API_URL: stack["api"]})
            self.settings.__enter__()
            self.client = get_client(sync_client=True)
            return self.client.__enter__()

        def __exit__(self, *exc):
            self.client.__exit__(*exc)
            self.settings.__exit__(*exc)

    return Ctx()


def _run_nightly(stack, overrides: list[str], deadline_s: float = 600):
    """Start finetune/nightly with these overrides and wait for a final state (polling, with a deadline)."""
    with _client(stack) as client:
        dep = client.read_deployment_by_name("finetune/nightly")
        run = client.create_flow_run_from_deployment(dep.id, parameters={"params": "params.yaml", "overrides": overrides})
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            run = client.read_flow_run(run.id)
            if run.state and run.state.is_final():
                break
            time.sleep(2)
        assert run.state and run.state.is_final(), f"finetune/nightly still {run.state} after {deadline_s} s\n" + _logs(stack)
        return run


def _logs(stack) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(stack["logs"].glob("worker-*.log")))


def _task_runs(stack, flow_run_id) -> dict[str, Any]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client(stack) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def _train_runs(stack) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with _client(stack) as client:
        dep = client.read_deployment_by_name("train/gpu")
        return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))


def _mlflow_run(stack, flow_run_id) -> Any:
    from mlflow import MlflowClient

    cl = MlflowClient(stack["mlflow"])
    exp = cl.get_experiment_by_name(MODEL_NAME)
    runs = cl.search_runs([exp.experiment_id], f"tags.prefect_flow_run_id = '{flow_run_id}'")
    assert len(runs) == 1, runs
    return runs[0]


def test_nightly_deployment_trains_on_the_gpu_pool(stack):
    from mlflow import MlflowClient

    with _client(stack) as client:
        nightly = client.read_deployment_by_name("finetune/nightly")
        gpu = client.read_deployment_by_name("train/gpu")
        pools = {name: client.read_work_pool(name).type for name in ("cpu", "gpu")}
    assert pools == {"cpu": "process", "gpu": "process"}
    assert nightly.work_pool_name == "cpu" and gpu.work_pool_name == "gpu"
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.parameters["params"] == "params.yaml"

    run = _run_nightly(stack, _overrides(stack["tiny_llama"]))
    assert run.state.type.value == "COMPLETED", f"{run.state}\n" + _logs(stack)
    assert run.name == "finetune r=16 α=32 qlora"
    stack["runs"]["first"] = run.id

    trains = _train_runs(stack)
    assert len(trains) == 1
    train = trains[0]
    assert train.state.type.value == "COMPLETED" and train.work_pool_name == "gpu"
    assert train.name == "train r=16 α=32 qlora"

    ml = _mlflow_run(stack, run.id)
    assert ml.info.status == "FINISHED"
    assert train.parameters["run_id"] == ml.info.run_id  # the flow passed a run id, not files
    assert ml.data.tags["train_on"] == "train/gpu" and ml.data.tags["train_device"] == "cpu"
    cl = MlflowClient(stack["mlflow"])
    assert {f.path for f in cl.list_artifacts(ml.info.run_id, "prepared")} >= {"prepared/train.jsonl", "prepared/test.jsonl"}
    assert "adapter/adapter_model.safetensors" in {f.path for f in cl.list_artifacts(ml.info.run_id, "adapter")}
    assert float(ml.data.params["lora_scale"]) == 2.0 and "eval_loss" in ml.data.metrics

    # The gpu box trained in its own folder from downloaded data; the cpu box got the adapter back.
    gpu_work = stack["gpu_dir"] / "work" / ml.info.run_id
    assert (gpu_work / "data" / "prepared" / "train.jsonl").read_bytes() == \
        (stack["cpu_dir"] / "data" / "prepared" / "train.jsonl").read_bytes()
    assert (gpu_work / "outputs" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (stack["cpu_dir"] / "outputs" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert not (stack["gpu_dir"] / "data").exists() and not (stack["gpu_dir"] / "params.yaml").exists()
    assert json.loads((stack["cpu_dir"] / "reports" / "train.json").read_text())["steps"] == 12

    # Each stage published a Prefect artifact that links to the MLflow run.
    with _client(stack) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        keys = ["prepare-stats", "train-summary", "evaluate-base-vs-tuned", "register-decision"]
        arts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))}
    assert set(arts) == set(keys)
    for a in arts.values():
        assert ml.info.run_id in a.data and stack["mlflow"] in a.data, a.data
    assert "records kept" in arts["prepare-stats"].data and "| exact_match |" in arts["evaluate-base-vs-tuned"].data
    assert "final train loss" in arts["train-summary"].data
    assert "| version | 1 |" in arts["register-decision"].data
    versions = cl.search_model_versions(f"name='{MODEL_NAME}'")
    assert [v.version for v in versions] == ["1"] and versions[0].run_id == ml.info.run_id


def test_rerun_with_nothing_changed_skips_prepare_and_training(stack):
    first = stack["runs"].get("first")
    if first is None:
        pytest.skip("needs the first nightly run")
    run = _run_nightly(stack, _overrides(stack["tiny_llama"]))
    assert run.state.type.value == "COMPLETED", f"{run.state}\n" + _logs(stack)
    tasks = _task_runs(stack, run.id)
    by_stage = {name.split(" ")[0]: r for name, r in tasks.items()}
    assert by_stage["prepare"].state.name == "Cached"
    assert by_stage["train"].state.name == "Cached"
    assert by_stage["evaluate"].state.name == "Cached"  # same adapter, test split, base and code (issue 8)
    assert by_stage["merge"].state.name == "Cached"
    assert len(_train_runs(stack)) == 1  # no new training on the gpu pool

    ml, old = _mlflow_run(stack, run.id), _mlflow_run(stack, first)
    assert ml.data.tags["train_cached_from"] == old.info.run_id
    assert ml.data.tags["prepare_cached"] == "true"
    assert ml.data.params["lora_r"] == "16"
    from mlflow import MlflowClient

    versions = MlflowClient(stack["mlflow"]).search_model_versions(f"name='{MODEL_NAME}'")
    assert [v.version for v in versions] == ["1"]  # same data, params and code: nothing registered twice


# --------------------------------------------------------------------------------------------- retries, timeouts


def _handed_over_project(stack, tmp_path: Path, monkeypatch, name: str, **extra: Any):
    """A prepared project on "the cpu box" whose data went up to a fresh MLflow run; returns (config, run id)."""
    import loraflow.tasks.prepare

    from loraflow.core.config import load_config
    from loraflow.core.paths import Paths
    from loraflow.track import handoff, tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack["mlflow"])
    project = tmp_path / "cpu"
    (project / "data" / "raw").mkdir(parents=True)
    (project / "data" / "raw" / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    cfg = load_config(None, _overrides(stack["tiny_llama"], **{"register.model_name": name, **extra}))
    paths = Paths.at(project)
    loraflow.tasks.prepare.run(cfg, paths)
    tracker = tracking.start_run(paths, name, name)
    handoff.upload_prepared(paths, tracker.run_id)
    return cfg, tracker.run_id, paths


def _run_train_flow(stack, cfg, run_id: str, root: Path):
    import loraflow.flows.train
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_LOGGING_TO_API_ENABLED,
        temporary_settings,
    )

    # no logs to the API from this process: its log handler would still be flushing after the server stopped
    with temporary_settings({PREFECT_API_URL: stack["api"], PREFECT_LOGGING_TO_API_ENABLED: False}):
        return loraflow.flows.train.train(run_id=run_id, config=cfg.model_dump(mode="json"), root=str(root), return_state=True)


def _train_task_run(stack, state):
    runs = [r for name, r in _task_runs(stack, state.state_details.flow_run_id).items() if name.startswith("train ")]
    assert len(runs) == 1, runs
    return runs[0]


def test_crashed_training_is_retried_and_resumes_from_its_checkpoint(stack, tmp_path, monkeypatch):
    import loraflow.flows.train
    from transformers import TrainerCallback

    from mlflow import MlflowClient

    class CrashOnce(TrainerCallback):
        fired = False

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6 and not self.fired:  # after checkpoint-4 was saved
                self.fired = True
                raise RuntimeError("planted crash: the worker lost its accelerator")

    cfg, run_id, cpu = _handed_over_project(stack, tmp_path, monkeypatch, "sys-retry", **{
        "train.max_steps": 8, "train.save_steps": 4, "orchestration.retries": 1, "orchestration.retry_delay_s": 0})
    crash = CrashOnce()
    loraflow.flows.train.EXTRA_CALLBACKS.append(crash)
    try:
        state = _run_train_flow(stack, cfg, run_id, tmp_path / "gpu")
    finally:
        loraflow.flows.train.EXTRA_CALLBACKS.remove(crash)
    assert crash.fired
    assert state.is_completed(), state
    result = state.result()
    assert result["resumed_from"] == "outputs/checkpoints/checkpoint-4" and result["steps"] == 8
    task_run = _train_task_run(stack, state)
    assert task_run.run_count == 2 and task_run.state.is_completed()
    # it trained on the downloaded copy, in its own folder, and handed the adapter back
    assert (tmp_path / "gpu" / "data" / "prepared" / "train.jsonl").read_bytes() == cpu.split("train").read_bytes()
    cl = MlflowClient(stack["mlflow"])
    assert "adapter/adapter_model.safetensors" in {f.path for f in cl.list_artifacts(run_id, "adapter")}


def test_data_error_is_not_retried_and_timeout_stops_training(stack, tmp_path, monkeypatch):
    from loraflow.track import handoff, tracking

    # A deterministic failure (an empty train split) fails once, without retries.
    cfg, _, cpu = _handed_over_project(stack, tmp_path, monkeypatch, "sys-noretry", **{"orchestration.retries": 2})
    cpu.split("train").write_text("")
    bad_run = tracking.start_run(cpu, "sys-noretry", "empty train split").run_id
    handoff.upload_prepared(cpu, bad_run)
    state = _run_train_flow(stack, cfg, bad_run, tmp_path / "gpu-bad")
    assert state.is_failed() and "the train split is empty" in state.message
    task_run = _train_task_run(stack, state)
    assert task_run.run_count == 1 and task_run.state.is_failed()

    # A training attempt past orchestration.train_timeout_s is stopped: no adapter, no retry.
    cfg2 = cfg.model_copy(update={"orchestration": cfg.orchestration.model_copy(update={"train_timeout_s": 1}),
                                  "train": cfg.train.model_copy(update={"max_steps": 5000})})
    good_run = tracking.start_run(cpu, "sys-noretry", "timeout").run_id
    cpu_ok = tmp_path / "cpu"
    (cpu_ok / "data" / "prepared" / "train.jsonl").unlink()
    import loraflow.tasks.prepare

    loraflow.tasks.prepare.run(cfg, cpu)
    handoff.upload_prepared(cpu, good_run)
    state = _run_train_flow(stack, cfg2, good_run, tmp_path / "gpu-slow")
    assert state.is_failed(), state
    task_run = _train_task_run(stack, state)
    assert "orchestration.train_timeout_s" in state.message
    assert task_run.state.is_failed() and task_run.run_count == 1
    assert not (tmp_path / "gpu-slow" / "outputs" / "adapter").exists()
    import re

    step = int(re.search(r"training stopped at step (\d+)", state.message).group(1))
    assert step < 100  # stopped, not run on to 5000 steps


@pytest.mark.parametrize("api_url, expect", [
    ("", "no Prefect server is set (PREFECT_API_URL is empty)"),
    ("http://127.0.0.1:9/api", "the Prefect server at http://127.0.0.1:9/api is not reachable"),
])
def test_train_deployment_without_a_server_is_one_line(tmp_path, api_url, expect):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PREFECT_API_URL": api_url}
    proc = subprocess.run([sys.executable, "-m", "loraflow.cli", "run", "-s", "orchestration.train_deployment=train/gpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert expect in proc.stderr and "loraflow deploy" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
