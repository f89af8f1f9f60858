"""register against a real MLflow sqlite store: versions, lineage tags, the champion gate, rollback."""

from __future__ import annotations

import json
import shutil

import pytest

from loraflow import registry, tracking
from loraflow.atomic import write_json
from loraflow.config import load_config
from loraflow.paths import Paths

pytestmark = pytest.mark.slow


def _stage_outputs(paths: Paths, model_dir, exact_match: float, digest: str = "d1") -> None:
    """What prepare/evaluate/merge leave behind, with a real (tiny) model as the merged one."""
    if paths.merged.exists():
        shutil.rmtree(paths.merged)
    shutil.copytree(model_dir, paths.merged)
    write_json(paths.report("prepare"), {"format": "alpaca", "dataset_digest": digest})
    write_json(paths.report("evaluate"), {"base": {"exact_match": 0.0, "loss": 3.0},
                                          "tuned": {"exact_match": exact_match, "loss": 1.0}})
    write_json(paths.report("merge"), {"max_abs_logit_diff": 1e-6, "loss": 1.0, "loss_delta": 0.0})


@pytest.fixture
def project(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Paths.at(tmp_path)


def test_register_gate_moves_champion_only_for_a_better_version_and_rollback(project, tiny_llama):
    import tasks.register

    paths = project
    cfg = load_config(None, [f"model.base={tiny_llama}", "register.model_name=demo"])
    _stage_outputs(paths, tiny_llama, exact_match=0.5)
    first = tasks.register.run(cfg, paths)
    assert first.version == "1" and first.decision == "promoted"
    assert set(first.aliases) == {"challenger", "champion"}

    # Same data, params and code again: nothing new is registered.
    again = tasks.register.run(cfg, paths)
    assert again.decision == "already-registered" and again.version == "1"

    # A worse run (different knobs) gets challenger but not champion.
    worse_cfg = load_config(None, [f"model.base={tiny_llama}", "register.model_name=demo", "lora.r=4"])
    _stage_outputs(paths, tiny_llama, exact_match=0.25)
    worse = tasks.register.run(worse_cfg, paths)
    cl = tracking.client(paths)
    assert worse.version == "2" and worse.decision == "kept"
    assert registry.alias_version(cl, "demo", "champion") == "1"
    assert registry.alias_version(cl, "demo", "challenger") == "2"
    mv = cl.get_model_version("demo", "2")
    assert mv.tags["gate_decision"] == "kept"
    assert float(mv.tags["gate_new_value"]) == 0.25 and float(mv.tags["gate_champion_value"]) == 0.5
    assert mv.tags["lora_r"] == "4" and mv.tags["dataset_digest"] == "d1"

    # A better one takes champion; rollback returns it to v1.
    better_cfg = load_config(None, [f"model.base={tiny_llama}", "register.model_name=demo", "lora.r=8"])
    _stage_outputs(paths, tiny_llama, exact_match=0.75)
    better = tasks.register.run(better_cfg, paths)
    assert better.decision == "promoted"
    assert registry.alias_version(cl, "demo", "champion") == "3"
    report = json.loads(paths.report("register").read_text())
    assert report["version"] == "3" and report["champion_value"] == 0.5 and report["new_value"] == 0.75
    old, new = registry.rollback(cl, "demo")
    assert (old, new) == ("3", "1")
    assert registry.alias_version(cl, "demo", "champion") == "1"

    # The champion loads with MLflow's own API and generates text.
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri(paths))
    model = mlflow.pyfunc.load_model("models:/demo@champion")
    out = model.predict(["What is the opposite of hot?"])
    assert isinstance(out[0], str)


def test_gate_directions():
    g = registry.gate("loss", 0.9, 1.0, "1", 0.0)
    assert g.promote
    assert not registry.gate("loss", 1.1, 1.0, "1", 0.0).promote
    assert not registry.gate("exact_match", 0.51, 0.5, "1", 0.05).promote
    assert registry.gate("exact_match", 0.56, 0.5, "1", 0.05).promote
    assert registry.gate("exact_match", 0.0, None, None, 0.0).promote  # no champion yet
