"""Hand stage outputs from one machine to another through MLflow's artifact store, by run id.

Stages on different machines share no disk. The pipeline's MLflow run is the meeting point:

    prepare (cpu)  ──upload──►  runs:/<id>/prepared/        data/prepared/{train,val,test}.jsonl
                                runs:/<id>/reports/prepare.json
    train (gpu)    ◄─download─  prepared/, reports/prepare.json
                   ──upload──►  runs:/<id>/adapter/          outputs/adapter/ (safetensors, config, tokenizer)
                                runs:/<id>/reports/train.json, train_log.csv, label_audit.txt
    evaluate/merge ◄─download─  adapter/, reports/train.json

Downloads land in a temporary folder and are renamed into place (``atomic_dir``), and the
prepared data is checked against the digest recorded at upload: a half-finished or foreign copy
is never read. Core module: no Prefect here (the flows add retries around these calls).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from loraflow.core.atomic import atomic_dir
from loraflow.core.errors import LoraflowError
from loraflow.core.fingerprint import dataset_digest
from loraflow.core.paths import Paths
from loraflow.track import tracking

PREPARED = "prepared"
ADAPTER = "adapter"
REPORTS = "reports"
PREPARED_DIGEST_TAG = "handoff.prepared_digest"
ADAPTER_TAG = "handoff.adapter"  # "adapter/" once the adapter is uploaded


class HandoffError(LoraflowError):
    """An artifact another stage needs is not in the MLflow run (not a transient failure)."""

    exit_code = 2


def client(paths: Paths) -> Any:
    return tracking.client(paths)


def require_run(cl: Any, paths: Paths, run_id: str) -> Any:
    """The MLflow run, or one line saying which store was asked and how to point at the right one."""
    from mlflow.exceptions import MlflowException

    try:
        return cl.get_run(run_id)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" not in str(getattr(e, "error_code", "")) and "not found" not in str(e).lower():
            raise  # a server hiccup: let the caller's retries handle it
        raise HandoffError(
            f"MLflow run {run_id} not found in {tracking.tracking_uri(paths)}; set MLFLOW_TRACKING_URI on this "
            "machine to the tracking server the pipeline logs to (stages hand data over through it)"
        ) from None


def has_artifact(cl: Any, run_id: str, path: str) -> bool:
    """True when ``path`` (a file or folder of the run's artifacts) exists."""
    parent, _, name = path.rstrip("/").rpartition("/")
    return any(f.path.rstrip("/").rpartition("/")[2] == name for f in cl.list_artifacts(run_id, parent or None))


# --------------------------------------------------------------------------------------------- prepared data


def upload_prepared(paths: Paths, run_id: str, digest: str | None = None) -> str:
    """Upload ``data/prepared/`` as ``prepared/`` (and the prepare report); returns the data digest.

    ``digest``: the one prepare returned for these files (the flow passes it; computed without)."""
    if not paths.split("train").exists():
        raise HandoffError(f"{paths.prepared}: nothing to upload; run the prepare stage first")
    cl = client(paths)
    digest = digest or dataset_digest(paths.prepared)
    cl.log_artifacts(run_id, str(paths.prepared), PREPARED)
    if paths.report("prepare").exists():
        cl.log_artifact(run_id, str(paths.report("prepare")), REPORTS)
    cl.set_tag(run_id, PREPARED_DIGEST_TAG, digest)
    return digest


def download_prepared(paths: Paths, run_id: str) -> str:
    """Put the run's ``prepared/`` into ``paths.prepared`` (skipped when an identical copy is there)."""
    cl = client(paths)
    run = require_run(cl, paths, run_id)
    want = run.data.tags.get(PREPARED_DIGEST_TAG)
    if not want:
        raise HandoffError(
            f"MLflow run {run_id} has no prepared data (tag {PREPARED_DIGEST_TAG}); the pipeline uploads it "
            "after prepare: start training from the finetune flow, not on its own"
        )
    if paths.split("train").exists() and dataset_digest(paths.prepared) == want:
        _download_file(cl, run_id, f"{REPORTS}/prepare.json", paths.report("prepare"), required=False)
        return want
    with atomic_dir(paths.prepared) as tmp:
        _download_dir(cl, run_id, PREPARED, tmp)
        got = dataset_digest(tmp)
        if got != want:
            raise HandoffError(f"MLflow run {run_id}: prepared/ has digest {got}, the run recorded {want}; "
                               "re-run the pipeline (the upload was incomplete)")
    _download_file(cl, run_id, f"{REPORTS}/prepare.json", paths.report("prepare"), required=False)
    return want


# --------------------------------------------------------------------------------------------- adapter

TRAIN_REPORTS = ("train.json", "train_log.csv", "label_audit.txt")


def upload_adapter(paths: Paths, run_id: str) -> bool:
    """Upload ``outputs/adapter/`` as ``adapter/`` and the train reports; False when the run already had it.

    The train stage may log the adapter itself under exactly ``adapter/``; then only the tag is set.
    """
    if not (paths.adapter / "adapter_config.json").exists():
        raise HandoffError(f"{paths.adapter}: no adapter to upload; the train stage did not finish")
    cl = client(paths)
    uploaded = False
    if not has_artifact(cl, run_id, f"{ADAPTER}/adapter_config.json"):
        cl.log_artifacts(run_id, str(paths.adapter), ADAPTER)
        uploaded = True
    for name in TRAIN_REPORTS:
        if (paths.reports / name).exists():
            cl.log_artifact(run_id, str(paths.reports / name), REPORTS)
    cl.set_tag(run_id, ADAPTER_TAG, f"{ADAPTER}/")
    return uploaded


def download_adapter(paths: Paths, run_id: str) -> None:
    """Put the run's ``adapter/`` into ``outputs/adapter/`` and its train reports into ``reports/``."""
    cl = client(paths)
    require_run(cl, paths, run_id)
    if not has_artifact(cl, run_id, f"{ADAPTER}/adapter_config.json"):
        raise HandoffError(f"MLflow run {run_id} has no adapter/ artifact; its training did not finish")
    with atomic_dir(paths.adapter) as tmp:
        _download_dir(cl, run_id, ADAPTER, tmp)
    for name in TRAIN_REPORTS:
        _download_file(cl, run_id, f"{REPORTS}/{name}", paths.reports / name, required=name == "train.json")


def read_json_artifact(paths: Paths, run_id: str, path: str) -> dict[str, Any]:
    """A small JSON artifact of a run (e.g. ``reports/train.json``), read without touching the project."""
    import json

    cl = client(paths)
    with tempfile.TemporaryDirectory(prefix="loraflow-handoff-") as tmp:
        local = cl.download_artifacts(run_id, path, tmp)
        return json.loads(Path(local).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------- helpers


def _download_dir(cl: Any, run_id: str, path: str, into: Path) -> None:
    """Download the run's folder ``path`` so that its files land directly in ``into``."""
    with tempfile.TemporaryDirectory(prefix="loraflow-handoff-", dir=into.parent) as tmp:
        local = Path(cl.download_artifacts(run_id, path, tmp))
        for item in local.iterdir():
            shutil.move(str(item), into / item.name)


def _download_file(cl: Any, run_id: str, path: str, target: Path, required: bool) -> None:
    from loraflow.core.atomic import atomic_file

    parent, _, name = path.rpartition("/")
    if not any(f.path.rpartition("/")[2] == name for f in cl.list_artifacts(run_id, parent or None)):
        if required:
            raise HandoffError(f"MLflow run {run_id} has no {path}")
        return
    with tempfile.TemporaryDirectory(prefix="loraflow-handoff-") as tmp:
        data = Path(cl.download_artifacts(run_id, path, tmp)).read_bytes()
    with atomic_file(target, "wb") as fh:
        fh.write(data)
