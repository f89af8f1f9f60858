"""compute_dtype auto is bf16 on a CPU with AVX512-BF16 or AMX (and explicit bfloat16 anywhere): training
must run there, not stop with transformers' "Your setup doesn't support bf16/gpu" (which it did until
the trainer was told it trains on the CPU on purpose). Forced on with LORAFLOW_CPU_BF16=1, so it runs
on any CI CPU (emulated bf16 where the CPU has none: slow, so a tiny model and two steps)."""

from __future__ import annotations

import json

import pytest

from loraflow.core.config import load_config
from loraflow.core.paths import Paths
from loraflow.track.tracking import NullTracker
from tests.tiny import alpaca_records

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_auto_bf16_on_a_cpu_trains_and_merges(method, tiny_llama, tmp_path, monkeypatch):
    from loraflow.tasks import runner

    monkeypatch.setenv("LORAFLOW_CPU_BF16", "1")  # what a CPU with AVX512-BF16 or AMX reports
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in alpaca_records(40)), encoding="utf-8")
    cfg = load_config(None, [f"model.base={tiny_llama}", f"data.path={data}", f"method={method}",
                             "train.max_steps=2", "eval.num_samples=2", "data.max_length=64"])
    paths = Paths.at(tmp_path / "project")

    class Params(NullTracker):  # keeps the params, logs nothing else
        def __init__(self) -> None:
            self.params: dict = {}

        def log_params(self, params):
            self.params.update(params)

    tracker = Params()
    for stage in ("prepare", "train", "evaluate", "merge"):
        runner.run_stage(stage, cfg, paths, tracker)

    assert tracker.params["compute_dtype"] == "bfloat16"
    train = json.loads(paths.report("train").read_text())
    assert train["steps"] == 2 and train["train_loss"] is not None
    merge = json.loads(paths.report("merge").read_text())
    assert merge["max_abs_logit_diff"] <= cfg.merge.tolerance
