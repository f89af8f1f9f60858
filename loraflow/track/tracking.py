"""Run tracking: a small interface over MLflow, and a do-nothing tracker for runs that should not log.

Stages receive a ``Tracker``; they never call ``mlflow.*`` globals, so unit tests never touch a
store and two runs in one process cannot log into each other's active run.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Protocol

from loraflow.core.paths import Paths


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


# MLflow's HTTP client retries a refused connection for minutes by default (7 retries, backoff
# factor 2, 120 s timeouts). loraflow bounds them (about 2+4+8 = 14 s of backoff) unless the user set them.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def bound_http_retries() -> None:
    """Set loraflow's retry bounds where the user has not (MLflow reads them at each request).

    Called by ``client()`` and the CLI, never at import: importing a module changes nothing."""
    for key, value in HTTP_RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)


def require_reachable(paths: Paths, timeout: float = 5.0) -> None:
    """A tracking server (``http(s)://`` URI) must answer ``/health``; one line otherwise.

    Checked before anything trains, so an unreachable store fails in seconds, not after a run
    (or after MLflow's own retries). A local sqlite store needs nothing.
    """
    uri = tracking_uri(paths)
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    from loraflow.core.errors import ConfigError

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status == 200:
                return
            why = f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        why = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        why = type(getattr(e, "reason", e)).__name__
    raise ConfigError(f"MLflow tracking server at {redact('uri', uri)} is not reachable ({why}); "
                      "start it or unset MLFLOW_TRACKING_URI")


def artifact_root(paths: Paths) -> str:
    return (paths.mlflow_dir / "artifacts").as_uri()


# "token" only as the last word of a key (HF_TOKEN, access_token): max_new_tokens, tokens_per_second
# and tokenizer are counts and names, not secrets.
SECRET_KEY = re.compile(r"((^|[._-])token$|secret|password|passwd|api[_-]?key|[._-]key$|^key$|credential)", re.I)
URI_PASSWORD = re.compile(r"(://[^/\s:@]+):[^@/\s]+@")


def redact(key: str, value: Any) -> Any:
    """Secrets never reach params, tags or artifacts: keys that look secret lose their value,
    and passwords inside URIs (``postgresql://user:pw@host``) are masked."""
    if SECRET_KEY.search(key):
        return "***"
    if isinstance(value, str):
        return URI_PASSWORD.sub(r"\1:***@", value)
    return value


def _unreachable(e: BaseException) -> bool:
    """A tracking server that stopped answering (after MLflow's bounded retries), not a refused request."""
    try:
        import requests

        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
    except ImportError:
        pass
    text = str(e)
    return "API request to" in text and "failed with" in text


def _store_call(fn):
    """A tracker method whose server went away ends as one line (a LoraflowError), not a traceback."""
    import functools

    @functools.wraps(fn)
    def call(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except Exception as e:
            if not _unreachable(e):
                raise
            from loraflow.core.errors import LoraflowError

            self.unreachable = True  # finish() does not wait through the retries a second time
            if getattr(self, "_pending", None) is not None:
                self._pending.dead = True  # nor does the exit flush of buffered metrics
            uri = redact("uri", str(getattr(self.client, "tracking_uri", "") or ""))
            raise LoraflowError(
                f"MLflow tracking server at {uri} stopped answering ({fn.__name__} of run {self.run_id}, after "
                f"{os.environ.get('MLFLOW_HTTP_REQUEST_MAX_RETRIES')} retries with backoff); the run is ended FAILED "
                "by the next loraflow run started on this machine against that server") from None
    return call


RUN_HOST_TAG, RUN_PID_TAG = "loraflow.host", "loraflow.pid"


# Per-step metrics (``log_metrics(..., step=N)``) are sent in batches: at most this many seconds
# late, and at once on the first one, on a final metric (no step), an artifact and ``finish``. One
# log_batch per logged training step cost 15-60 ms each here (docs/traps.md §6: 100 log_metric calls 0.23 s
# vs one log_metrics 0.01 s); a 318-step default run logged 64 of them.
METRICS_FLUSH_S = 10.0
MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch


class _Pending:
    """Metrics logged but not sent yet: shared by a tracker and its exit flush (which cannot hold the tracker)."""

    def __init__(self) -> None:
        self.metrics: list[Any] = []
        self.sent_at = 0.0  # time.monotonic() of the last send; 0: the first metric goes at once
        self.dead = False  # the server stopped answering: nothing more is tried


def _send(client: Any, run_id: str, pending: _Pending) -> None:
    while pending.metrics and not pending.dead:
        client.log_batch(run_id, metrics=pending.metrics[:MAX_BATCH])
        del pending.metrics[:MAX_BATCH]


def _send_at_exit(client: Any, run_id: str, pending: _Pending) -> None:
    """A tracker dropped (or the process ending) with metrics still buffered: send them, best effort."""
    try:
        _send(client, run_id, pending)
    except Exception:  # noqa: BLE001 - at exit there is no one left to tell
        pass


class MlflowTracker:
    """Logs to one MLflow run, addressed by id through a client (no global active run)."""

    def __init__(self, client: Any, run_id: str) -> None:
        import weakref

        self.client = client
        self.run_id = run_id
        self.unreachable = False
        self._pending = _Pending()
        weakref.finalize(self, _send_at_exit, client, run_id, self._pending)
        # Keys already logged to this run: read once, then kept up to date here, so a stage that
        # logs params in several calls costs one get_run, not one per call.
        self._logged: set[str] | None = None

    @_store_call
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

    @_store_call
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending.metrics += [
            Metric(k, float(v), now, step or 0)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if step is None or time.monotonic() - self._pending.sent_at >= METRICS_FLUSH_S:
            self.flush()

    @_store_call
    def flush(self) -> None:
        """Send the buffered metrics now."""
        import time

        if self._pending.metrics:
            _send(self.client, self.run_id, self._pending)
            self._pending.sent_at = time.monotonic()

    @_store_call
    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(redact(k, v))) for k, v in tags.items()])

    @_store_call
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.flush()  # a stage's last word: its metrics are in the run before its artifacts
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    @_store_call
    def log_dataset(self, name: str, digest: str, source: str, context: str) -> None:
        """An MLflow dataset input ("Datasets used" in the UI); ``digest`` is DVC's md5 of the folder."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}))
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])

    @_store_call
    def log_table(self, data: dict[str, list[Any]], artifact_file: str) -> None:
        """A table artifact (columns of equal length) the UI shows in its evaluation view."""
        self.client.log_table(self.run_id, data=data, artifact_file=artifact_file)

    @_store_call
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

    bound_http_retries()
    uri = tracking_uri(paths)
    if uri.startswith("sqlite:///"):
        from loraflow.track import sqlite_store

        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        sqlite_store.seed(db)  # a new store from the cached empty schema, not 2.4 s of migrations
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
    import socket

    require_reachable(paths)
    cl = client(paths)
    exp = experiment_id(cl, experiment, paths)
    end_orphans(cl, exp)
    run = cl.create_run(exp, run_name=run_name,
                        tags={**{k: str(redact(k, v)) for k, v in (tags or {}).items()},
                              RUN_HOST_TAG: socket.gethostname(), RUN_PID_TAG: str(os.getpid())})
    tracker = MlflowTracker(cl, run.info.run_id)
    tracker.log_params(system_params())
    return tracker


# NVIDIA (CUDA) and AMD (ROCm) device nodes: torch sees no GPU on a machine without one of these.
GPU_DEVICE_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")
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
    """``cuda:<name> x<count>`` or ``cpu x<cores>``.

    Without a GPU device node torch cannot see a GPU, so torch is not imported to say so: a re-run
    whose stages are all cached never needs torch, and importing it costs seconds (docs/traps.md §6)."""
    if "torch" not in sys.modules and not any(Path(p).exists() for p in GPU_DEVICE_NODES):
        return f"cpu x{os.cpu_count()}"
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
    """End the run as FINISHED or FAILED, so no orphan RUNNING run is left behind.

    With the server gone the run cannot be ended now: it stays RUNNING there until the next
    ``start_run`` on this machine ends it (``end_orphans``); a failure already on its way is not
    replaced by this one."""
    if not isinstance(tracker, MlflowTracker):
        return
    if not (tracker.unreachable and not ok):  # known gone: no second round of retries
        try:
            if ok:
                tracker.flush()
            else:  # a failure on its way is not replaced by a failed flush
                _send_at_exit(tracker.client, tracker.run_id, tracker._pending)
            tracker.client.set_terminated(tracker.run_id, status="FINISHED" if ok else "FAILED")
            return
        except Exception as e:
            if ok or not _unreachable(e):
                raise
    import sys

    print(f"loraflow: MLflow run {tracker.run_id} could not be ended (server unreachable); the next run "
          "on this machine ends it FAILED", file=sys.stderr)


def end_orphans(cl: Any, experiment: str) -> list[str]:
    """End FAILED the RUNNING runs of ``experiment`` started on this host by a process that is gone
    (killed, or its server went away before it could end them). Runs of live processes and of other
    machines are left alone. Returns the ids ended."""
    import socket

    host = socket.gethostname()
    ended = []
    runs = cl.search_runs([experiment], filter_string=f"attributes.status = 'RUNNING' and tags.`{RUN_HOST_TAG}` = '{host}'",
                          max_results=200)
    for run in runs:
        pid = run.data.tags.get(RUN_PID_TAG, "")
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        cl.set_tag(run.info.run_id, "loraflow.ended_by", f"orphan cleanup by pid {os.getpid()}")
        cl.set_terminated(run.info.run_id, status="FAILED")
        ended.append(run.info.run_id)
    return ended


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
