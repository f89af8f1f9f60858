"""Promotion with an owner: who moved which alias of a registered model, when and why.

A move is written twice, where MLflow's UI shows both: as tags on the version that got the alias
(``<alias>.promoted_by`` / ``_at`` / ``_reason``, and ``<alias>.gate_overridden`` when it had lost the
gate), and as one tag per move on the registered model (``loraflow.audit.<UTC time>``, a JSON record),
which is the audit trail ``loraflow models`` prints. The actor is ``LORAFLOW_ACTOR`` (a CI job, a
service account) or the OS user.

A version the gate kept out (``gate_decision: kept``) becomes champion only when asked twice: ``--force``
and a ``--reason``, both recorded. Other aliases (``production``, ``staging``...) are a team's own
names: any version may take them, with the move recorded the same way.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from loraflow.core.errors import LoraflowError
from loraflow.track import registry

ACTOR_ENV = "LORAFLOW_ACTOR"
GATE_ACTOR = "loraflow register"  # the gate's own moves of champion
AUDIT_PREFIX = "loraflow.audit."  # registered-model tags: one per alias move
FAILED_GATE = "kept"  # the gate_decision register writes on a version that did not beat the champion


@dataclass(frozen=True)
class Move:
    """One alias move, as recorded."""

    alias: str
    version: str
    previous: str | None
    actor: str
    at: str  # UTC, ISO 8601
    reason: str
    forced: bool = False  # over a failed gate
    rollback: bool = False


def actor() -> str:
    """Who is moving the alias: ``LORAFLOW_ACTOR``, else the OS user."""
    name = os.environ.get(ACTOR_ENV, "").strip()
    if name:
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container running as an arbitrary uid)
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


def check_allowed(name: str, version: str, tags: dict[str, str], alias: str, force: bool, reason: str) -> bool:
    """Refuse moving ``champion`` to a version that lost the gate unless forced with a reason; returns
    whether this move overrides the gate."""
    if force and not reason.strip():
        raise LoraflowError("promote: --force needs --reason 'why' (it is recorded with your name on the version)")
    lost = tags.get("gate_decision") == FAILED_GATE
    if alias != registry.CHAMPION or not lost:
        return False
    if not force:
        why = tags.get("gate_reason") or "it did not beat the champion"
        raise LoraflowError(f"promote: {name} v{version} failed the gate ({why}); to make it champion anyway, "
                            f"pass --force --reason 'why'")
    return True


def move(cl: Any, name: str, version: str, alias: str, reason: str = "", *, by: str | None = None,
         forced: bool = False) -> str | None:
    """Point ``alias`` at ``version`` (``registry.move_alias``) and record the move; returns the version it left.
    ``by``: the actor (default ``actor()``)."""
    old = registry.move_alias(cl, name, str(version), alias)
    record(cl, name, Move(alias, str(version), old, by or actor(), now(), reason, forced=forced))
    return old


def rollback(cl: Any, name: str, reason: str = "") -> tuple[str | None, str]:
    """Move ``champion`` back (``registry.rollback``) and record it; returns (old, new)."""
    old, new = registry.rollback(cl, name)
    record(cl, name, Move(registry.CHAMPION, new, old, actor(), now(), reason, rollback=True))
    return old, new


def record(cl: Any, name: str, move: Move) -> None:
    """Write ``move`` onto the version and into the registered model's audit trail."""
    version_tags = {f"{move.alias}.promoted_by": move.actor, f"{move.alias}.promoted_at": move.at}
    if move.reason:
        version_tags[f"{move.alias}.promotion_reason"] = move.reason
    if move.forced:
        version_tags[f"{move.alias}.gate_overridden"] = "true"
    for k, v in version_tags.items():
        registry.retry(lambda k=k, v=v: cl.set_model_version_tag(name, move.version, k, v))
    key = AUDIT_PREFIX + move.at.replace(":", "-").replace("+00-00", "Z")
    registry.retry(lambda: cl.set_registered_model_tag(name, key, json.dumps(asdict(move), sort_keys=True)))


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def audit_trail(tags: dict[str, str]) -> list[dict[str, Any]]:
    """The recorded moves in a registered model's tags, oldest first."""
    moves = []
    for key, value in tags.items():
        if key.startswith(AUDIT_PREFIX):
            try:
                moves.append(json.loads(value))
            except ValueError:  # someone edited the tag by hand: show it rather than fail
                moves.append({"at": key.removeprefix(AUDIT_PREFIX), "raw": value})
    return sorted(moves, key=lambda m: str(m.get("at", "")))
