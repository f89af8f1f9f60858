"""Trainer callbacks: the progress bar, the per-step log (reports/train_log.csv and MLflow)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.core import progress
from loraflow.core.atomic import atomic_file
from loraflow.core.errors import TrainingError
from loraflow.track.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    pass


LOG_COLUMNS = ("step", "loss", "lr", "tokens_per_second", "eval_loss")


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class LossBar(_callback_base()):
    """A tqdm bar over optimizer steps whose postfix shows the last logged loss and learning rate."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = progress.bar(total=state.max_steps, initial=state.global_step, desc="train", unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(
                loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}", refresh=progress.interactive()
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrainLog(_callback_base()):
    """Each log: a row in reports/train_log.csv and the contract's metrics to the tracker.

    Also logs at the last step (so the final loss is always measured) and refuses to checkpoint
    weights that are no longer finite.
    """

    def __init__(self, path: Path, tracker: Tracker | None = None) -> None:
        self.path = Path(path)
        self.tracker = tracker or NullTracker()
        self.rows: list[dict[str, Any]] = []

    def start(self, history: list[dict] = ()) -> None:
        """Rows of a resumed run's earlier steps (its checkpoint's log history); a fresh run starts empty."""
        self.rows = [_row(h["step"], h) for h in history if "loss" in h]
        self._write()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
        if control.should_save and model is not None:
            bad = [n for n, p in model.named_parameters() if p.requires_grad and not p.isfinite().all()]
            if bad:
                raise TrainingError(
                    f"train: adapter weights became non-finite at step {state.global_step} ({bad[0]}); "
                    f"lower train.learning_rate (now {args.learning_rate:g})"
                )
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        step = state.global_step
        if "loss" in logs:
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                raise TrainingError(
                    f"train: loss is {loss} at step {step}; lower train.learning_rate (now {args.learning_rate:g})"
                )
            row = _row(step, logs)
            self.rows.append(row)
            self.tracker.log_metrics(
                {"train_loss": loss, "learning_rate": row["lr"], "train_tokens_per_second": row["tokens_per_second"]},
                step=step,
            )
            self._write()
        elif "eval_loss" in logs:
            self.rows.append({"step": step, "eval_loss": float(logs["eval_loss"])})
            self._write()

    def _write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: row.get(k, "") for k in LOG_COLUMNS})
        with atomic_file(self.path) as fh:
            fh.write(buf.getvalue())


def final_loss(history: list[dict], window: int) -> float | None:
    """Mean training loss over (at least) the last ``window`` steps, from the logged windows.

    The last log may cover a single step (the end of an epoch's last, short batch): weighting each
    logged mean by the steps it covers keeps "final loss" as steady as one logging window.
    """
    logged = sorted((int(h["step"]), float(h["loss"])) for h in history if "loss" in h)
    total = steps = 0.0
    for k in range(len(logged) - 1, -1, -1):
        step, loss = logged[k]
        span = step - (logged[k - 1][0] if k > 0 else 0)
        total, steps = total + loss * span, steps + span
        if steps >= window:
            break
    return total / steps if steps else None


def _row(step: int, logs: dict) -> dict[str, Any]:
    return {
        "step": int(step),
        "loss": float(logs["loss"]),
        "lr": float(logs.get("learning_rate", 0.0)),
        "tokens_per_second": float(logs.get("tokens_per_second", 0.0)),
    }
