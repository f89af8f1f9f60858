"""`mlflow models serve` on the champion: the registered model answers HTTP requests with text."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

from loraflow.core.config import load_config
from loraflow.core.paths import Paths
from loraflow.track import tracking
from tests.integration.test_register import _stage_outputs
from tests.system.servers import free_port, start, stop, wait_http

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_mlflow_models_serve_answers_invocations_with_generated_text(tmp_path, tiny_llama, monkeypatch):
    import loraflow.tasks.register
    import pandas as pd

    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    paths = Paths.at(tmp_path)
    cfg = load_config(None, [f"model.base={tiny_llama}", "register.model_name=served", "eval.max_new_tokens=6"])
    _stage_outputs(paths, tiny_llama, exact_match=0.5)
    assert loraflow.tasks.register.run(cfg, paths).decision == "promoted"
    uri = tracking.tracking_uri(paths)

    port, log = free_port(), tmp_path / "serve.log"
    # `mlflow models serve` execs `uvicorn` by name: the venv's bin must be on PATH (README says so too).
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = start([str(BIN / "mlflow"), "models", "serve", "-m", "models:/served@champion", "--env-manager", "local",
                  "--host", "127.0.0.1", "-p", str(port), "-w", "1"], log, env=env, cwd=tmp_path)
    try:
        wait_http(proc, f"http://127.0.0.1:{port}/ping", log)
        body = {"dataframe_records": [{"prompt": "What is the opposite of hot?"},
                                      {"prompt": "Is the number even or odd?", "input": "37"}],
                "params": {"max_new_tokens": 3}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        stop(proc)
    assert proc.poll() is not None  # stopped by its process group

    predictions = answer["predictions"]
    assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)
    # The server answers what the model answers in process (greedy: the same text).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model("models:/served@champion")
    local = model.predict(pd.DataFrame(body["dataframe_records"]), params={"max_new_tokens": 3})
    assert predictions == local and any(predictions)
    # params reach the model: 3 new tokens here, not eval.max_new_tokens=6
    longer = model.predict(pd.DataFrame(body["dataframe_records"]))
    assert all(len(s) <= len(t) and t.startswith(s) for s, t in zip(local, longer)) and local != longer


def test_served_qlora_adapter_computes_what_was_evaluated_without_the_cpu_repack(tmp_path, tiny_llama, monkeypatch):
    """register.log=adapter of a QLoRA adapter: the pyfunc loads its base in 4-bit itself (it imports nothing from
    loraflow), so it turns bitsandbytes' CPU repack off itself (docs/traps.md §1). Forced on, as on an AVX512-BF16 CPU:
    after predicting, no layer is repacked, and the answers are the evaluate stage's (its model, greedy_generate)."""
    import bitsandbytes as bnb
    import loraflow.tasks.register
    import pandas as pd

    import mlflow
    from loraflow.core.atomic import write_json
    from loraflow.data.formats import render_prompt
    from loraflow.model import loading
    from loraflow.model.adapters import load_adapter_tokenizer, load_tuned
    from loraflow.model.generation import greedy_generate
    from tests.integration.test_evaluate import make_project, plant_adapter
    from tests.tiny import force_cpu_repack

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg, paths = make_project(tmp_path, tiny_llama)  # method qlora
    plant_adapter(cfg, paths, scale=0.5)
    write_json(paths.adapter / loading.ADAPTER_META, {  # what the train stage records with a QLoRA adapter
        "method": "qlora", "base_model": str(tiny_llama), "quantization": cfg.quantization.model_dump(),
        "compute_dtype": "float32"})
    _stage_outputs(paths, tiny_llama, exact_match=0.5)
    reg_cfg = load_config(None, [f"model.base={tiny_llama}", "method=qlora", "register.log=adapter",
                                 "register.model_name=served4bit", "eval.max_new_tokens=6"])
    assert loraflow.tasks.register.run(reg_cfg, paths).decision == "promoted"

    force_cpu_repack(monkeypatch)  # before any 4-bit layer below is built
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(paths))
    model = mlflow.pyfunc.load_model("models:/served4bit@champion")
    instructions = ["What is the opposite of hot?", "Is 37 even or odd?", "What day comes after Monday?"]
    served = model.predict(pd.DataFrame({"prompt": instructions}))
    layers = [m for m in model.unwrap_python_model().model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14  # 7 linears x 2 layers: the base really is 4-bit
    assert not [m for m in layers if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]

    prompts = [render_prompt({"instruction": i, "input": ""}, "alpaca", {}) for i in instructions]
    evaluated = greedy_generate(load_tuned(cfg, paths), load_adapter_tokenizer(cfg, paths), prompts, 6, 4)
    assert served == evaluated and any(served)
