"""What the pipeline benches (overhead.py, noop_rerun.py) share: a fresh project copy and timed commands.

A bench never runs in the checkout itself: it copies the project (the files git knows, tracked and
untracked-but-not-ignored) into a temporary folder, with the embedded base model from
``models/base`` (built there first when missing: `make run` builds it), and runs there. The copy's
own code is put first on PYTHONPATH, so the bench measures the code it copied even while the
checkout is being edited.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"


def fresh_project(dest: Path) -> Path:
    """Copy the project into ``dest`` (replaced), with a built ``models/base``, as a git repository."""
    base = ROOT / "models" / "base"
    if not (base / "model.safetensors").exists():
        subprocess.run([str(VENV_BIN / "loraflow"), "build-base"], cwd=ROOT, check=True)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    shutil.copytree(base, dest / "models" / "base")
    git = ["git", "-c", "user.email=bench@loraflow", "-c", "user.name=bench"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True, capture_output=True)
    subprocess.run(git + ["commit", "-qm", "bench copy"], cwd=dest, check=True)
    return dest


def env_for(project: Path, **extra: str) -> dict[str, str]:
    """The environment a user's shell would give `loraflow run` in ``project``, the copy's code first."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env["PYTHONPATH"] = str(project)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run ``cmd``: its wall time and its CPU time (user + sys of it and every process it waited for,
    the Prefect server too), in seconds. On a busy shared machine the CPU time moves far less than the
    wall time. Output goes to ``log``; a failure raises with its tail."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "load_average_at_start": load}


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """``bench/results/<name>-<date>-cpu.json``, written to a temp file and renamed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}-{datetime.date.today().isoformat()}-cpu.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out
