"""Secrets reach a flow through its process environment, never through its Prefect parameters.

Prefect stores a flow run's parameters in its API when the run is *created*, before the flow's
code runs, so redacting them once the flow starts leaves a window. Instead, whoever starts a flow
run (``loraflow run``, the pipeline starting its ``train`` subflow or deployment) passes a config
in which every secret-looking value (``tracking.redact``: a secret-looking key such as
``*_token``/``*_key``/``password``, a password in a URI) is the reference
``${env:LORAFLOW_SECRET_<KEY>}`` and sets that variable in its own environment; the flow resolves
references as it builds its config (``loraflow.flows.common.as_config``).

A reference may also be written by hand in any config value (``-s data.path=${env:MY_DATA_URI}``,
a deployment's parameters). A deployment's flow runs on a worker: the variable must be set in that
worker's environment (``LORAFLOW_SECRET_DATA_FIELDS_PROMPT=... prefect worker start --pool gpu``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, MutableMapping
from typing import Any

from loraflow.core.errors import ConfigError

PREFIX = "LORAFLOW_SECRET_"
REFERENCE = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


def _map_strings(value: Any, fn: Callable[[tuple[str, ...], str], str], path: tuple[str, ...] = ()) -> Any:
    """``value`` (JSON form) with each string replaced by ``fn(key path, string)``; list items keep their key's path."""
    if isinstance(value, dict):
        return {k: _map_strings(v, fn, (*path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn, path) for v in value]
    return fn(path, value) if isinstance(value, str) else value


def externalize(config: dict[str, Any], environ: MutableMapping[str, str] = os.environ) -> dict[str, Any]:
    """``config`` (JSON form) with each secret-looking string replaced by a reference; the values go to ``environ``."""
    from loraflow.track.tracking import redact

    def out(path: tuple[str, ...], value: str) -> str:
        if not path or REFERENCE.fullmatch(value) or redact(path[-1], value) == value:
            return value
        name = PREFIX + re.sub(r"[^A-Za-z0-9]", "_", "_".join(path)).upper()
        environ[name] = value
        return "${env:" + name + "}"

    return _map_strings(config, out)


def resolve(config: dict[str, Any], environ: MutableMapping[str, str] = os.environ) -> dict[str, Any]:
    """``config`` with every ``${env:NAME}`` value replaced by ``environ[NAME]``; one line when NAME is unset."""

    def back(path: tuple[str, ...], value: str) -> str:
        if not (m := REFERENCE.fullmatch(value)):
            return value
        if m.group(1) not in environ:
            raise ConfigError(
                f"{'.'.join(path)}: refers to ${{env:{m.group(1)}}}, which is not set in this process's "
                f"environment; set {m.group(1)} where the flow runs (for a deployment: in its worker's "
                "environment)"
            )
        return environ[m.group(1)]

    return _map_strings(config, back)


def has_reference(config: dict[str, Any]) -> bool:
    """Whether any value of ``config`` is a ``${env:NAME}`` reference."""
    if isinstance(config, dict):
        return any(has_reference(v) for v in config.values())
    if isinstance(config, list):
        return any(has_reference(v) for v in config)
    return isinstance(config, str) and REFERENCE.fullmatch(config) is not None
