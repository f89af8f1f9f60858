"""The one stage runner: ``loraflow stage``, ``dvc repro`` and the Prefect flows all run a stage here.

A stage is a plain function ``tasks/<name>.run(cfg, paths[, tracker]) -> Result``. What happens
around it is the same whichever entry point called it:

    open_run(...)            the MLflow run: the contract's tags (git_commit, dvc_lock_digest), its label
    run_stage(name, ...)     the stage's function, then its report logged into that run
    finishing(tracker, end)  FINISHED, or FAILED on an error (no RUNNING orphan is left behind)

``loraflow stage train`` (the DVC path) opens a run of its own and ends it; the later stages resume
the run named in ``reports/train.json`` and leave it open for the next one, ending it FAILED only
when they fail. The ``finetune`` flow opens one run for the whole pipeline and ends it once.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from loraflow.core.config import Config
from loraflow.core.paths import Paths
from loraflow.track import tracking
from loraflow.track.lineage import read_report, source_tags

STAGES = ("prepare", "train", "evaluate", "merge", "register")


def label(cfg: Config) -> str:
    """``r=16 α=32 qlora``: what a run trains, for MLflow run names and Prefect flow and task names."""
    return label_of(cfg.lora.r, cfg.lora.alpha, cfg.method)


def label_of(r: int, alpha: float, method: str) -> str:
    return f"r={r} α={float(alpha):g} {method}"


def open_run(cfg: Config, paths: Paths, what: str, tags: dict[str, str] | None = None) -> tracking.MlflowTracker:
    """A new MLflow run ``<what> r=16 α=32 qlora`` in the experiment ``register.model_name``."""
    return tracking.start_run(paths, cfg.register.model_name, f"{what} {label(cfg)}",
                              tags={**source_tags(paths.root), **(tags or {})})


def tracker_for(paths: Paths, run_id: str | None) -> tracking.Tracker:
    """The run a later stage logs into: ``run_id`` resumed, or a tracker that logs nothing."""
    return tracking.resume(paths, run_id) if run_id else tracking.NullTracker()


def run_stage(name: str, cfg: Config, paths: Paths, tracker: tracking.Tracker | None = None, **kwargs: Any) -> Any:
    """Run stage ``name`` and log its report into ``tracker``'s run; returns the stage's result.

    ``kwargs`` go to the stage function (``callbacks`` for train)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; one of {', '.join(STAGES)}")
    stage = importlib.import_module(f"loraflow.tasks.{name}")
    if name == "prepare":
        return stage.run(cfg, paths)
    tracker = tracker or tracking.NullTracker()
    result = stage.run(cfg, paths, tracker, **kwargs)
    tracker.log_artifact(paths.report(name), "reports")
    return result


@contextmanager
def finishing(tracker: tracking.Tracker, *, end: bool) -> Iterator[tracking.Tracker]:
    """End ``tracker``'s run when the block fails (FAILED), and when it succeeds if ``end`` (FINISHED)."""
    ok = False
    try:
        yield tracker
        ok = True
    finally:
        if end or not ok:
            tracking.finish(tracker, ok)


def run_one(name: str, cfg: Config, paths: Paths) -> Any:
    """One stage as ``loraflow stage NAME`` (and so ``dvc repro``) runs it, with its MLflow run.

    train opens the run (``train r=16 α=32 qlora``) and ends it; evaluate, merge and register log
    into the run ``reports/train.json`` names, or into none without one."""
    if name == "prepare":
        return run_stage(name, cfg, paths)
    if name == "train":
        tracker: tracking.Tracker = open_run(cfg, paths, "train")
    else:
        tracker = tracker_for(paths, read_report(paths, "train").get("mlflow_run_id"))
    with finishing(tracker, end=name == "train"):
        return run_stage(name, cfg, paths, tracker)
