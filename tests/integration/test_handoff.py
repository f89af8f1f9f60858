"""Stages on different machines hand over through the MLflow run: loraflow/handoff.py on a real (sqlite) store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraflow.core.atomic import write_json
from loraflow.core.paths import Paths
from loraflow.track import handoff, tracking

pytestmark = pytest.mark.slow  # an MLflow sqlite store is created per test (~5-20 s on a shared box)


def _cpu_box(tmp_path: Path, monkeypatch) -> tuple[Paths, str]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/store/mlflow.db")
    (tmp_path / "store").mkdir()
    cpu = Paths.at(tmp_path / "cpu")
    cpu.prepared.mkdir(parents=True)
    for split, n in (("train", 5), ("val", 1), ("test", 2)):
        cpu.split(split).write_text("".join(json.dumps({"id": f"{split}{i}", "prompt": "p", "completion": "c"}) + "\n"
                                            for i in range(n)))
    write_json(cpu.report("prepare"), {"dataset_digest": "x", "records_kept": 8})
    run_id = tracking.start_run(cpu, "handoff", "handoff").run_id
    return cpu, run_id


def test_prepared_data_and_adapter_round_trip_by_run_id(tmp_path, monkeypatch):
    cpu, run_id = _cpu_box(tmp_path, monkeypatch)
    digest = handoff.upload_prepared(cpu, run_id)

    gpu = Paths.at(tmp_path / "gpu")  # another folder, sharing nothing with cpu/
    assert handoff.download_prepared(gpu, run_id) == digest
    for split in ("train", "val", "test"):
        assert gpu.split(split).read_bytes() == cpu.split(split).read_bytes()
    assert json.loads(gpu.report("prepare").read_text())["records_kept"] == 8
    assert sorted(p.name for p in gpu.prepared.iterdir()) == ["test.jsonl", "train.jsonl", "val.jsonl"]

    # the gpu box trains and hands the adapter back; the cpu box downloads it for evaluate/merge
    gpu.adapter.mkdir(parents=True)
    (gpu.adapter / "adapter_config.json").write_text('{"r": 16}')
    (gpu.adapter / "adapter_model.safetensors").write_bytes(b"weights")
    write_json(gpu.report("train"), {"steps": 3, "mlflow_run_id": run_id})
    assert handoff.upload_adapter(gpu, run_id) is True
    assert handoff.upload_adapter(gpu, run_id) is False  # already there (e.g. logged by the train stage)
    handoff.download_adapter(cpu, run_id)
    assert (cpu.adapter / "adapter_model.safetensors").read_bytes() == b"weights"
    assert json.loads(cpu.report("train").read_text())["steps"] == 3
    assert handoff.read_json_artifact(cpu, run_id, "reports/train.json")["steps"] == 3


def test_a_corrupt_or_missing_handoff_is_one_clear_error(tmp_path, monkeypatch):
    cpu, run_id = _cpu_box(tmp_path, monkeypatch)
    gpu = Paths.at(tmp_path / "gpu")
    with pytest.raises(handoff.HandoffError, match="has no prepared data"):
        handoff.download_prepared(gpu, run_id)
    with pytest.raises(handoff.HandoffError, match="has no adapter/ artifact"):
        handoff.download_adapter(gpu, run_id)
    with pytest.raises(handoff.HandoffError, match="not found in .*set MLFLOW_TRACKING_URI"):
        handoff.download_prepared(gpu, "0" * 32)

    handoff.upload_prepared(cpu, run_id)
    stored = next((tmp_path / "cpu" / "mlflow").rglob("prepared/train.jsonl"), None) or \
        next(tmp_path.rglob("artifacts/prepared/train.jsonl"))
    stored.write_text(stored.read_text() + '{"id": "extra"}\n')  # the upload changed under us
    with pytest.raises(handoff.HandoffError, match="digest"):
        handoff.download_prepared(gpu, run_id)
    assert not gpu.prepared.exists()  # nothing half-downloaded is left for a stage to read
