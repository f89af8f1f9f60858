"""The contract's run tags, end to end: `loraflow stage train` (what dvc repro runs) in a git project with a
dvc.lock records the commit and the lock's digest on its MLflow run, as they are when the run starts."""

from __future__ import annotations

import json

import pytest

from tests.tiny import alpaca_records
from tests.unit.test_fingerprint import LOCK, LOCK_MD5, git

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_stage_train_tags_its_run_with_the_commit_and_the_dvc_lock(tmp_path, tiny_llama, monkeypatch):
    from loraflow import cli
    from loraflow.core.paths import Paths
    from loraflow.track import tracking
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own sqlite store
    root = tmp_path / "project"
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "tiny.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca_records(30)))
    params = root / "params.yaml"
    params.write_text(
        f"model:\n  base: {tiny_llama}\ndata:\n  path: data/raw/tiny.jsonl\n  max_length: 64\nmethod: lora\n"
        "lora:\n  r: 4\n  alpha: 8\ntrain:\n  max_steps: 2\n  batch_size: 4\n  logging_steps: 1\n"
        "register:\n  model_name: tags\n"
    )
    (root / "dvc.lock").write_bytes(LOCK)
    git(root, "init", "-q")
    git(root, "add", "params.yaml", "data/raw/tiny.jsonl", "dvc.lock")
    git(root, "commit", "-q", "-m", "project")
    head = git(root, "rev-parse", "HEAD")
    monkeypatch.chdir(tmp_path)  # not the project: the tags are the project's, wherever the command runs
    paths = Paths.at(root)
    client = MlflowClient(tracking_uri=tracking.tracking_uri(paths))

    def train_run_tags() -> dict[str, str]:
        assert cli.main(["stage", "train", "-c", str(params)]) == 0
        run_id = json.loads(paths.report("train").read_text())["mlflow_run_id"]
        return client.get_run(run_id).data.tags

    assert cli.main(["stage", "prepare", "-c", str(params)]) == 0  # writes only untracked files
    tags = train_run_tags()
    assert tags["git_commit"] == head and tags["dvc_lock_digest"] == LOCK_MD5

    # A tracked file edited and another dvc.lock: the next run says so.
    params.write_text(params.read_text().replace("max_steps: 2", "max_steps: 3"))
    (root / "dvc.lock").write_bytes(b"")
    tags = train_run_tags()
    assert tags["git_commit"] == f"{head}-dirty" and tags["dvc_lock_digest"] == "d41d8cd98f00b204e9800998ecf8427e"
