"""The whole pipeline against a real MLflow tracking server over HTTP.

`mlflow server` on a free port (sqlite backend, proxied artifacts); the five stages through the
`loraflow stage NAME` command (what `dvc repro` runs) with MLFLOW_TRACKING_URI=http://...; then the registry, the run, the artifact store and the
secrets are checked on the server's side. Secrets are planted in the environment and the config.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import sys
from pathlib import Path

import pytest

from tests.system.servers import free_port, start, stop, wait_http
from tests.tiny import alpaca_records

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

RECORDS = alpaca_records(40)
SECRETS = {"HF_TOKEN": "hf_plantedTokenA1", "MY_API_KEY": "plantedKeyB2"}
DB_PASSWORD = "plantedPwC3"


@pytest.fixture
def server(tmp_path):
    port = free_port()
    store = tmp_path / "server"
    (store / "db").mkdir(parents=True)
    log = tmp_path / "server.log"
    proc = start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'db' / 'mlflow.db'}",
                  "--artifacts-destination", str(store / "art"), "--serve-artifacts",
                  "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], log,
                 env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        wait_http(proc, f"http://127.0.0.1:{port}/health", log)
        yield f"http://127.0.0.1:{port}", store
    finally:
        stop(proc)


def test_pipeline_over_http_registers_an_adapter_and_logs_everything(server, tmp_path, tiny_llama, monkeypatch):
    url, store = server
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    overrides = [
        f"model.base={tiny_llama}", "data.path=data/tiny.jsonl", "data.max_length=64", "train.max_steps=10",
        "train.batch_size=8", "train.learning_rate=0.005", "train.logging_steps=2", "eval.num_samples=4",
        "eval.max_new_tokens=4", "register.model_name=srv", "register.log=adapter",
        # A config value holding a database URI with a password (a field mapping alpaca ignores).
        f"data.fields.prompt=postgresql://loader:{DB_PASSWORD}@db.internal/corpus",
    ]
    for k, v in {**SECRETS, "MLFLOW_TRACKING_URI": url}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(project)
    from loraflow import cli

    # The stages as dvc.yaml runs them (`loraflow stage NAME`; in this process to save four
    # interpreter starts): train opens the pipeline's run, the later stages resume it by the id in
    # reports/train.json; they share nothing with the store but the server's URL.
    for stage in ("prepare", "train", "evaluate", "merge", "register"):
        assert cli.main(["stage", stage, *sum((["-s", o] for o in overrides), [])]) == 0, stage

    from mlflow import MlflowClient

    cl = MlflowClient(tracking_uri=url, registry_uri=url)
    # Registered, promoted, as an adapter pinned to its base.
    mv = cl.get_model_version_by_alias("srv", "champion")
    assert mv.version == "1" and mv.tags["model_kind"] == "adapter"
    assert len(mv.tags["base_sha256"]) == 64
    assert [m.name for m in cl.search_registered_models()] == ["srv"]  # the gate's lock was released
    # One run for the pipeline, with stage-prefixed metrics, the contract params and system info.
    exp = cl.get_experiment_by_name("srv")
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    runs = cl.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == mv.run_id and runs[0].info.status == "FINISHED"
    run = runs[0]
    p, m = run.data.params, run.data.metrics
    assert p["method"] == "qlora" and p["lora_r"] == "16" and p["base_model"] == str(tiny_llama)
    for key in ("sys_torch", "sys_transformers", "sys_peft", "sys_bitsandbytes", "sys_trl", "sys_mlflow"):
        assert re.match(r"\d+\.\d+", p[key]), (key, p[key])
    assert p["sys_device"].startswith(("cpu", "cuda"))
    for key in ("train_loss", "eval_loss", "eval_exact_match", "base_eval_loss", "merge_max_abs_logit_diff"):
        assert key in m, key
    assert len(cl.get_metric_history(run.info.run_id, "train_loss")) >= 3

    # Artifacts went through the server into its artifact folder; the client wrote nothing locally.
    art = store / "art"
    files = {f.relative_to(art).as_posix() for f in art.rglob("*") if f.is_file()}
    prefix = f"{exp.experiment_id}/{run.info.run_id}/artifacts/"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "eval/samples.json",
                 "plots/train_loss.png", "reports/train.json", "reports/evaluate.json"):
        assert prefix + name in files, (name, sorted(files)[:40])
    assert any(f.endswith("MLmodel") for f in files)
    assert not any(f.endswith("/model.safetensors") for f in files)  # the base is referenced, not copied
    assert not (project / "mlflow" / "artifacts").exists() and not (project / "mlruns").exists()
    assert not (project / "mlflow" / "mlflow.db").exists()

    # The samples table is the evaluate stage's samples.jsonl, row for row.
    table = json.loads((art / prefix / "eval/samples.json").read_text())
    samples = [json.loads(line) for line in (project / "reports" / "samples.jsonl").read_text().splitlines()]
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert len(rows) == len(samples) >= 3  # eval.num_samples=4, capped by the test split
    assert [r["tuned_output"] for r in rows] == [s["tuned_output"] for s in samples]
    assert [r["prompt"] for r in rows] == [s["prompt"] for s in samples]

    # The champion, loaded over HTTP, answers the raw instructions as evaluate answered the rendered prompts.
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/srv@champion")
    requests = [_alpaca_fields(s["prompt"]) for s in samples]
    out = model.predict(pd.DataFrame(requests), params={"max_new_tokens": 4})
    assert out == [s["tuned_output"] for s in samples]

    # No planted secret anywhere in the server's store: the database and every artifact file.
    dump = "\n".join(sqlite3.connect(store / "db" / "mlflow.db").iterdump())
    blobs = [dump] + [(art / f).read_bytes().decode("latin-1") for f in files]
    for secret in (*SECRETS.values(), DB_PASSWORD):
        assert not any(secret in b for b in blobs), secret


def _alpaca_fields(prompt: str) -> dict[str, str]:
    """Undo the alpaca template: the request a consumer would send for this test prompt."""
    m = re.fullmatch(r"### Instruction:\n(.*?)\n\n(?:### Input:\n(.*?)\n\n)?### Response:\n", prompt, re.S)
    assert m, prompt
    return {"prompt": m.group(1), "input": m.group(2) or ""}
