"""The ``train`` Prefect flow: the training stage alone, on whatever machine runs it (deployment ``train/gpu``).

It shares no disk with the pipeline. Given the pipeline's MLflow run id and the config as JSON it

    downloads runs:/<id>/prepared/  ->  trains (CUDA when present, else CPU)  ->  uploads adapter/

and logs into that same MLflow run. Its return value is for in-process callers only: across
workers Prefect results are not shared (docs/traps.md §9), so the pipeline reads ``reports/train.json``
back from the MLflow run instead.

The working folder is ``$LORAFLOW_WORK_DIR/<run id>`` (default ``~/.cache/loraflow/work``): a
retried or re-submitted training of the same run finds its checkpoints there and resumes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loraflow.flows.common import (
    as_config,
    label,
    mlflow_link,
    plain,
    publish,
    quiet_worker,
    redact_stored_parameters,
    retrying,
    run_name,
    stage_logs,
    table,
    tracker,
)
from loraflow.tasks import runner
from prefect import flow, task
from prefect.logging import get_run_logger

from loraflow.core.config import Config
from loraflow.core.paths import Paths
from loraflow.track import handoff

# Extra transformers TrainerCallbacks for in-process runs (tests plant faults with one).
EXTRA_CALLBACKS: list[Any] = []


def work_dir(run_id: str) -> str:
    base = os.environ.get("LORAFLOW_WORK_DIR") or str(Path.home() / ".cache" / "loraflow" / "work")
    return str(Path(base).expanduser().resolve() / run_id)


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


@task(name="download prepared data")
def fetch_prepared(root: str, run_id: str) -> str:
    return handoff.download_prepared(Paths.at(root), run_id)


class TrainingTimeout(TimeoutError):
    """A training attempt ran past ``orchestration.train_timeout_s`` (never retried)."""


def deadline_callback(seconds: float) -> Any:
    """A TrainerCallback that stops training at the first step boundary past ``seconds`` from now.

    It raises inside the training loop, so training really stops (no adapter is published) and the
    task fails with one line. Prefect's own task timeout stays as a backstop for hangs outside the
    loop: its alarm signal can land in any Python frame (even a callback that swallows it), so it
    alone does not reliably stop a trainer.
    """
    import time

    from transformers import TrainerCallback

    end = time.monotonic() + seconds

    class Deadline(TrainerCallback):
        def _check(self, state) -> None:
            if time.monotonic() > end:
                raise TrainingTimeout(
                    f"training stopped at step {state.global_step} after {seconds:g} s "
                    "(orchestration.train_timeout_s); raise it, or lower train.max_steps / train.epochs")

        def on_step_end(self, args, state, control, **kwargs):
            self._check(state)

        def on_substep_end(self, args, state, control, **kwargs):
            self._check(state)

    return Deadline()


@task(name="train")
def train_stage(config: Config, root: str, run_id: str, dataset_digest: str | None) -> dict[str, Any]:
    """The train stage; a retry re-enters it and it resumes from its last checkpoint in outputs/checkpoints."""
    callbacks = [deadline_callback(config.orchestration.train_timeout_s), *EXTRA_CALLBACKS]
    return plain(runner.run_stage("train", config, Paths.at(root), tracker(root, run_id), callbacks=callbacks,
                                  dataset_digest=dataset_digest))


@task(name="upload adapter")
def publish_adapter(root: str, run_id: str) -> bool:
    return handoff.upload_adapter(Paths.at(root), run_id)


@flow(name="train", flow_run_name=run_name("train"))
def train(run_id: str, config: dict[str, Any], root: str | None = None,
          dataset_digest: str | None = None) -> dict[str, Any]:
    """Train the adapter of MLflow run ``run_id`` with ``config`` (the full config as JSON).

    ``root``: the project folder to work in; default ``$LORAFLOW_WORK_DIR/<run_id>`` (a folder of
    its own, filled from MLflow). In-process the pipeline passes its own root and nothing is copied.
    ``dataset_digest``: the prepared data's digest as prepare returned it (None: from prepare's report).
    """
    quiet_worker()
    with stage_logs():
        return _train(run_id, config, root, dataset_digest)


def _train(run_id: str, config: dict[str, Any], root: str | None, dataset_digest: str | None) -> dict[str, Any]:
    cfg = as_config(config)
    redact_stored_parameters()  # the config parameter may hold a password in a URI
    root = root or work_dir(run_id)
    paths = Paths.at(root)
    log = get_run_logger()
    where = device()
    log.info(f"training {label(cfg)} for MLflow run {run_id} on {where} in {paths.root}")
    tracker(root, run_id).set_tags({"train_device": where.split(" ")[0]})

    retrying(fetch_prepared, cfg).with_options(task_run_name=f"download prepared/ of run {run_id[:8]}")(root, run_id)
    result = retrying(train_stage, cfg).with_options(
        task_run_name=f"train {label(cfg)} on {where.split(' ')[0]}",
        timeout_seconds=cfg.orchestration.train_timeout_s * 1.1 + 60,  # backstop; the deadline callback stops first
    )(cfg, root, run_id, dataset_digest)
    retrying(publish_adapter, cfg).with_options(task_run_name=f"upload adapter/ to run {run_id[:8]}")(root, run_id)

    rows = [["steps", result.get("steps")], ["final train loss", result.get("train_loss")],
            ["val loss", result.get("eval_loss")], ["tokens/s", result.get("tokens_per_second")],
            ["trainable params", result.get("trainable_params")], ["device", where],
            ["resumed from", result.get("resumed_from") or "-"]]
    publish("train-summary", f"## train {label(cfg)}\n\n{table(['', 'value'], rows)}\n\n"
            f"Adapter: `adapter/` of {mlflow_link(paths, run_id)}", f"loss summary, train {label(cfg)}")
    return result
