"""The ``finetune`` Prefect flow: prepare -> train -> evaluate -> merge -> register.

Each task wraps the same plain stage function that ``loraflow stage NAME`` (and so ``dvc repro``)
calls; the flow adds orchestration only: one MLflow run for the pipeline, names, ordering.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from typing import Any

from prefect import flow, task

import tasks.evaluate
import tasks.merge
import tasks.prepare
import tasks.register
import tasks.train
from loraflow import tracking
from loraflow.config import Config
from loraflow.lineage import dvc_lock_digest, git_commit
from loraflow.paths import Paths


def _plain(result: Any) -> dict[str, Any]:
    if is_dataclass(result):
        return asdict(result)
    if hasattr(result, "model_dump"):
        return result.model_dump(mode="json")
    return dict(result)


def _tracker(root: str, run_id: str | None) -> tracking.Tracker:
    return tracking.resume(Paths.at(root), run_id) if run_id else tracking.NullTracker()


@task(name="prepare", task_run_name="prepare {config.data.path}")
def prepare_task(config: Config, root: str) -> dict[str, Any]:
    return _plain(tasks.prepare.run(config, Paths.at(root)))


@task(name="train", task_run_name="train r={config.lora.r} α={config.lora.alpha:g} {config.method}")
def train_task(config: Config, root: str, run_id: str | None) -> dict[str, Any]:
    return _plain(tasks.train.run(config, Paths.at(root), _tracker(root, run_id)))


@task(name="evaluate", task_run_name="evaluate base vs tuned")
def evaluate_task(config: Config, root: str, run_id: str | None) -> dict[str, Any]:
    return _plain(tasks.evaluate.run(config, Paths.at(root), _tracker(root, run_id)))


@task(name="merge", task_run_name="merge into {config.merge.base} base")
def merge_task(config: Config, root: str, run_id: str | None) -> dict[str, Any]:
    return _plain(tasks.merge.run(config, Paths.at(root), _tracker(root, run_id)))


@task(name="register", task_run_name="register {config.register.model_name}")
def register_task(config: Config, root: str, run_id: str | None) -> dict[str, Any]:
    return _plain(tasks.register.run(config, Paths.at(root), _tracker(root, run_id)))


def _lint(config: Config, paths: Paths, tracker: tracking.MlflowTracker) -> None:
    """The planner's lints (the seed's four mistakes) at the start of every run, logged to MLflow."""
    import sys

    from loraflow import planner
    from loraflow.errors import LoraflowError

    try:
        found = planner.lints(config, paths, planner.plan(config, paths, with_lints=False),
                              current_run_id=tracker.run_id)
    except LoraflowError as e:  # a plan that cannot be made must not stop a run that may still fit
        print(f"loraflow: plan: {e}", file=sys.stderr)
        return
    for lint in found:
        print(f"loraflow: {lint.level} [{lint.id}]: {lint.message}", file=sys.stderr)
    tracker.set_tags({"lints": ",".join(x.id for x in found) or "none"})


@flow(name="finetune", flow_run_name="finetune r={config.lora.r} α={config.lora.alpha:g} {config.method}")
def finetune(config: Config, root: str = ".") -> dict[str, Any]:
    """The whole DAG as one flow run and one MLflow run; returns every stage's result."""
    paths = Paths.at(root)
    out: dict[str, Any] = {"prepare": prepare_task(config, root)}
    tracker = tracking.start_run(
        paths, config.register.model_name, f"finetune r={config.lora.r} α={config.lora.alpha:g} {config.method}",
        tags={"git_commit": git_commit(paths.root), **({"dvc_lock_digest": d} if (d := dvc_lock_digest(paths.root)) else {})},
    )
    out["mlflow_run_id"] = tracker.run_id
    ok = False
    try:
        tracker.log_params({f"config.{k}": v for k, v in config.flat().items()})
        _lint(config, paths, tracker)
        tracker.log_artifact(paths.report("prepare"), "reports")
        out["train"] = train_task(config, root, tracker.run_id)
        out["evaluate"] = evaluate_task(config, root, tracker.run_id)
        out["merge"] = merge_task(config, root, tracker.run_id)
        out["register"] = register_task(config, root, tracker.run_id)
        for name in ("train", "evaluate", "merge", "register"):
            tracker.log_artifact(paths.report(name), "reports")
        for extra in (paths.samples, paths.train_log, paths.label_audit):
            tracker.log_artifact(extra, "reports")
        ok = True
    finally:
        tracking.finish(tracker, ok)
    return out
