"""``loraflow deploy``: the work pools and the deployments of prefect.yaml, on the Prefect server in use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loraflow.core.errors import LoraflowError

POOLS = ("cpu", "gpu")


def deploy(project: Path) -> int:
    """Create the work pools (when missing) and every deployment of prefect.yaml, against PREFECT_API_URL."""
    from prefect.settings import PREFECT_API_URL

    project = Path(project).resolve()
    if not (project / "prefect.yaml").exists():
        raise LoraflowError(f"deploy: {project}/prefect.yaml not found; run in the project folder or pass --project")
    url = PREFECT_API_URL.value()
    if not url:
        raise LoraflowError("deploy: no Prefect server set (PREFECT_API_URL is empty); start one with "
                            "`prefect server start` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    prefect = [sys.executable, "-m", "prefect"]

    def call(cmd: list[str], what: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(prefect + cmd, cwd=project, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = " ".join((proc.stdout + proc.stderr).split())[-400:]
            raise LoraflowError(f"deploy: {what} failed against {url}: {tail}")
        return proc

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    # = `prefect work-pool create NAME --type process` (same default job template), without a CLI start per pool
    with get_client(sync_client=True) as client:
        for pool in POOLS:
            try:
                client.read_work_pool(pool)
                print(f"work pool {pool}: exists")
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(
                    name=pool, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
                print(f"work pool {pool}: created (process)")
    call(["--no-prompt", "deploy", "--all"], "prefect deploy --all")
    print(f"deployed from {project / 'prefect.yaml'} to {url}: finetune/nightly (pool cpu), train/gpu (pool gpu)")
    print("next: `prefect worker start --pool cpu` here, `prefect worker start --pool gpu` on the GPU machine")
    return 0
