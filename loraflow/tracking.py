"""Run tracking: a small interface over MLflow, and a do-nothing tracker for runs that should not log.

Stages receive a ``Tracker``; they never call ``mlflow.*`` globals, so unit tests never touch a
store and two runs in one process cannot log into each other's active run.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Protocol

from loraflow.paths import Paths


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None: ...

    def log_table(self, data: dict[str, list[Any]], artifact_file: str) -> None: ...

    def log_figure(self, figure: Any, artifact_file: str) -> None: ...


class NullTracker:
    """Logs nothing: for unit tests and for stages run without tracking."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None:
        pass

    def log_table(self, data: dict[str, list[Any]], artifact_file: str) -> None:
        pass

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        pass


def tracking_uri(paths: Paths) -> str:
    """``MLFLOW_TRACKING_URI`` wins over the project's local sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlflow_dir / 'mlflow.db'}"


def artifact_root(paths: Paths) -> str:
    return (paths.mlflow_dir / "artifacts").as_uri()


SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|_key$|^key$|credential)", re.I)
URI_PASSWORD = re.compile(r"(://[^/\s:@]+):[^@/\s]+@")


def redact(key: str, value: Any) -> Any:
    """Secrets never reach params, tags or artifacts: keys that look secret lose their value,
    and passwords inside URIs (``postgresql://user:pw@host``) are masked."""
    if SECRET_KEY.search(key):
        return "***"
    if isinstance(value, str):
        return URI_PASSWORD.sub(r"\1:***@", value)
    return value


class MlflowTracker:
    """Logs to one MLflow run, addressed by id through a client (no global active run)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        # Keys already logged to this run: read once, then kept up to date here, so a stage that
        # logs params in several calls costs one get_run, not one per call.
        self._logged: set[str] | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params not yet in the run (MLflow params are immutable: a resumed run skips the old ones)."""
        from mlflow.entities import Param

        if self._logged is None:
            self._logged = set(self.client.get_run(self.run_id).data.params)
        # Redact the string form: a dict or list value (config.data.fields) may hold a URI with a password.
        fresh = [Param(k, redact(k, _param_str(v))) for k, v in params.items() if k not in self._logged]
        for i in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[i : i + 100])
        self._logged.update(p.key for p in fresh)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(redact(k, v))) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None:
        """An MLflow dataset input ("Datasets used" in the UI); ``digest`` is DVC's md5 of the folder."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}))
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    def log_table(self, data: dict[str, list[Any]], artifact_file: str) -> None:
        """A table artifact (columns of equal length) the UI shows in its evaluation view."""
        self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact (shown inline in the run's artifact view)."""
        self.client.log_figure(self.run_id, figure, artifact_file)


def _param_str(v: Any) -> str:
    """MLflow params are strings of at most 6000 characters; lists and dicts as JSON."""
    import json

    s = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return s[:6000]


def client(paths: Paths) -> Any:
    from mlflow import MlflowClient

    uri = tracking_uri(paths)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(cl: Any, name: str, paths: Paths) -> str:
    """The experiment for ``name``, created on first use.

    With a local sqlite store the artifacts go to ``mlflow/artifacts/``; a tracking server
    decides for itself (clients never write to its artifact folder directly).
    """
    exp = cl.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_root(paths) if tracking_uri(paths).startswith("sqlite:") else None
    try:
        return cl.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another pipeline
        exp = cl.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(paths: Paths, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> MlflowTracker:
    """Open a new MLflow run, log the software and device it runs on, and return a tracker bound
    to it (end it with ``finish``)."""
    cl = client(paths)
    run = cl.create_run(experiment_id(cl, experiment, paths), run_name=run_name,
                        tags={k: str(redact(k, v)) for k, v in (tags or {}).items()})
    tracker = MlflowTracker(cl, run.info.run_id)
    tracker.log_params(system_params())
    return tracker


SYSTEM_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "trl", "mlflow", "datasets", "accelerate")


def system_params() -> dict[str, str]:
    """``sys_<package>`` versions, ``sys_python``, ``sys_device``: what a result depends on besides
    data, code and knobs (a loss that moves with a torch upgrade is explained here)."""
    import importlib.metadata as md
    import platform

    params = {"sys_python": platform.python_version(), "sys_platform": f"{platform.system()}-{platform.machine()}"}
    for package in SYSTEM_PACKAGES:
        try:
            params[f"sys_{package}"] = md.version(package)
        except md.PackageNotFoundError:
            params[f"sys_{package}"] = "not installed"
    params["sys_device"] = _device()
    return params


def _device() -> str:
    """``cuda:<name> x<count>`` or ``cpu`` (torch is imported by every stage that trains anyway)."""
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return f"cpu x{os.cpu_count()}"


def resume(paths: Paths, run_id: str) -> MlflowTracker:
    """A tracker for an existing run (a later stage of the same pipeline run)."""
    return MlflowTracker(client(paths), run_id)


def finish(tracker: Tracker, ok: bool) -> None:
    """End the run as FINISHED or FAILED, so no orphan RUNNING run is left behind."""
    if isinstance(tracker, MlflowTracker):
        tracker.client.set_terminated(tracker.run_id, status="FINISHED" if ok else "FAILED")


def loss_figure(train_log: Path) -> Any | None:
    """Train loss (and learning rate) per step from ``reports/train_log.csv`` as a matplotlib
    figure, or None without matplotlib or a log. No pyplot: no GUI backend, no global state."""
    import csv

    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    if not Path(train_log).exists():
        return None
    with Path(train_log).open(encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("loss") and r.get("step")]
    if not rows:
        return None
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], marker=".", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.set_title("train loss")
    fig.tight_layout()
    return fig
