"""What the flows share: config from flow parameters, run names, retry rules, MLflow links, artifacts."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from loraflow.tasks import runner

from loraflow.core.config import Config, load_config
from loraflow.core.errors import ConfigError, LoraflowError
from loraflow.core.paths import Paths
from loraflow.track import tracking

DEFAULT_TRAIN_DEPLOYMENT = "train/gpu"
# MLflow error codes that no retry can fix (a transient failure is a timeout, a 5xx, a refused connection).
PERMANENT_MLFLOW_ERRORS = ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
                           "PERMISSION_DENIED", "UNAUTHENTICATED", "BAD_REQUEST", "INVALID_STATE")


def plain(result: Any) -> dict[str, Any]:
    if is_dataclass(result):
        return asdict(result)
    if hasattr(result, "model_dump"):
        return result.model_dump(mode="json")
    return dict(result)


def tracker(root: str, run_id: str | None) -> tracking.Tracker:
    return runner.tracker_for(Paths.at(root), run_id)


def _to_prefect(line: str) -> None:
    """A stage's line to the Prefect run logger of whatever runs now (the flow, or the task it is in)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().info(line)
    except MissingContextError:  # outside any run: the terminal still gets it
        print(line, file=sys.stderr, flush=True)


@contextmanager
def stage_logs() -> Iterator[None]:
    """Stage messages (``loraflow.core.messages``) through the Prefect run logger, the flow run's or the task
    run's while a task runs: into the run's log (the UI) and, by Prefect's console handler, the terminal."""
    from loraflow.core import messages

    if messages.routed():  # an in-process subflow of a flow that already routes them
        yield
        return
    with messages.routed_to(_to_prefect):
        yield


def quiet_worker() -> None:
    """Called as a flow starts (never at import): a worker's logs are files, so no artifact progress
    bars there (the CLI sets the same for its own runs)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def as_config(value: Config | dict[str, Any] | None, params: str | None = None,
              overrides: list[str] | None = None) -> Config:
    """The typed config from a flow's parameters: a Config, its JSON form, or params.yaml + overrides.

    ``${env:NAME}`` values are read from this process's environment (``loraflow.track.secretref``: how
    secrets reach a flow without being stored in its Prefect parameters)."""
    from loraflow.track.secretref import has_reference, resolve

    cfg = _as_config(value, params, overrides)
    dump = cfg.model_dump(mode="json")
    return Config.model_validate(resolve(dump)) if has_reference(dump) else cfg


def _as_config(value: Config | dict[str, Any] | None, params: str | None, overrides: list[str] | None) -> Config:
    if isinstance(value, Config):
        return value
    if isinstance(value, dict):
        try:
            return Config.model_validate(value)
        except Exception as e:  # pydantic's multi-line message, as one line
            raise ConfigError(f"config parameter: {' '.join(str(e).split())[:400]}") from None
    if params and not Path(params).exists():
        raise ConfigError(f"{Path(params).resolve()}: no such params file (the flow's params parameter); "
                          "run the deployment's worker in the project folder or pass an absolute path")
    return load_config(params, list(overrides or []))


label = runner.label  # ``r=16 α=32 qlora``: what a run trains, for flow and task run names


def run_name(prefix: str) -> Any:
    """A ``flow_run_name`` callable: ``<prefix> r=16 α=32 qlora`` read from the run's own parameters."""

    def name() -> str:
        from prefect.runtime import flow_run

        p = flow_run.parameters or {}
        config = p.get("config")
        if isinstance(config, dict):  # the config as JSON (a whole dump): three values, no second validation
            try:
                return f"{prefix} {runner.label_of(config['lora']['r'], config['lora']['alpha'], config['method'])}"
            except (KeyError, TypeError, ValueError):
                return prefix  # a bad config fails in the flow body with its one-line message
        try:
            cfg = as_config(config, p.get("params"), p.get("overrides"))
        except Exception:  # a bad config fails in the flow body with its one-line message
            return prefix
        return f"{prefix} {label(cfg)}"

    return name


def no_retry_on_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only: never a config/data/model error, never a timeout."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as e:  # noqa: BLE001 - the stored exception itself
            exc = e
    if isinstance(exc, (LoraflowError, TimeoutError)):
        return False
    return getattr(exc, "error_code", None) not in PERMANENT_MLFLOW_ERRORS


def backoff(cfg: Config) -> list[float]:
    """Exponential backoff: retry_delay_s, 2x, 4x, ..."""
    o = cfg.orchestration
    return [o.retry_delay_s * 2**i for i in range(o.retries)] or [0]


def retrying(task_obj: Any, cfg: Config) -> Any:
    return task_obj.with_options(retries=cfg.orchestration.retries, retry_delay_seconds=backoff(cfg),
                                 retry_condition_fn=no_retry_on_user_error)


# --------------------------------------------------------------------------------------------- MLflow links


def mlflow_link(paths: Paths, run_id: str | None) -> str:
    """Markdown pointing at the MLflow run: a URL with a tracking server, else the UI command."""
    if not run_id:
        return "no MLflow run"
    uri = tracking.tracking_uri(paths)
    if uri.startswith(("http://", "https://")):
        try:
            exp = tracking.client(paths).get_run(run_id).info.experiment_id
        except Exception:  # noqa: BLE001 - a link is best effort
            return f"[MLflow run {run_id}]({uri.rstrip('/')}/#/runs/{run_id})"
        return f"[MLflow run {run_id}]({uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id})"
    return f"MLflow run `{run_id}` (`mlflow ui --backend-store-uri {uri}`)"


def publish(key: str, markdown: str, description: str) -> None:
    """A Prefect markdown artifact (best effort: never fails a stage)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.logging import get_run_logger

    try:
        create_markdown_artifact(key=key, markdown=markdown, description=description)
    except Exception as e:  # noqa: BLE001
        try:
            get_run_logger().warning(f"could not publish Prefect artifact {key}: {e}")
        except Exception:  # noqa: BLE001
            pass


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- secrets


def redacted_parameters(value: Any, key: str = "") -> Any:
    """Flow parameters with secrets masked (``tracking.redact``): a secret-looking key's value, a
    password in a URI, inside the config dict and inside ``-s KEY=VALUE`` overrides."""
    if isinstance(value, dict):
        return {k: redacted_parameters(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        if key == "overrides":
            return [_redacted_override(o) for o in value]
        return [redacted_parameters(v, key) for v in value]
    return tracking.redact(key.rsplit(".", 1)[-1], value) if isinstance(value, str) else value


def _redacted_override(item: Any) -> Any:
    if not isinstance(item, str) or "=" not in item:
        return item
    import yaml

    key, value = item.split("=", 1)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = value
    if not isinstance(parsed, str):  # a number or flag (eval.max_new_tokens=4) is no secret, as in the config
        return item
    return f"{key}={tracking.redact(key.strip().rsplit('.', 1)[-1], value)}"


def redact_stored_parameters() -> None:
    """Prefect stores a flow run's parameters in its API as given; rewrite them redacted once the
    run starts (they were readable there from creation until now: seconds)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    params = {k: (v.model_dump(mode="json") if hasattr(v, "model_dump") else v)
              for k, v in (flow_run.parameters or {}).items()}
    clean = redacted_parameters(params)
    if clean == params:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, parameters=clean)
    except Exception as e:  # noqa: BLE001 - say so, never stop the run for it
        print(f"loraflow: could not redact this flow run's parameters in Prefect: {type(e).__name__}",
              file=sys.stderr)
