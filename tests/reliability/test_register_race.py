"""Two projects on one registry register the same lineage (data, params, code) at once: one version.

The per-project lock cannot serialize them (they are different folders); both find no version with
their lineage key before logging their model. The test makes the race certain rather than likely:
it holds the registry's gate lock itself while both `loraflow stage register` processes log their
models, and lets go only once both have.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from loraflow.core.atomic import write_json
from loraflow.core.paths import Paths
from loraflow.track.registry import LOCK_SUFFIX
from tests.reliability.conftest import BIN, kill, start, write_params

pytestmark = pytest.mark.slow

NAME = "race"


def _project(root, model_dir) -> None:
    """What prepare, evaluate and merge leave behind (the merged model: a real tiny one)."""
    write_params(root, model_dir, register={"model_name": NAME})
    paths = Paths.at(root)
    shutil.copytree(model_dir, paths.merged)
    write_json(paths.report("prepare"), {"format": "alpaca", "dataset_digest": "same-data"})
    write_json(paths.report("evaluate"), {"base": {"exact_match": 0.0}, "tuned": {"exact_match": 0.5}})
    write_json(paths.report("merge"), {"max_abs_logit_diff": 0.0, "loss": 1.0, "loss_delta": 0.0})


def _logged_models(cl) -> int:
    exp = cl.get_experiment_by_name(NAME)
    if exp is None:
        return 0
    return sum("READY" in str(m.status) for m in cl.search_logged_models(experiment_ids=[exp.experiment_id]))


def test_same_lineage_from_two_projects_at_once_registers_one_version(tmp_path, tiny_llama):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    cl = MlflowClient(tracking_uri=uri, registry_uri=uri)
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        _project(root, tiny_llama)
    cl.create_registered_model(NAME + LOCK_SUFFIX)  # the gate is held: neither may pass it yet

    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start([str(BIN / "loraflow"), "stage", "register"], root, log, {"MLFLOW_TRACKING_URI": uri})
             for root, log in zip(roots, logs)]
    try:
        end = time.monotonic() + 240
        while _logged_models(cl) < 2:  # both have logged their model: both are past the lineage check
            for proc, log in zip(procs, logs):
                assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < end, [log.read_text()[-2000:] for log in logs]
            time.sleep(0.1)
        assert cl.search_model_versions(f"name='{NAME}'") == []  # no version while the gate is held
        cl.delete_registered_model(NAME + LOCK_SUFFIX)
        for proc, log in zip(procs, logs):
            assert proc.wait(timeout=240) == 0, log.read_text()[-4000:]
    finally:
        for proc in procs:
            kill(proc)

    versions = cl.search_model_versions(f"name='{NAME}'")
    assert [str(v.version) for v in versions] == ["1"], [(v.version, v.run_id) for v in versions]
    reports = [json.loads((root / "reports" / "register.json").read_text()) for root in roots]
    assert sorted(r["decision"] for r in reports) == ["already-registered", "promoted"]
    assert {r["version"] for r in reports} == {"1"}
    out = [log.read_text() for log in logs]
    assert sum("already holds this data, params and code" in o for o in out) == 1, out
    assert str(cl.get_model_version_by_alias(NAME, "champion").version) == "1"
