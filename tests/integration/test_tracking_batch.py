"""Per-step metrics go to MLflow in batches (issue 8), and none is lost: not at finish, not when a
tracker is dropped without one. A real sqlite store; the client's own log_batch, counted."""

from __future__ import annotations

import gc

from loraflow.core.paths import Paths
from loraflow.track import tracking


def _counting(tracker: tracking.MlflowTracker) -> list[int]:
    """Count the metrics of each log_batch call the tracker's client makes (the real call still runs)."""
    calls: list[int] = []
    real = tracker.client.log_batch

    def log_batch(run_id, metrics=(), **kw):
        if metrics:
            calls.append(len(metrics))
        return real(run_id, metrics=metrics, **kw)

    tracker.client.log_batch = log_batch
    return calls


def test_step_metrics_are_sent_in_batches_and_all_arrive(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    paths = Paths.at(tmp_path)
    tracker = tracking.start_run(paths, "batching", "steps")
    calls = _counting(tracker)
    for step in range(1, 51):
        tracker.log_metrics({"train_loss": 1.0 / step, "learning_rate": 0.1}, step=step)
    assert calls == [2]  # the first step at once (the UI shows the run moving), the rest buffered
    tracker.log_metrics({"eval_loss": 0.5})  # a final metric (no step) is sent at once, with the buffer
    assert calls == [2, 99]
    tracker.log_metrics({"train_loss": 0.01}, step=51)
    tracking.finish(tracker, True)
    assert calls == [2, 99, 1]

    cl = tracking.client(paths)
    history = cl.get_metric_history(tracker.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 52))
    assert cl.get_run(tracker.run_id).data.metrics["eval_loss"] == 0.5


def test_a_dropped_tracker_sends_what_it_buffered(tmp_path, monkeypatch):
    """A stage tracker (``tracking.resume``) that logs steps and is then dropped, as after a crash."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    paths = Paths.at(tmp_path)
    run = tracking.start_run(paths, "batching", "dropped")
    stage = tracking.resume(paths, run.run_id)
    for step in range(1, 6):
        stage.log_metrics({"train_loss": float(step)}, step=step)
    del stage
    gc.collect()
    history = tracking.client(paths).get_metric_history(run.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5]
    tracking.finish(run, True)
