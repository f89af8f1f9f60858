"""Orchestration overhead: a default `loraflow run` vs the same stage functions in one plain process.

    .venv/bin/python bench/overhead.py [--reps 3] [--work /tmp/loraflow-bench-overhead]

Each run gets a fresh copy of the project (bench/pipeline_project.py; the embedded base already
built) and is a fresh process, the two sides alternating (the machine may be shared: medians):

- pipeline: what `loraflow run` executes (``loraflow.cli.main(["run"])``): Prefect flow with its
  temporary server, one MLflow run (params, metrics, artifacts, the hand-over of prepared data and
  adapter), the planner's lints, register (MLflow model logging, registry, gate);
- plain: the script a user would write without Prefect, MLflow or DVC: load params.yaml, then
  ``loraflow.tasks.prepare.run``, ``loraflow.tasks.train.run``, ``loraflow.tasks.evaluate.run``, ``loraflow.tasks.merge.run``.

Overhead = (pipeline - plain) / pipeline wall time. The breakdown comes from timers wrapped around
the same functions in both processes as their modules are imported (nothing is imported earlier than
the command itself would): each stage's own time (MLflow calls inside it counted as MLflow), MLflow
(start run, params, metrics, artifacts, hand-over), register, the lints, and the rest (imports,
Prefect: server, flow and task bookkeeping). Prints a table and writes
``bench/results/overhead-<date>-cpu.json``. Goal (issue 8): overhead <= 10% of pipeline time.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.abc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

STAGES = ("prepare", "train", "evaluate", "merge")
GOAL = 0.10
WAIT_SERVER = "waiting for the Prefect temporary server"
IMPORT_ML = "imports: torch, transformers, peft, bitsandbytes, ..."
IMPORT_OPS = "imports: prefect, mlflow"
TRAIN_LOOP = "train: the training loop (Trainer.train)"


# --------------------------------------------------------------------------------------------- timers (child)


class Timers:
    """Exclusive wall time per category: a timed call inside another counts for the inner one only."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.total: dict[str, float] = {}
        self.stack: list[list[Any]] = []  # [category, start, time of nested calls]
        self.marks: dict[str, float] = {}
        self.parallel: dict[str, float] = {}  # intervals on other threads (not in the exclusive sum)

    def wrap(self, fn: Callable, category: str) -> Callable:
        import functools
        import threading

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():
                start = time.time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.parallel[category] = self.parallel.get(category, 0.0) + time.time() - start
            if category.startswith("stage:"):
                self.marks.setdefault(f"{category} start", time.time() - self.t0)
            start = time.time()
            self.stack.append([category, start, 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                cat, begun, nested = self.stack.pop()
                took = time.time() - begun
                self.total[cat] = self.total.get(cat, 0.0) + took - nested
                if self.stack:
                    self.stack[-1][2] += took
        return timed


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after each named module is first imported, wherever that happens,
    and times the import of each module in ``timed`` (its category: ``timed[name]``)."""

    def __init__(self, patches: dict[str, Callable[[Any], None]], timers: Timers, timed: dict[str, str]) -> None:
        self.patches, self.timers, self.timed = patches, timers, timed

    def find_spec(self, name, path, target=None):
        if name not in self.patches and name not in self.timed:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        patch, run = self.patches.pop(name, lambda m: None), spec.loader.exec_module
        if name in self.timed:
            run = self.timers.wrap(run, self.timed.pop(name))

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def install_timers(t: Timers) -> None:
    def stage(name: str) -> Callable[[Any], None]:
        def patch(m: Any) -> None:
            m.run = t.wrap(m.run, f"stage:{name}")
            if name == "register":
                m._log_model = t.wrap(m._log_model, "register: MLflow model logging")
        return patch

    def tracking(m: Any) -> None:
        for fn in ("start_run", "resume", "finish"):
            setattr(m, fn, t.wrap(getattr(m, fn), "MLflow"))
        for meth in ("log_params", "log_metrics", "flush", "set_tags", "log_artifact", "log_dataset", "log_table",
                     "log_figure"):
            setattr(m.MlflowTracker, meth, t.wrap(getattr(m.MlflowTracker, meth), "MLflow"))

    def handoff(m: Any) -> None:
        for fn in ("upload_prepared", "download_prepared", "upload_adapter", "download_adapter", "read_json_artifact"):
            if hasattr(m, fn):
                setattr(m, fn, t.wrap(getattr(m, fn), "MLflow"))

    def planner(m: Any) -> None:
        m.plan = t.wrap(m.plan, "lints (planner)")
        m.lints = t.wrap(m.lints, "lints (planner)")

    def server(m: Any) -> None:  # Prefect starting its own server (when the CLI's early start did not)
        m.SubprocessASGIServer.start = t.wrap(m.SubprocessASGIServer.start, WAIT_SERVER)

    def cli(m: Any) -> None:  # the CLI's early start: only the wait for /health is on this thread
        if hasattr(m, "_TemporaryServer"):
            m._TemporaryServer.wait_until_ready = t.wrap(m._TemporaryServer.wait_until_ready, WAIT_SERVER)

    def trainer(m: Any) -> None:  # the training loop: the same code on both sides, and the noisiest part
        m.Trainer.train = t.wrap(m.Trainer.train, TRAIN_LOOP)

    patches = {f"loraflow.tasks.{s}": stage(s) for s in (*STAGES, "register")}
    patches["transformers.trainer"] = trainer
    patches |= {"loraflow.track.tracking": tracking, "loraflow.track.handoff": handoff, "loraflow.planner": planner,
                "prefect.server.api.server": server, "loraflow.cli": cli}
    timed = {m: IMPORT_ML for m in ("torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "accelerate")}
    timed |= {m: IMPORT_OPS for m in ("prefect", "mlflow")}
    sys.meta_path.insert(0, PatchOnImport(patches, t, timed))


def child(side: str, record: Path) -> int:
    t = Timers(float(os.environ["BENCH_T0"]))
    install_timers(t)
    if side == "pipeline":
        import atexit

        from loraflow.cli import main

        # registered first, so it runs last: when the exit handlers (the server's stop too) are done
        atexit.register(lambda: _add_to_record(record, "exit_handlers_done", time.time() - t.t0))
        code = main(["run"])  # then exit as the console script does (below)
    else:
        from loraflow.cli import _quiet_environment

        _quiet_environment()  # the same environment `loraflow` sets (threads, no telemetry)
        from loraflow.core.config import load_config
        from loraflow.core.paths import Paths

        cfg, paths = load_config("params.yaml"), Paths.at(Path.cwd())
        import loraflow.tasks.evaluate
        import loraflow.tasks.merge
        import loraflow.tasks.prepare
        import loraflow.tasks.train

        for name in STAGES:
            getattr(tasks, name).run(cfg, paths)
        code = 0
    record.write_text(json.dumps({"total": t.total, "marks": t.marks, "parallel": t.parallel,
                                  "end": time.time() - t.t0}))
    if side == "pipeline":
        from loraflow.cli import exit_fast

        exit_fast(code)  # the `loraflow` console script's own exit (loraflow.cli.console)
    return code


def _add_to_record(record: Path, key: str, value: float) -> None:
    data = json.loads(record.read_text())
    record.write_text(json.dumps(data | {key: value}))


# --------------------------------------------------------------------------------------------- parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", default="/tmp/loraflow-bench-overhead")
    ap.add_argument("--child", choices=["pipeline", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    ap.add_argument("--report", metavar="JSON", help="print the tables of an earlier run's results file again")
    args = ap.parse_args()
    if args.child:
        return child(args.child, Path(args.record))
    # Only past here: a child must import the project copy's code (PYTHONPATH), not this checkout's.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        _print(saved["runs"], saved["machine"].get("load_averages") or [])
        return 0

    import subprocess

    from bench.pipeline_project import (
        ROOT,
        env_for,
        fresh_project,
        machine,
        write_result,
    )

    work = Path(args.work)
    logs = work / "logs"
    runs: dict[str, list[dict]] = {"pipeline": [], "plain": []}
    loads: list[float] = []
    for rep in range(args.reps):
        for side in (["plain", "pipeline"] if rep % 2 == 0 else ["pipeline", "plain"]):
            project = fresh_project(work / side)
            logs.mkdir(parents=True, exist_ok=True)
            record, log = logs / f"{side}-{rep}.json", logs / f"{side}-{rep}.log"
            env = env_for(project, BENCH_T0=repr(time.time()))
            loads.append(os.getloadavg()[0])
            start = time.perf_counter()
            with log.open("w") as fh:
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", side,
                                       "--record", str(record)], cwd=project, env=env, stdout=fh,
                                      stderr=subprocess.STDOUT)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                raise SystemExit(f"{side} run failed (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
            data = json.loads(record.read_text()) | {"wall": wall}
            runs[side].append(data)
            print(f"  rep {rep}: {side} {wall:.1f} s", file=sys.stderr, flush=True)

    rows, pipe, plain, overhead, direct = _print(runs, loads)
    out = write_result("overhead", {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"bench/overhead.py --reps {args.reps}", "machine": machine() | {"load_averages": loads},
        "pipeline_s": pipe, "plain_s": plain, "overhead": round(overhead, 4), "goal": GOAL, "met": overhead <= GOAL,
        "orchestration_only": direct, "rows": rows, "runs": runs,
        "note": "medians of alternating runs, fresh project and process each; the machine may be shared (docs/traps.md §8)",
    })
    print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)
    return 0


def _print(runs: dict[str, list[dict]], loads: list[float]) -> tuple[list[dict], float, float, float, dict]:
    """The breakdown table and the two overhead figures; returns them for the results file."""
    from bench.pipeline_project import median

    rows = _breakdown(runs)
    pipe, plain = median([r["wall"] for r in runs["pipeline"]]), median([r["wall"] for r in runs["plain"]])
    overhead = (pipe - plain) / pipe
    print("\n| part | plain s | loraflow run s | difference s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {_s(r['plain'])} | {_s(r['pipeline'])} | {_s(r['difference'])} |")
    print(f"\noverhead (difference of the median wall times): {pipe - plain:.1f} s of {pipe:.1f} s = {overhead:.1%} "
          f"(goal <= {GOAL:.0%}: {'met' if overhead <= GOAL else 'missed'}); medians of {len(runs['plain'])} "
          "alternating runs")
    # Robust to the stages' own noise: the time each pipeline run spent in parts the plain script has
    # none of (imports of prefect and mlflow, waiting for the server, MLflow, lints, register).
    only = [IMPORT_OPS, WAIT_SERVER, "MLflow", "lints (planner)", "register: MLflow model logging", "stage:register"]
    shares = [sum(r["total"].get(p, 0.0) for p in only) / r["wall"] for r in runs["pipeline"]]
    secs = [sum(r["total"].get(p, 0.0) for p in only) for r in runs["pipeline"]]
    direct = {"seconds_median": median(secs), "share_median": round(sorted(shares)[len(shares) // 2], 4)}
    print(f"orchestration-only parts of each loraflow run (imports of prefect and mlflow, waiting for the "
          f"server, MLflow, lints, register): median {direct['seconds_median']:.1f} s = "
          f"{direct['share_median']:.1%} of its wall time")
    # The training loop is the same code on both sides and the noisiest part (this machine's slow
    # spells move it by +-8 s between runs: docs/traps.md §8); the overhead outside it, over the median wall:
    if all(TRAIN_LOOP in r["total"] for rs in runs.values() for r in rs):
        outside = {side: median([r["wall"] - r["total"][TRAIN_LOOP] for r in rs]) for side, rs in runs.items()}
        direct["outside_train_loop_s"] = {k: round(v, 2) for k, v in outside.items()}
        direct["outside_train_loop_overhead"] = round((outside["pipeline"] - outside["plain"]) / pipe, 4)
        print(f"outside the training loop (same code both sides, its noise left out): loraflow run "
              f"{outside['pipeline']:.1f} s, plain {outside['plain']:.1f} s (medians): "
              f"{outside['pipeline'] - outside['plain']:.1f} s = {direct['outside_train_loop_overhead']:.1%} "
              "of the median loraflow run")
    exits = [r["exit_handlers_done"] - r["end"] for r in runs["pipeline"] if "exit_handlers_done" in r]
    if exits:
        print(f"loraflow run's exit (threads, exit handlers, server stop) per run: {', '.join(f'{x:.1f}' for x in exits)} s")
    if loads:
        print(f"load average (1 min) at each run's start: {', '.join(f'{x:.1f}' for x in loads)} "
              f"on {os.cpu_count()} cores")
    return rows, pipe, plain, overhead, direct


def _breakdown(runs: dict[str, list[dict]]) -> list[dict]:
    """Median seconds per part for each side; 'rest' is the wall time no timer covered."""
    from bench.pipeline_project import median

    parts = [IMPORT_ML] + [f"stage:{s}" for s in STAGES] + [TRAIN_LOOP] + [
        "register: MLflow model logging", "stage:register", "MLflow", "lints (planner)", IMPORT_OPS, WAIT_SERVER]
    labels = {f"stage:{s}": f"{s} (the stage itself)" for s in STAGES} | {
        "stage:train": "train (the stage itself, but its training loop)",
        "stage:register": "register: registry, gate (rest of the stage)",
        "MLflow": "MLflow: run, params, metrics, artifacts, hand-over"}

    def rest(r: dict) -> float:
        return r["wall"] - sum(r["total"].get(p, 0.0) for p in parts)

    def first_stage(r: dict) -> float:
        return r["marks"].get("stage:prepare start", 0.0)

    rows = []
    for p in parts:
        vals = {side: median([r["total"].get(p, 0.0) for r in rs]) for side, rs in runs.items()}
        rows.append({"part": labels.get(p, p), **vals})
    rows.append({"part": "rest: Prefect flow and task runs, other imports, process exit", **{
        side: median([rest(r) for r in rs]) for side, rs in runs.items()}})
    rows.append({"part": "(not in the sum: process start to the first stage)", **{
        side: median([first_stage(r) for r in rs]) for side, rs in runs.items()}})
    rows.append({"part": "**total (wall)**", **{side: median([r["wall"] for r in rs]) for side, rs in runs.items()}})
    for r in rows:
        r["difference"] = (round(r["pipeline"] - r["plain"], 2)
                           if r.get("plain") is not None and r.get("pipeline") is not None else None)
    return rows


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


if __name__ == "__main__":
    sys.exit(main())
