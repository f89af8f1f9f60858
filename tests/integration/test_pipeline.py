"""The whole DAG as one Prefect flow run on a tiny model: QLoRA, then plain LoRA, then a worse run.

Real parts: a temporary Prefect server (prefect_test_harness), a sqlite MLflow store, bitsandbytes
NF4 on the CPU, the CLI in a subprocess for the user-facing path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.core.config import load_config
from loraflow.core.paths import Paths
from loraflow.track import registry, tracking
from tests.tiny import alpaca_records

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

RECORDS = alpaca_records(60)


def _project(tmp_path: Path, tiny_llama: Path) -> tuple[Path, list[str]]:
    data = tmp_path / "data" / "raw" / "tiny.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    overrides = [
        f"model.base={tiny_llama}", "data.path=data/raw/tiny.jsonl", "data.max_length=64",
        "train.max_steps=30", "train.batch_size=8", "train.learning_rate=0.005", "train.save_steps=100",
        "train.logging_steps=5", "eval.num_samples=8", "eval.max_new_tokens=4", "register.model_name=pipe",
        "register.gate_metric=loss",
    ]
    return tmp_path, overrides


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _prefect_log_lines(flow_run_id: str) -> list[str]:
    """Every log line of a flow run (its tasks' too), once Prefect's log handler has sent what it holds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # the batches still queued are sent, and waited for
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return [log.message for log in logs]


def _subflow_run(parent_flow_run_id: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_flow_run_id])))
    assert len(runs) == 1, runs
    return str(runs[0].id)


def test_flow_qlora_then_lora_then_worse_run(tmp_path, tiny_llama, prefect_server, monkeypatch):
    from loraflow.flows.finetune import finetune

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, overrides = _project(tmp_path, tiny_llama)
    paths = Paths.at(root)

    out = finetune(config=load_config(None, overrides), root=str(root))
    train = json.loads(paths.report("train").read_text())
    first_loss = _first_logged_loss(paths)
    assert train["train_loss"] < first_loss, (first_loss, train)
    ev = json.loads(paths.report("evaluate").read_text())
    assert ev["tuned"]["loss"] < ev["base"]["loss"]
    merge = json.loads(paths.report("merge").read_text())
    assert merge["max_abs_logit_diff"] < 1e-3
    assert "quantization_config" not in json.loads((paths.merged / "config.json").read_text())
    assert (paths.adapter / "adapter_model.safetensors").exists()
    assert out["register"]["version"] == "1" and "champion" in out["register"]["aliases"]

    cl = tracking.client(paths)
    run = cl.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert "lints" in run.data.tags  # the planner's lints ran at the start and were logged
    # what the stages print on the terminal is in the Prefect run's log too (loraflow.core.messages, stage_logs)
    flow_run = run.data.tags["prefect_flow_run_id"]
    lines = _prefect_log_lines(flow_run)
    for expected in ("prepare: read 70 records", "==> evaluate", "==> merge", "==> register", "pipe v1 -> challenger"):
        assert any(line.startswith(expected) for line in lines), (expected, lines)
    training = _prefect_log_lines(_subflow_run(flow_run))  # training is the `train` subflow's run
    for expected in ("==> train", "label audit: example", "qlora on "):
        assert any(line.startswith(expected) for line in training), (expected, training)
    p = run.data.params
    assert p["method"] == "qlora" and p["lora_r"] == "16" and float(p["lora_scale"]) == 2.0
    for key in ("base_model", "lora_alpha", "lora_dropout", "lora_target_modules", "quant_type", "double_quant",
                "compute_dtype", "trainable_params", "trainable_pct", "max_length", "learning_rate"):
        assert key in p, key
    m = run.data.metrics
    for key in ("train_loss", "eval_loss", "eval_perplexity", "eval_exact_match", "eval_token_f1",
                "base_eval_loss", "merge_max_abs_logit_diff"):
        assert key in m, key
    assert len(cl.get_metric_history(run.info.run_id, "train_loss")) >= 3

    # prepare's returned digest reaches the version's tag, handed on through the flow
    version = cl.get_model_version("pipe", out["register"]["version"])
    assert version.tags["dataset_digest"] == out["prepare"]["dataset_digest"] == p["dataset_digest"]

    # data/prepared/ rewritten outside the flow (other split params): the cached prepare is not trusted.
    import loraflow.tasks.prepare

    from loraflow.core.fingerprint import dataset_digest

    digest = out["prepare"]["dataset_digest"]
    loraflow.tasks.prepare.run(load_config(None, overrides + ["data.val_fraction=0.3"]), paths)
    assert dataset_digest(paths.prepared) != digest

    # Plain LoRA, a better loss target is not required: the gate decides on loss.
    out2 = finetune(config=load_config(None, overrides + ["method=lora"]), root=str(root))
    assert out2["register"]["version"] == "2"
    assert out2["prepare"]["dataset_digest"] == digest == dataset_digest(paths.prepared)
    assert tracking.client(paths).get_run(out2["mlflow_run_id"]).data.params["dataset_digest"] == digest

    # A worse run (barely trained) does not take champion.
    champion_before = registry.alias_version(cl, "pipe", "champion")
    out3 = finetune(config=load_config(None, overrides + ["train.max_steps=1", "train.learning_rate=1e-6"]),
                    root=str(root))
    assert out3["register"]["decision"] == "kept"
    assert registry.alias_version(cl, "pipe", "champion") == champion_before
    assert registry.alias_version(cl, "pipe", "challenger") == out3["register"]["version"]


def _first_logged_loss(paths: Paths) -> float:
    import csv

    with paths.train_log.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("loss")]
    return float(rows[0]["loss"])


def test_cli_run_bad_data_is_one_line_without_traceback(tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{not json\n')
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "loraflow.cli", "stage", "prepare",
         "-s", f"model.base={tiny_llama}", "-s", f"data.path={bad}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "bad.jsonl:2" in proc.stderr
    assert "Traceback" not in proc.stderr
