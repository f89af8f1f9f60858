"""register: log the merged model to MLflow, register a version, gate it to champion.

A new version gets the alias ``challenger``; it becomes ``champion`` when it beats the current
champion on ``register.gate_metric`` by ``register.min_delta`` (or when there is none).
Re-running with the same (data, params, code) registers nothing new.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from loraflow import registry, tracking
from loraflow.atomic import write_json
from loraflow.config import Config
from loraflow.errors import ModelError
from loraflow.lineage import lineage_key, lineage_tags, read_report
from loraflow.paths import Paths
from loraflow.tracking import NullTracker, Tracker

ALPACA_INFERENCE_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass
class RegisterResult:
    name: str
    version: str
    aliases: list[str]
    decision: str  # promoted | kept | already-registered
    reason: str
    gate_metric: str
    new_value: float | None
    champion_value: float | None
    previous_champion: str | None
    model_uri: str
    run_id: str | None
    lineage: dict[str, str] = field(default_factory=dict)


def run(cfg: Config, paths: Paths, tracker: Tracker = NullTracker()) -> RegisterResult:
    print("==> register", file=sys.stderr)
    evaluation, merge = read_report(paths, "evaluate"), read_report(paths, "merge")
    if not evaluation or not merge or not (paths.merged / "config.json").exists():
        raise ModelError("register: no evaluated, merged model found; run `loraflow stage merge` first")
    name = cfg.register.model_name
    tags = lineage_tags(cfg, paths)
    key = lineage_key(cfg, tags)
    cl = tracking.client(paths)

    existing = _version_with_key(cl, name, key)
    if existing is not None:
        print(f"    {name} v{existing.version} already holds this data, params and code; nothing registered",
              file=sys.stderr)
        result = _result_for_existing(cl, name, existing, cfg)
        write_json(paths.report("register"), asdict(result))
        return result

    if tracker.run_id is None:
        tracker = tracking.start_run(paths, name, "register")
    model_uri = _log_model(cfg, paths, tracker.run_id)
    version = _register(cl, name, model_uri, tracker.run_id, {**tags, "lineage_key": key})
    registry.move_alias(cl, name, version, registry.CHALLENGER)

    metric = cfg.register.gate_metric
    new_value = evaluation.get("tuned", {}).get(metric)
    champ = registry.alias_version(cl, name, registry.CHAMPION)
    decision = registry.gate(metric, new_value, _gate_value(cl, name, champ, metric), champ, cfg.register.min_delta)
    if decision.promote:
        registry.move_alias(cl, name, version, registry.CHAMPION)
    gate_tags = {
        "gate_decision": "promoted" if decision.promote else "kept",
        "gate_reason": decision.reason,
        "gate_metric": metric,
        "gate_new_value": _fmt(decision.new_value),
        "gate_champion_value": _fmt(decision.champion_value),
        "gate_champion_version": decision.champion_version or "",
        f"eval_{metric}": _fmt(new_value),
    }
    for k, v in gate_tags.items():
        registry._retry(lambda k=k, v=v: cl.set_model_version_tag(name, version, k, v))
    tracker.set_tags({"registered_model": f"{name}/{version}", "gate_decision": gate_tags["gate_decision"]})

    aliases = [registry.CHALLENGER] + ([registry.CHAMPION] if decision.promote else [])
    result = RegisterResult(
        name=name, version=version, aliases=aliases, decision=gate_tags["gate_decision"], reason=decision.reason,
        gate_metric=metric, new_value=decision.new_value, champion_value=decision.champion_value,
        previous_champion=champ, model_uri=f"models:/{name}/{version}", run_id=tracker.run_id, lineage=tags,
    )
    write_json(paths.report("register"), asdict(result))
    print(f"    {name} v{version} -> {', '.join(aliases)} ({decision.reason})", file=sys.stderr)
    return result


def _log_model(cfg: Config, paths: Paths, run_id: str) -> str:
    """Log the merged model with the transformers flavor; returns its runs:/ URI."""
    import importlib.metadata as md

    import mlflow
    from huggingface_hub import ModelCard

    fmt = read_report(paths, "prepare").get("format")
    template = ALPACA_INFERENCE_TEMPLATE if fmt == "alpaca" else None
    example = "What is the opposite of hot?" if template else "Hello"
    # Explicit requirements: inference would import torchvision to guess them (TRAPS.md 7).
    reqs = [f"{p}=={md.version(p)}" for p in ("torch", "transformers", "tokenizers", "safetensors", "accelerate")]
    card = ModelCard(f"---\nlibrary_name: transformers\n---\n# {cfg.register.model_name}\n\n"
                     f"LoRA ({cfg.method}, r={cfg.lora.r}, alpha={cfg.lora.alpha:g}) fine-tune of "
                     f"{cfg.model.base}, merged by loraflow.\n")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # mlflow's local-checkpoint path mode breaks on transformers 5 (pipeline impl is a string),
    # so log the loaded components; the merged model is full precision and already on disk.
    model = AutoModelForCausalLM.from_pretrained(paths.merged, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(paths.merged)
    uri = tracking.tracking_uri(paths)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            input_example=example,
            pip_requirements=reqs,
            prompt_template=template,
            model_config={"max_new_tokens": cfg.eval.max_new_tokens, "do_sample": False},
            model_card=card,
        )
    return info.model_uri


def _register(cl: Any, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    from mlflow.exceptions import MlflowException

    try:
        registry._retry(lambda: cl.create_registered_model(name))
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    mv = registry._retry(lambda: cl.create_model_version(name, model_uri, run_id=run_id, tags=tags))
    return str(mv.version)


def _version_with_key(cl: Any, name: str, key: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        found = cl.search_model_versions(f"name='{name}' and tags.lineage_key='{key}'")
    except MlflowException:
        return None
    return found[0] if found else None


def _gate_value(cl: Any, name: str, version: str | None, metric: str) -> float | None:
    if version is None:
        return None
    mv = cl.get_model_version(name, version)
    value = (mv.tags or {}).get(f"eval_{metric}")
    if value not in (None, "", "None"):
        return float(value)
    if mv.run_id:
        return cl.get_run(mv.run_id).data.metrics.get(f"eval_{metric}")
    return None


def _result_for_existing(cl: Any, name: str, mv: Any, cfg: Config) -> RegisterResult:
    aliases = [a for a in (registry.CHALLENGER, registry.CHAMPION) if registry.alias_version(cl, name, a) == str(mv.version)]
    t = mv.tags or {}
    return RegisterResult(
        name=name, version=str(mv.version), aliases=aliases, decision="already-registered",
        reason=f"v{mv.version} has the same lineage key", gate_metric=cfg.register.gate_metric,
        new_value=_float(t.get("gate_new_value")), champion_value=_float(t.get("gate_champion_value")),
        previous_champion=t.get("gate_champion_version") or None, model_uri=f"models:/{name}/{mv.version}",
        run_id=mv.run_id, lineage={k: v for k, v in t.items() if not k.startswith("gate_")},
    )


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def _float(v: str | None) -> float | None:
    return float(v) if v not in (None, "") else None
