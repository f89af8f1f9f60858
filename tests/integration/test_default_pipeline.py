"""The shipped defaults, end to end: params.yaml and data/raw/sample.jsonl as they ship, on the embedded base,
stage by stage as dvc repro runs them (`loraflow stage <name>`), with only the step budget cut.

The embedded base answers none of the sample task (exact match 0); 60 steps of the default QLoRA teach it
the format and some answers (0.22 here, in under 20 s of training), so the tuned model must beat the base on the
shipped gate metric, and the first registered version becomes champion.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
STEPS = 60  # the shipped budget is 3 epochs (~320 steps); the gain shows well before


def test_shipped_defaults_beat_the_base_and_register_a_champion(tmp_path, embedded_base, monkeypatch):
    from loraflow import cli
    from loraflow.core.paths import Paths
    from loraflow.track import registry, tracking

    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert shipped["model"]["base"] == "models/base" and shipped["data"]["path"] == "data/raw/sample.jsonl"
    metric, name = shipped["register"]["gate_metric"], shipped["register"]["model_name"]
    root = tmp_path / "project"
    (root / "data" / "raw").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    shutil.copy(ROOT / "data" / "raw" / "sample.jsonl", root / "data" / "raw" / "sample.jsonl")
    shutil.copytree(embedded_base, root / "models" / "base")  # what ensure_base leaves there on first use
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store, mlflow/ in its root
    monkeypatch.chdir(root)  # where dvc repro runs the stages

    for stage in ("prepare", "train", "evaluate", "merge", "register"):
        assert cli.main(["stage", stage, "-c", str(root / "params.yaml"), "-s", f"train.max_steps={STEPS}"]) == 0, stage

    paths = Paths.at(root)
    train = json.loads(paths.report("train").read_text())
    assert train["method"] == shipped["method"] == "qlora" and train["steps"] == STEPS
    evaluation = json.loads(paths.report("evaluate").read_text())
    assert evaluation["num_samples"] == shipped["eval"]["num_samples"]
    higher_is_better = metric not in ("loss", "perplexity")
    tuned, base = evaluation["tuned"][metric], evaluation["base"][metric]
    assert (tuned > base) if higher_is_better else (tuned < base), (metric, tuned, base)
    assert evaluation["tuned"]["loss"] < evaluation["base"]["loss"]

    register = json.loads(paths.report("register").read_text())
    assert register["gate_metric"] == metric and register["new_value"] == tuned
    assert register["decision"] == "promoted" and "champion" in register["aliases"]
    cl = tracking.client(paths)
    assert tracking.tracking_uri(paths).startswith(f"sqlite:///{root}")
    assert registry.alias_version(cl, name, "champion") == register["version"]
