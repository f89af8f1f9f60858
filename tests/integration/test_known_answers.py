"""Known answers through the real stages: evaluate's exact match and token F1, and the register gate fed by them.

A tiny model cannot be trained to answer in seconds, so the answers are planted where the stage asks for
them: ``greedy_generate`` (the generation evaluate calls) returns each prompt's reference while the adapter
is active and nothing while evaluate has it disabled (its "base"). Everything else is the real stage: the
model, the loss, the metrics, the reports, and for register a real merge and a real sqlite MLflow store.
"""

from __future__ import annotations

import json

import pytest

from loraflow.core.config import Config
from loraflow.core.paths import Paths
from tests.integration.test_evaluate import ROWS, make_project, plant_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLED = 5  # eval.num_samples: the first 5 of the 6 test rows are generated
REFERENCE = {r["prompt"]: r["completion"] for r in ROWS}


def adapter_active(model) -> bool:
    """Whether the LoRA layers compute with the adapter: peft's ``disable_adapter()`` sets each tuner layer's
    ``disable_adapters``, the flag its forward reads."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    flags = {m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)}
    assert len(flags) == 1, flags  # LoRA layers present, all in one state
    return not flags.pop()


def plant_answers(monkeypatch, tuned_answers: bool) -> list[tuple[bool, list[str]]]:
    """Evaluate's generation: the references with the adapter active (when ``tuned_answers``), else ''."""
    import loraflow.tasks.evaluate

    calls: list[tuple[bool, list[str]]] = []

    def generate(model, tokenizer, prompts, max_new_tokens, batch_size, **kwargs):
        active = adapter_active(model)
        calls.append((active, list(prompts)))
        return [REFERENCE[p] if active and tuned_answers else "" for p in prompts]

    monkeypatch.setattr(loraflow.tasks.evaluate, "greedy_generate", generate)
    return calls


def project(root, **sections) -> tuple[Config, Paths]:
    cfg, paths = make_project(root, sections.pop("base"), method="lora",
                              eval={"num_samples": SAMPLED, "max_new_tokens": 6, "batch_size": 4}, **sections)
    return cfg, paths


def test_evaluate_scores_planted_answers_exactly(tmp_path, tiny_llama, monkeypatch):
    import loraflow.tasks.evaluate

    cfg, paths = project(tmp_path, base=tiny_llama)
    plant_adapter(cfg, paths)
    calls = plant_answers(monkeypatch, tuned_answers=True)
    result = loraflow.tasks.evaluate.run(cfg, paths)

    prompts = [r["prompt"] for r in ROWS[:SAMPLED]]
    assert calls == [(False, prompts), (True, prompts)]  # base (adapter disabled) first, then tuned
    report = json.loads(paths.report("evaluate").read_text())
    assert report["num_samples"] == SAMPLED == result.num_samples
    assert (report["tuned"]["exact_match"], report["tuned"]["token_f1"]) == (1.0, 1.0)
    assert (report["base"]["exact_match"], report["base"]["token_f1"]) == (0.0, 0.0)
    assert report["tuned"]["loss"] != report["base"]["loss"]  # the loss is the real model's, adapter on and off

    samples = [json.loads(line) for line in paths.samples.read_text().splitlines()]
    assert len(samples) == SAMPLED
    for row, source in zip(samples, ROWS):
        assert (row["id"], row["prompt"], row["reference"]) == (source["id"], source["prompt"], source["completion"])
        assert (row["tuned_output"], row["base_output"]) == (source["completion"], "")


@pytest.mark.slow
def test_register_gates_on_the_evaluated_exact_match(tmp_path, tiny_llama, monkeypatch):
    """evaluate -> merge -> register on a real store, twice: the version whose evaluate report says 1.0 becomes
    champion; the next, whose tuned model answers nothing (0.0), is registered and kept as challenger."""
    import loraflow.tasks.evaluate
    import loraflow.tasks.merge
    import loraflow.tasks.register

    from loraflow.track import registry, tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own sqlite store
    cfg, paths = project(tmp_path, base=tiny_llama, register={"model_name": "known"})
    assert cfg.register.gate_metric == "exact_match"
    plant_adapter(cfg, paths)

    plant_answers(monkeypatch, tuned_answers=True)
    loraflow.tasks.evaluate.run(cfg, paths)
    loraflow.tasks.merge.run(cfg, paths)
    first = loraflow.tasks.register.run(cfg, paths)
    assert (first.version, first.decision, first.new_value, first.champion_value) == ("1", "promoted", 1.0, None)
    assert set(first.aliases) == {"challenger", "champion"}

    # Another run (another seed), whose tuned model answers nothing: a worse exact match, from a real report.
    worse_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 1})})
    plant_answers(monkeypatch, tuned_answers=False)
    loraflow.tasks.evaluate.run(worse_cfg, paths)
    assert json.loads(paths.report("evaluate").read_text())["tuned"]["exact_match"] == 0.0
    loraflow.tasks.merge.run(worse_cfg, paths)
    second = loraflow.tasks.register.run(worse_cfg, paths)
    assert (second.version, second.decision, second.new_value, second.champion_value) == ("2", "kept", 0.0, 1.0)

    cl = tracking.client(paths)
    assert registry.alias_version(cl, "known", "champion") == "1"
    assert registry.alias_version(cl, "known", "challenger") == "2"
    v1, v2 = cl.get_model_version("known", "1"), cl.get_model_version("known", "2")
    assert float(v1.tags["eval_exact_match"]) == 1.0 and v1.tags["gate_decision"] == "promoted"
    assert float(v2.tags["gate_new_value"]) == 0.0 and float(v2.tags["gate_champion_value"]) == 1.0
    assert v2.tags["gate_decision"] == "kept" and v2.tags["gate_champion_version"] == "1"
