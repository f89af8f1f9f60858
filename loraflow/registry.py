"""The MLflow model registry: aliases (not the deprecated stages), the promotion gate, rollback."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from loraflow.config import LOWER_IS_BETTER
from loraflow.errors import LoraflowError

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "loraflow.champion_history"  # registered-model tag: JSON list of past champion versions


def client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_version(cl: Any, name: str, alias: str) -> str | None:
    """The version an alias points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(cl.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def move_alias(cl: Any, name: str, version: str, alias: str) -> str | None:
    """Point ``alias`` at ``version``; returns the version it pointed to before.

    Moves of ``champion`` are recorded in a registered-model tag so ``rollback`` can undo them.
    """
    old = alias_version(cl, name, alias)
    _retry(lambda: cl.set_registered_model_alias(name, alias, str(version)))
    if alias == CHAMPION and old is not None and old != str(version):
        history = champion_history(cl, name) + [old]
        _retry(lambda: cl.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-50:])))
    return old


def champion_history(cl: Any, name: str) -> list[str]:
    tags = cl.get_registered_model(name).tags or {}
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def rollback(cl: Any, name: str) -> tuple[str | None, str]:
    """Move ``champion`` back to the version that held it before; returns (old, new)."""
    history = champion_history(cl, name)
    if not history:
        raise LoraflowError(f"{name}: no earlier champion to roll back to; use --version N to pick one")
    target = history[-1]
    old = alias_version(cl, name, CHAMPION)
    _retry(lambda: cl.set_registered_model_alias(name, CHAMPION, target))
    _retry(lambda: cl.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1])))
    return old, target


@dataclass
class GateDecision:
    promote: bool
    metric: str
    new_value: float | None
    champion_value: float | None
    champion_version: str | None
    reason: str


def gate(metric: str, new_value: float | None, champion_value: float | None, champion_version: str | None,
         min_delta: float) -> GateDecision:
    """Promote when there is no champion, or the new value beats it by ``min_delta``."""
    if champion_version is None:
        return GateDecision(True, metric, new_value, None, None, "no champion yet")
    if new_value is None:
        return GateDecision(False, metric, None, champion_value, champion_version, f"new version has no {metric}")
    if champion_value is None:
        return GateDecision(True, metric, new_value, None, champion_version, f"champion has no {metric}")
    lower = metric in LOWER_IS_BETTER
    gain = (champion_value - new_value) if lower else (new_value - champion_value)
    better = gain > 0 and gain >= min_delta
    word = "beats" if better else "does not beat"
    reason = (f"{metric} {new_value:.4g} {word} champion v{champion_version}'s {champion_value:.4g} "
              f"(min_delta {min_delta:g}, {'lower' if lower else 'higher'} is better)")
    return GateDecision(better, metric, new_value, champion_value, champion_version, reason)


def _retry(fn, attempts: int = 5, delay: float = 0.2):
    """sqlite stores raise 'database is locked' under concurrent writers: retry with backoff."""
    from mlflow.exceptions import MlflowException

    for i in range(attempts):
        try:
            return fn()
        except MlflowException as e:
            if "locked" not in str(e).lower() or i == attempts - 1:
                raise
            time.sleep(delay * 2**i)
