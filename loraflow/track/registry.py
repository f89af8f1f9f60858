"""The MLflow model registry: aliases (not the deprecated stages), the promotion gate, rollback."""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from loraflow.core.config import LOWER_IS_BETTER
from loraflow.core.errors import LoraflowError

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "loraflow.champion_history"  # registered-model tag: JSON list of past champion versions
LOCK_SUFFIX = ".gate-lock"  # a registered model of this name is the gate's mutex while it exists
LOCK_STALE_S = 300.0  # a lock older than this was left by a crashed process and is broken
T = TypeVar("T")


def alias_version(cl: Any, name: str, alias: str) -> str | None:
    """The version an alias points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(retry(lambda: cl.get_model_version_by_alias(name, alias)).version)
    except MlflowException:
        return None


def move_alias(cl: Any, name: str, version: str, alias: str) -> str | None:
    """Point ``alias`` at ``version``; returns the version it pointed to before.

    Moves of ``champion`` are recorded in a registered-model tag so ``rollback`` can undo them.
    """
    old = alias_version(cl, name, alias)
    retry(lambda: cl.set_registered_model_alias(name, alias, str(version)))
    if alias == CHAMPION and old is not None and old != str(version):
        history = champion_history(cl, name) + [old]
        retry(lambda: cl.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-50:])))
    return old


def champion_history(cl: Any, name: str) -> list[str]:
    tags = retry(lambda: cl.get_registered_model(name)).tags or {}
    return json.loads(tags.get(HISTORY_TAG, "[]"))


def rollback(cl: Any, name: str) -> tuple[str | None, str]:
    """Move ``champion`` back to the version that held it before; returns (old, new)."""
    history = champion_history(cl, name)
    if not history:
        raise LoraflowError(f"{name}: no earlier champion to roll back to; use --version N to pick one")
    target = history[-1]
    old = alias_version(cl, name, CHAMPION)
    retry(lambda: cl.set_registered_model_alias(name, CHAMPION, target))
    retry(lambda: cl.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1])))
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


def retry(fn: Callable[[], T], attempts: int = 8, delay: float = 0.1) -> T:
    """Call ``fn``; on a transient store error retry with exponential backoff and jitter.

    sqlite stores raise "database is locked" when two pipelines write at once (directly, or
    through a tracking server that sits on sqlite, which answers 5xx). Anything else is raised
    at once. 8 attempts wait up to about 0.1 * (2**8 - 1) = 25 s in all.
    """
    from mlflow.exceptions import MlflowException

    for i in range(attempts):
        try:
            return fn()
        except MlflowException as e:
            text = str(e).lower()
            if not ("locked" in text or "busy" in text) or i == attempts - 1:
                raise
            # Jitter: two writers that collided must not retry in lockstep.
            time.sleep(delay * 2**i * (0.5 + random.random()))
    raise AssertionError("unreachable")


_retry = retry  # the old private name


@contextmanager
def gate_lock(cl: Any, name: str, timeout: float = 120.0) -> Iterator[None]:
    """Hold the promotion gate of ``name``: read champion, compare, move alias, with no other
    pipeline doing the same in between (else both could promote against "no champion").

    The mutex is a registered model ``NAME.gate-lock``: creating one is atomic on every MLflow
    backend (sqlite, a database, a tracking server), so this works wherever the registry lives.
    A lock older than LOCK_STALE_S was left by a crashed process and is broken.
    """
    from mlflow.exceptions import MlflowException

    lock = name + LOCK_SUFFIX
    deadline = time.monotonic() + timeout
    wait = 0.05
    while True:
        try:
            retry(lambda: cl.create_registered_model(lock, description=f"held by the loraflow gate of {name}"))
            break
        except MlflowException as e:
            released = _released_meanwhile(e)  # the holder let go between our insert and MLflow's read-back
            if not released and "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise
            if released and time.monotonic() <= deadline:
                continue  # free now: try again at once
        held = _lock_age(cl, lock)
        if held is not None and held > LOCK_STALE_S:
            print(f"loraflow: breaking a stale gate lock {lock} ({held:.0f} s old)", file=sys.stderr)
            _delete_lock(cl, lock)
            continue
        if time.monotonic() > deadline:
            raise LoraflowError(
                f"registry: the gate of {name} is held by another pipeline for over {timeout:.0f} s; "
                f"if none is running, delete the registered model {lock!r}"
            )
        time.sleep(wait * (0.5 + random.random()))
        wait = min(wait * 2, 1.0)
    try:
        yield
    finally:
        _delete_lock(cl, lock)


def _released_meanwhile(e: Exception) -> bool:
    """MLflow's SQL store answers a name clash by reading the existing model back (to say whether it is a
    prompt); if its holder deleted it in between, create_registered_model says "not found" instead of
    "already exists" (mlflow 3, sqlalchemy_store.create_registered_model). Seen in test_register's race."""
    return getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(e).lower()


def _lock_age(cl: Any, lock: str) -> float | None:
    from mlflow.exceptions import MlflowException

    try:
        created = retry(lambda: cl.get_registered_model(lock)).creation_timestamp
    except MlflowException:
        return None  # released meanwhile
    return time.time() - created / 1000 if created else None


def _delete_lock(cl: Any, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        retry(lambda: cl.delete_registered_model(lock))
    except MlflowException:
        pass  # already gone (broken as stale by another process)
