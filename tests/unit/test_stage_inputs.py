"""fingerprint.stage_inputs: what each stage's result depends on, and the keys built from it."""

from __future__ import annotations

import json

import pytest

from loraflow.core import fingerprint
from loraflow.core.config import load_config
from loraflow.core.paths import Paths


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project with a raw data file and a prepare report; code and base digests pinned to constants."""
    monkeypatch.setattr(fingerprint, "code_digest", lambda: "c0de")
    monkeypatch.setattr(fingerprint, "base_digest", lambda cfg, paths: "ba5e")
    (tmp_path / "data.jsonl").write_text('{"instruction": "hi", "output": "there"}\n', encoding="utf-8")
    paths = Paths.at(tmp_path)
    paths.reports.mkdir(parents=True)
    paths.report("prepare").write_text(json.dumps({"dataset_digest": "da7a"}), encoding="utf-8")
    return paths


def _cfg(*overrides: str):
    return load_config(None, ["data.path=data.jsonl", *overrides])


def test_training_inputs_change_with_what_changes_weights_and_nothing_else(project):
    base = fingerprint.stage_inputs("train", _cfg(), project)
    assert base["data"] == "da7a" and base["base"] == "ba5e" and base["code"] == "c0de"  # the reported digest
    same = ["eval.num_samples=7", "merge.tolerance=0.5", "register.min_delta=0.1", "orchestration.retries=0"]
    for override in same:
        assert fingerprint.stage_inputs("train", _cfg(override), project) == base, override
    for override in ("lora.r=8", "train.learning_rate=0.01", "data.max_length=64", "method=lora"):
        assert fingerprint.stage_inputs("train", _cfg(override), project) != base, override
    assert fingerprint.stage_inputs("train", _cfg(), project, dataset="other")["data"] == "other"


def test_prepare_keys_on_the_raw_file_and_a_hub_dataset_is_not_keyed(project):
    inputs = fingerprint.stage_inputs("prepare", _cfg(), project)
    assert inputs["source"] == fingerprint.file_md5(project.root / "data.jsonl")
    assert fingerprint.stage_inputs("prepare", _cfg("data.path=org/some-dataset"), project) is None


def test_evaluate_and_merge_need_an_adapter_and_a_test_split(project):
    assert fingerprint.stage_inputs("evaluate", _cfg(), project) is None
    project.adapter.mkdir(parents=True)
    (project.adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    project.prepared.mkdir(parents=True)
    project.split("test").write_text('{"id": "1"}\n', encoding="utf-8")
    evaluate = fingerprint.stage_inputs("evaluate", _cfg(), project)
    assert evaluate["adapter"] == fingerprint.dataset_digest(project.adapter)
    assert fingerprint.stage_inputs("evaluate", _cfg("eval.num_samples=7"), project) != evaluate
    merge = fingerprint.stage_inputs("merge", _cfg(), project)
    assert fingerprint.stage_inputs("merge", _cfg("eval.num_samples=7"), project) == merge  # merge reads no eval.*
    project.report("evaluate").write_text("{}", encoding="utf-8")
    assert fingerprint.stage_inputs("merge", _cfg(), project)["evaluate_report"] is not None


def test_the_lineage_key_is_the_one_registries_already_hold(project):
    """Versions registered before stage_inputs carry a lineage key of (config, data, code, base): the
    same inputs must give the same key, or a re-run would register every model a second time."""
    from loraflow.track.lineage import lineage

    tags, key = lineage(_cfg(), project)
    assert tags["dataset_digest"] == "da7a" and tags["code_digest"] == "c0de" and tags["base_digest"] == "ba5e"
    old = json.dumps({"config": _cfg().model_dump(mode="json"), "data": "da7a", "code": "c0de", "base": "ba5e"},
                     sort_keys=True)
    import hashlib

    assert key == hashlib.sha256(old.encode()).hexdigest()[:32]

    # the flow hands prepare's returned digest on: that value is what the version is tagged and keyed with
    passed, passed_key = lineage(_cfg(), project, dataset="f10w")
    assert passed["dataset_digest"] == "f10w" and passed_key != key
