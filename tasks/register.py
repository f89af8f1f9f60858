"""register: log the model to MLflow (merged, or adapter + pinned base), register a version, gate it.

A new version gets the alias ``challenger``; it becomes ``champion`` when it beats the current
champion on ``register.gate_metric`` by ``register.min_delta`` (or when there is none).
Re-running with the same (data, params, code) registers nothing new.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraflow.core.atomic import write_json
from loraflow.core.config import Config
from loraflow.core.errors import ModelError
from loraflow.core.messages import say, stage
from loraflow.core.paths import Paths
from loraflow.core.private_api import mlflow_fluent_uri
from loraflow.core.progress import size_text
from loraflow.data.formats import ALPACA_NO_INPUT, ALPACA_WITH_INPUT
from loraflow.model import loading
from loraflow.model.adapters import require_adapter
from loraflow.track import promotion, registry, tracking
from loraflow.track.lineage import lineage, read_report
from loraflow.track.tracking import NullTracker, Tracker

# The registered model renders requests with the very templates training rendered with.
ALPACA_INFERENCE_TEMPLATE = ALPACA_NO_INPUT.replace("{instruction}", "{prompt}")


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
    tracking_uri: str = ""  # the registry model_uri lives in (a password in it masked)


def run(cfg: Config, paths: Paths, tracker: Tracker = NullTracker(), dataset_digest: str | None = None) -> RegisterResult:
    """Log the merged model (or the adapter), register it unless its lineage is registered, and gate it.

    ``dataset_digest``: the prepared data's digest as prepare returned it (the flow passes it on); None
    takes it from prepare's report (``loraflow stage``, ``dvc repro``)."""
    stage("register")
    evaluation, merge = read_report(paths, "evaluate"), read_report(paths, "merge")
    if not evaluation or not merge or not (paths.merged / "config.json").exists():
        raise ModelError("register: no evaluated, merged model found; run `loraflow stage merge` first")
    if cfg.register.log == "adapter":
        require_adapter(paths)
    name = cfg.register.model_name
    tags, key = lineage(cfg, paths, dataset_digest)
    cl = tracking.client(paths)

    existing = _version_with_key(cl, name, key)
    if existing is not None:
        return _already_registered(cl, name, existing, cfg, paths)

    if tracker.run_id is None:
        tracker = tracking.start_run(paths, name, "register")
    metric = cfg.register.gate_metric
    new_value = evaluation.get("tuned", {}).get(metric)
    # The fluent API (log_model), and the client resolving the models:/ source, use the global URI.
    with mlflow_fluent_uri(tracking.tracking_uri(paths)):
        info, model_tags = _log_model(cfg, paths, tracker.run_id)
        # Creating the version, reading the champion, comparing and moving the aliases happen under one
        # lock. Else two pipelines registering under one name at once both read "no champion" and both
        # promote; and two with the same lineage (two projects on one registry, the same data, params
        # and code) both find no version with the key while they log, and both register it.
        with registry.gate_lock(cl, name):
            existing = _version_with_key(cl, name, key)
            if existing is None:
                # eval_<metric> goes on with the version, so the next gate can compare against it.
                version = _register(cl, name, info, tracker.run_id,
                                    {**tags, **model_tags, "lineage_key": key, f"eval_{metric}": _fmt(new_value)})
                registry.move_alias(cl, name, version, registry.CHALLENGER)
                champ = registry.alias_version(cl, name, registry.CHAMPION)
                decision = registry.gate(metric, new_value, _gate_value(cl, name, champ, metric), champ,
                                         cfg.register.min_delta)
                if decision.promote:
                    promotion.move(cl, name, version, registry.CHAMPION, decision.reason, by=promotion.GATE_ACTOR)
    if existing is not None:
        tracker.set_tags({"registered_model": f"{name}/{existing.version}", "gate_decision": "already-registered"})
        return _already_registered(cl, name, existing, cfg, paths)
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
        registry.retry(lambda k=k, v=v: cl.set_model_version_tag(name, version, k, v))
    tracker.set_tags({"registered_model": f"{name}/{version}", "gate_decision": gate_tags["gate_decision"]})

    aliases = [registry.CHALLENGER] + ([registry.CHAMPION] if decision.promote else [])
    result = RegisterResult(
        name=name, version=version, aliases=aliases, decision=gate_tags["gate_decision"], reason=decision.reason,
        gate_metric=metric, new_value=decision.new_value, champion_value=decision.champion_value,
        previous_champion=champ, model_uri=f"models:/{name}/{version}", run_id=tracker.run_id, lineage=tags,
        tracking_uri=_shown_uri(paths),
    )
    write_json(paths.report("register"), asdict(result))
    say(f"{name} v{version} -> {', '.join(aliases)} ({decision.reason})")
    return result


_MLFLOW_ADVICE = re.compile(r"(?s).*(Add type hints to the `predict` method|An input example was not provided)")


@contextmanager
def _quiet_mlflow_advice() -> Iterator[None]:
    """Leave out MLflow's advice for a model logged without type hints on predict or an input example.

    Both are left out on purpose (the signature is the schema; an example would be validated by
    loading the model a second time), so the advice is noise in every pipeline's log. A filter
    cannot drop it: MLflow emits it under its own ``simplefilter("once", UserWarning)``
    (``filter_user_warnings_once``), which goes before any filter of ours; so it is dropped where
    warnings are shown, and every other warning is shown as before.
    """
    with warnings.catch_warnings():
        show = warnings.showwarning

        def shown_unless_advice(message, category, *args, **kwargs):
            if not (issubclass(category, UserWarning) and _MLFLOW_ADVICE.match(str(message))):
                show(message, category, *args, **kwargs)

        warnings.showwarning = shown_unless_advice
        yield


def _log_model(cfg: Config, paths: Paths, run_id: str) -> tuple[Any, dict[str, str]]:
    """Log the model as a pyfunc (``loraflow/pyfunc_model.py``); returns its ModelInfo and version tags.

    ``register.log: merged`` ships ``outputs/merged`` as an artifact: the folder merge wrote is
    copied as it is, not loaded and serialized again. ``adapter`` ships only the adapter plus a
    pinned reference to the base (a local folder's weights sha256, a hub id's commit), so a 7B
    base is not copied into every version. Both answer the same requests the same way.
    """
    import importlib.metadata as md

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    import mlflow

    with _quiet_mlflow_advice():  # defining its PythonModel class gives the first of MLflow's advice
        from loraflow.track import pyfunc_model

    fmt = read_report(paths, "prepare").get("format") or "completion"
    config: dict[str, Any] = {
        "kind": cfg.register.log,
        "format": fmt,
        "templates": {"with_input": ALPACA_WITH_INPUT, "no_input": ALPACA_NO_INPUT},
        "max_new_tokens": cfg.eval.max_new_tokens,
    }
    packages = ["torch", "transformers", "tokenizers", "safetensors", "accelerate", "pandas", "mlflow"]
    extra_tags: dict[str, str] = {"model_kind": cfg.register.log}
    if cfg.register.log == "adapter":
        require_adapter(paths)
        config["base"] = base_reference(cfg, paths)
        # Empty = where it was registered. Present so a consumer can override it at load time
        # (MLflow only lets load_model(model_config=...) override keys that were logged).
        config["base_location"] = ""
        artifacts = {"adapter": str(paths.adapter)}
        packages += ["peft"] + (["bitsandbytes"] if loading.uses_4bit(cfg, paths) else [])
        extra_tags |= {"base_location": config["base"]["location"], "base_sha256": config["base"].get("sha256", ""),
                       "base_pinned_revision": config["base"].get("revision") or ""}
    else:
        artifacts = {"model": str(paths.merged)}
    # Explicit requirements: inference would import torchvision to guess them (docs/traps.md §7).
    shipped = Path(next(iter(artifacts.values())))
    size = sum(f.stat().st_size for f in shipped.rglob("*") if f.is_file())
    say(f"logging {_rel(paths, shipped)} as it is ({size_text(size)}"
        + (", the base pinned by digest, not copied)" if cfg.register.log == "adapter" else ")"))
    reqs = [f"{p}=={md.version(p)}" for p in packages]
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "input", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", cfg.eval.max_new_tokens)]),
    )
    with mlflow.start_run(run_id=run_id), _quiet_mlflow_advice():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(pyfunc_model.__file__)),  # "models from code": no pickle of our classes
            artifacts=artifacts,
            model_config=config,
            signature=signature,
            # No input_example: MLflow validates one by loading the logged model and predicting
            # (mlflow.models.utils._validate_serving_input), a second load of the model merge just
            # wrote: 0.3 s of a pipeline on the embedded model (8 s in a fresh process, with the
            # imports), minutes and the model's RAM again on a 7B. The signature carries the schema.
            pip_requirements=reqs,
            metadata={"loraflow_kind": cfg.register.log, "base_model": cfg.model.base},
        )
    return info, extra_tags


def base_reference(cfg: Config, paths: Paths) -> dict[str, str]:
    """Where the adapter's base is and which exact weights: a local folder's sha256, a hub commit."""
    where = loading.base_location(cfg, paths)
    if Path(where).exists():
        from loraflow.track.pyfunc_model import weights_sha256

        return {"source": "local", "location": str(Path(where).resolve()), "sha256": weights_sha256(where),
                "revision": ""}
    return {"source": "hub", "location": where, "revision": _hub_commit(where, cfg.model.revision) or "",
            "sha256": ""}


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a hub revision resolves to in the local cache (``fingerprint.hub_commit``, no network);
    else the revision as configured, said so."""
    from loraflow.core.fingerprint import hub_commit

    commit = hub_commit(repo_id, revision)
    if commit is None:
        say(f"warning: {repo_id} is not in the local hub cache; recording revision {revision or 'main'} "
            "unresolved (set model.revision to a commit to pin it)")
        return revision
    return commit


def _register(cl: Any, name: str, info: Any, run_id: str, tags: dict[str, str]) -> str:
    from mlflow.exceptions import MlflowException

    try:
        registry.retry(lambda: cl.create_registered_model(name))
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    # model_id: a tracking server accepts a models:/m-... source only with the LoggedModel's id.
    mv = registry.retry(lambda: cl.create_model_version(name, info.model_uri, run_id=run_id, tags=tags,
                                                        model_id=info.model_id))
    return str(mv.version)


def _already_registered(cl: Any, name: str, mv: Any, cfg: Config, paths: Paths) -> RegisterResult:
    say(f"{name} v{mv.version} already holds this data, params and code; nothing registered")
    result = _result_for_existing(cl, name, mv, cfg, paths)
    write_json(paths.report("register"), asdict(result))
    return result


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


def _shown_uri(paths: Paths) -> str:
    """The tracking URI for reports and logs, with any password in it masked."""
    return tracking.redact("tracking_uri", tracking.tracking_uri(paths))


def _result_for_existing(cl: Any, name: str, mv: Any, cfg: Config, paths: Paths) -> RegisterResult:
    aliases = [a for a in (registry.CHALLENGER, registry.CHAMPION) if registry.alias_version(cl, name, a) == str(mv.version)]
    t = mv.tags or {}
    return RegisterResult(
        name=name, version=str(mv.version), aliases=aliases, decision="already-registered",
        reason=f"v{mv.version} has the same lineage key", gate_metric=cfg.register.gate_metric,
        new_value=_float(t.get("gate_new_value")), champion_value=_float(t.get("gate_champion_value")),
        previous_champion=t.get("gate_champion_version") or None, model_uri=f"models:/{name}/{mv.version}",
        run_id=mv.run_id, lineage={k: v for k, v in t.items() if not k.startswith("gate_")},
        tracking_uri=_shown_uri(paths),
    )


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def _float(v: str | None) -> float | None:
    return float(v) if v not in (None, "") else None


def _rel(paths: Paths, p: Path) -> str:
    try:
        return p.resolve().relative_to(paths.root.resolve()).as_posix()
    except ValueError:
        return str(p)
