"""No-op re-run: with nothing changed, `dvc repro` and a second `loraflow run` should do (almost) nothing.

    .venv/bin/python bench/noop_rerun.py [--reps 3] [--work /tmp/loraflow-bench-noop]

Two fresh copies of the project (bench/pipeline_project.py), one per tool, because each tool's
outputs look like changes to the other (a `loraflow run` reusing its cached adapter rewrites
outputs/adapter and reports/train.json that dvc.lock recorded from `dvc repro`'s own training):

- dvc copy: `dvc repro` once (the full pipeline), then `dvc repro` again ``--reps`` times;
- loraflow copy: `loraflow run` once, then `loraflow run` again ``--reps`` times.

The timed re-runs alternate between the copies (the machine is shared; medians). Each re-run is
checked, not just timed: `dvc repro` may only run the always-changed `base-digest` stage; a
`loraflow run` must leave train, evaluate and merge Cached (the ``<stage>_cached_from`` tags of its
MLflow run), register nothing new, and leave ``@champion`` on the same version.
Prints a table and writes ``bench/results/noop_rerun-<date>-cpu.json``. Goals (issue 8): `dvc repro`
<= 3 s, `loraflow run` <= 15 s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.pipeline_project import (  # noqa: E402
    ROOT,
    VENV_BIN,
    env_for,
    fresh_project,
    machine,
    median,
    timed,
    write_result,
)

GOALS = {"dvc repro": 3.0, "loraflow run": 15.0}
MODEL = "loraflow-demo"  # register.model_name in params.yaml
ALWAYS_RUNS = {"base-digest"}  # dvc.yaml's always_changed stage (which weights model.base is)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", default="/tmp/loraflow-bench-noop")
    args = ap.parse_args()
    work = Path(args.work)
    logs = work / "logs"
    dvc_p, run_p = fresh_project(work / "dvc"), fresh_project(work / "run")
    logs.mkdir(parents=True, exist_ok=True)
    dvc_env, run_env = env_for(dvc_p), env_for(run_p)
    dvc, loraflow = [str(VENV_BIN / "dvc"), "repro"], [str(VENV_BIN / "loraflow"), "run"]

    print("first runs (full pipeline, not timed for the goal) ...", file=sys.stderr)
    first = {"dvc repro": timed(dvc, dvc_p, dvc_env, logs / "dvc-first.log")[0],
             "loraflow run": timed(loraflow, run_p, run_env, logs / "run-first.log")[0]}
    champion = _champion(run_p)
    times: dict[str, list[float]] = {"dvc repro": [], "loraflow run": []}
    cpu: dict[str, list[float]] = {"dvc repro": [], "loraflow run": []}
    loads: list[float] = []
    checks: list[dict] = []
    for rep in range(args.reps):
        order = ["dvc repro", "loraflow run"] if rep % 2 == 0 else ["loraflow run", "dvc repro"]
        for what in order:
            log = logs / f"{what.replace(' ', '-')}-{rep}.log"
            loads.append(os.getloadavg()[0])
            if what == "dvc repro":
                wall, cpu_s = timed(dvc, dvc_p, dvc_env, log)
                times[what].append(wall)
                cpu[what].append(cpu_s)
                ran = sorted(set(re.findall(r"Running stage '([^']+)'", log.read_text())) - ALWAYS_RUNS)
                checks.append({"rep": rep, "what": what, "stages_run": ran, "ok": not ran})
            else:
                wall, cpu_s = timed(loraflow, run_p, run_env, log)
                times[what].append(wall)
                cpu[what].append(cpu_s)
                checks.append({"rep": rep, "what": what, **_check_run(run_p, champion)})
            print(f"  rep {rep}: {what} {times[what][-1]:.1f} s wall, {cpu[what][-1]:.1f} s CPU, load "
                  f"{loads[-1]:.1f}  {checks[-1]}", file=sys.stderr)

    rows = [{"command": what, "first_run_s": round(first[what], 1), "rerun_median_s": median(times[what]),
             "reruns_s": [round(t, 2) for t in times[what]], "goal_s": GOALS[what],
             "rerun_cpu_median_s": median(cpu[what]), "reruns_cpu_s": [round(t, 2) for t in cpu[what]],
             "met": median(times[what]) <= GOALS[what],
             "did_nothing": all(c["ok"] for c in checks if c["what"] == what)} for what in GOALS]
    print("\n| command (nothing changed) | first run s | re-run s, median (runs) | re-run CPU s, median | goal "
          "| did nothing |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| `{r['command']}` | {r['first_run_s']} | **{r['rerun_median_s']}** "
              f"({', '.join(f'{t:.1f}' for t in r['reruns_s'])}) | {r['rerun_cpu_median_s']} | <= {r['goal_s']:g} s "
              f"{'met' if r['met'] else 'missed'} | {'yes' if r['did_nothing'] else 'NO'} |")
    print(f"\nload average (1 min) at each re-run: {', '.join(f'{x:.1f}' for x in loads)} on {os.cpu_count()} cores")
    out = write_result("noop_rerun", {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"{Path(sys.executable).relative_to(ROOT) if ROOT in Path(sys.executable).parents else sys.executable} "
                   f"bench/noop_rerun.py --reps {args.reps}",
        "machine": machine(), "champion_version": champion, "rows": rows, "checks": checks, "load_averages": loads,
        "note": "median of alternating re-runs; the machine may be shared (docs/traps.md §8)",
    })
    print(f"\nwrote {out.relative_to(ROOT)}", file=sys.stderr)
    return 0 if all(r["did_nothing"] for r in rows) else 1


def _client(project: Path):
    from loraflow.core.paths import Paths
    from loraflow.track import tracking

    return tracking.client(Paths.at(project))


def _champion(project: Path) -> str | None:
    from loraflow.track import registry

    return registry.alias_version(_client(project), MODEL, registry.CHAMPION)


def _check_run(project: Path, champion: str | None) -> dict:
    """The latest MLflow run of ``project``: which stages it reused, and where @champion points now."""
    cl = _client(project)
    exp = cl.get_experiment_by_name(MODEL)
    run = cl.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)[0]
    cached = {s: s + "_cached_from" in run.data.tags for s in ("train", "evaluate", "merge")}
    versions = len(cl.search_model_versions(f"name='{MODEL}'"))
    now = _champion(project)
    return {"cached": cached, "versions": versions, "champion": now,
            "ok": all(cached.values()) and now == champion and versions == 1}


if __name__ == "__main__":
    sys.exit(main())
