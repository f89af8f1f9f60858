"""Two pipelines at once in one project: the second waits for the first (a per-project lock), then
both finish, each MLflow run carries its own params and the registry holds a version of each.
A project folder that cannot be written is one line at the lock."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from loraflow.core.lock import LOCK_FILE
from tests.reliability.conftest import (
    BIN,
    alpaca,
    kill,
    start,
    wait_for,
    write_params,
    write_prepared,
    write_raw,
)

pytestmark = pytest.mark.slow


def flow_runs(api: str) -> list[dict]:
    """Every flow run on the Prefect server, as its REST API returns them."""
    import httpx

    r = httpx.post(f"{api}/flow_runs/filter", json={"limit": 200}, timeout=30)
    r.raise_for_status()
    return r.json()


PASSWORD = "plantedPwC7"  # in the second run's -s override: must never reach the Prefect API


@pytest.fixture(scope="module")
def two_pipelines(tmp_path_factory, tiny_models, prefect_api) -> SimpleNamespace:
    """Two `loraflow run` at once in one project, other params, one real Prefect server; the second
    carries a database URI with a password in a `-s` override."""
    tmp = tmp_path_factory.mktemp("two-pipelines")
    root = tmp / "p"
    write_params(root, tiny_models["llama"], register={"model_name": "concurrent"})
    write_raw(root, [alpaca(i) for i in range(24)])
    lock = root / LOCK_FILE
    logs = [tmp / "a.log", tmp / "b.log"]
    server = {"PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp / "prefect-home")}
    first = start([str(BIN / "loraflow"), "run", "-s", "lora.r=4"], root, logs[0], server)
    procs = [first]
    try:
        # The second starts once the first holds the lock (its pid in the file): the order is known.
        wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), first, 60, logs[0],
                 "the first run's pid in the lock file")
        second = start([str(BIN / "loraflow"), "run", "-s", "lora.r=2",
                        "-s", f"data.fields.prompt=postgresql://loader:{PASSWORD}@db/x"], root, logs[1], server)
        procs.append(second)
        end = time.monotonic() + 400
        for proc, log in zip(procs, logs):
            proc.wait(timeout=max(1.0, end - time.monotonic()))
            assert proc.returncode == 0, log.read_text()[-4000:]
    finally:
        for proc in procs:
            kill(proc)
    ours = [r for r in flow_runs(prefect_api) if r["parameters"].get("root") == str(root)]
    return SimpleNamespace(root=root, logs=logs, pids=[p.pid for p in procs], api=prefect_api, flow_runs=ours)


def test_two_pipelines_in_one_project_run_one_after_the_other_and_register_two_versions(two_pipelines):
    """The second waits for the first's lock, both finish, and the registry holds two new versions, each
    from its own MLflow run."""
    from mlflow import MlflowClient

    root, logs = two_pipelines.root, two_pipelines.logs
    out_b = logs[1].read_text()
    assert f"loraflow: waiting for another loraflow run in this project (pid {two_pipelines.pids[0]})" in out_b, \
        out_b[-3000:]
    assert "waiting for another" not in logs[0].read_text()
    # The second finished last: the project's reports and adapter are its own (r=2), complete.
    report = json.loads((root / "reports" / "train.json").read_text())
    assert report["lora_r"] == 2 and report["steps"] == 4, report
    assert json.loads((root / "outputs" / "adapter" / "adapter_config.json").read_text())["r"] == 2

    # Two new versions, each registered from the MLflow run that trained it with its own rank.
    cl = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    versions = cl.search_model_versions("name='concurrent'")
    assert len(versions) == 2, [(v.version, v.tags) for v in versions]
    for v in versions:
        run = cl.get_run(v.run_id)
        assert run.info.status == "FINISHED"
        assert v.tags["lora_r"] == run.data.params["lora_r"], (v.tags, run.data.params)
    assert sorted(v.tags["lora_r"] for v in versions) == ["2", "4"]
    registered = json.loads((root / "reports" / "register.json").read_text())
    assert registered["name"] == "concurrent" and registered["lineage"]["lora_r"] == "2"
    # Both pipelines, and the train subflow of each, are Completed flow runs on the one server.
    ours = two_pipelines.flow_runs
    for kind in ([r for r in ours if "run_id" not in r["parameters"]], [r for r in ours if "run_id" in r["parameters"]]):
        assert [r["state_type"] for r in kind] == ["COMPLETED", "COMPLETED"], ours
    assert (root / LOCK_FILE).read_text().strip() == str(two_pipelines.pids[1])


def test_a_secret_override_is_never_a_prefect_parameter_not_even_before_the_flow_starts(two_pipelines):
    """`loraflow run -s data.fields.prompt=postgresql://loader:PW@db/x`: the flow run is created with the
    reference ${env:LORAFLOW_SECRET_DATA_FIELDS_PROMPT} (the flow's own redaction at start would have
    left `loader:***@`, so the stored reference is what creation stored), the value reaches the flow
    through the process environment (MLflow logs it, redacted), and neither the flow runs, their task
    runs, logs and artifacts on the server nor the command's output hold the password."""
    import httpx

    from mlflow import MlflowClient

    ref = "${env:LORAFLOW_SECRET_DATA_FIELDS_PROMPT}"
    api, root = two_pipelines.api, two_pipelines.root
    second = [r for r in two_pipelines.flow_runs if r["parameters"]["config"]["lora"]["r"] == 2]
    assert len(second) == 2  # the pipeline and its train subflow
    for run in second:
        assert run["parameters"]["config"]["data"]["fields"]["prompt"] == ref, run["parameters"]
    # the flow resolved it: the MLflow run logged the real value, through tracking.redact
    cl = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run_id = json.loads((root / "reports" / "train.json").read_text())["mlflow_run_id"]
    assert cl.get_run(run_id).data.params["config.data.fields"] == '{"prompt": "postgresql://loader:***@db/x"}'

    ids = [r["id"] for r in two_pipelines.flow_runs]
    dumps = [json.dumps(two_pipelines.flow_runs)]
    for path, body in (("task_runs/filter", {"flow_runs": {"id": {"any_": ids}}}),
                       ("logs/filter", {"logs": {"flow_run_id": {"any_": ids}}}),
                       ("artifacts/filter", {})):
        r = httpx.post(f"{api}/{path}", json=body | {"limit": 200}, timeout=30)
        r.raise_for_status()
        assert r.json() or path == "artifacts/filter", path
        dumps.append(r.text)
    dumps += [log.read_text() for log in two_pipelines.logs]
    assert not any(PASSWORD in d for d in dumps)


def test_the_lock_of_a_killed_run_does_not_block_the_next(tmp_path):
    """flock dies with its holder: a pid left in the file by a kill -9 never blocks a later run."""
    import subprocess
    import sys

    from loraflow.core.lock import project_lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from loraflow.core.lock import project_lock\n"
        f"with project_lock(Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        kill(holder)
    t = time.monotonic()
    with project_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().strip() != ""
    assert time.monotonic() - t < 2



def test_a_read_only_project_is_one_line_not_a_traceback(tmp_path, tiny_llama):
    """A project folder that cannot be written: `loraflow stage` and `loraflow run` stop at the lock file
    with one line (the lock's path, why, how to fix), exit 1, and write nothing. chmod does not stop root:
    as root the folder is bind-mounted read-only in a private mount namespace of the command alone
    (`unshare -m`; nothing changes outside it), as another user it is chmod 555."""
    import os
    import shutil
    import subprocess

    from tests.reliability.conftest import env, error_line

    root = tmp_path / "ro"
    write_params(root, tiny_llama)
    write_prepared(root)
    if os.geteuid() == 0:
        if not shutil.which("unshare"):
            pytest.skip("running as root without unshare(1): no way to make a folder read-only for root")
        prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                  'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && shift && exec "$@"', str(root), "--"]
        why = "Read-only file system"
    else:
        prefix, why = [], "Permission denied"
        for d, _, _ in os.walk(root):
            os.chmod(d, 0o555)
    try:
        probe = subprocess.run([*prefix, "touch", str(root / "probe")], capture_output=True, text=True)
        if probe.returncode == 0 or why not in probe.stderr:
            pytest.skip(f"cannot make {root} read-only here: {probe.stderr.strip()[-300:]}")
        before = sorted(p.relative_to(root) for p in root.rglob("*"))
        for argv in (["stage", "prepare"], ["stage", "train"], ["run"]):
            r = subprocess.run([*prefix, str(BIN / "loraflow"), *argv], cwd=root, capture_output=True, text=True,
                               timeout=120, env=env(root))
            assert r.returncode == 1, (argv, r.stderr[-3000:])
            assert error_line(r.stderr) == (
                f"loraflow: error: cannot write the project lock {root / LOCK_FILE} ({why}): loraflow writes "
                f"data/prepared, outputs/ and reports/ in the project folder; make {root} writable (chmod u+w) or "
                "run from a writable copy of the project"), argv
        assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written
    finally:
        for d, _, _ in os.walk(root):
            os.chmod(d, 0o755)
