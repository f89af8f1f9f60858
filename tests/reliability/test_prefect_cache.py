"""The Prefect cache of training is keyed on everything that changes its result: the data, a
training param, the base model and the code each re-run training; an evaluation-only setting
keeps it Cached. In-process flow runs on a temporary Prefect server, a tiny model, sqlite MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loraflow.core.config import load_config
from loraflow.core.paths import Paths
from loraflow.track import tracking
from tests.reliability.conftest import alpaca, write_raw

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _overrides(base: Path) -> list[str]:
    return [f"model.base={base}", "data.path=data/raw/x.jsonl", "data.max_length=64", "train.max_steps=2",
            "train.batch_size=4", "train.save_steps=100", "train.logging_steps=1", "eval.num_samples=2",
            "eval.max_new_tokens=2", "eval.batch_size=4", "register.model_name=cachekey"]


def test_training_reruns_exactly_when_data_params_base_or_code_change(tmp_path, tiny_llama, prefect_server,
                                                                      monkeypatch):
    import loraflow.flows.finetune as ff

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "p"
    write_raw(root, [alpaca(i) for i in range(24)])
    paths = Paths.at(root)
    cl = tracking.client(paths)
    own_base = tmp_path / "base"  # a base outside the project whose weights this test rewrites in place
    shutil.copytree(tiny_llama, own_base)

    def pipeline(*extra: str, base: Path = own_base) -> tuple[bool, dict]:
        """One flow run; True when training ran in it (its own adapter), False when it was Cached."""
        out = ff.finetune(config=load_config(None, _overrides(base) + list(extra)), root=str(root))
        trained = out["train"]["adapter_run_id"] == out["mlflow_run_id"]
        tags = cl.get_run(out["mlflow_run_id"]).data.tags
        assert ("train_cached_from" in tags) is (not trained), tags  # the run says which it was
        report = json.loads(paths.report("train").read_text())
        if trained:
            assert report["mlflow_run_id"] == out["mlflow_run_id"]  # reports/train.json is this run's
        return trained, out

    assert pipeline()[0] is True
    # Unrelated to training: an evaluation setting. Cached, the adapter reused.
    trained, out = pipeline("eval.max_new_tokens=3")
    assert trained is False and (paths.adapter / "adapter_model.safetensors").exists()

    # The data: one more record in the raw file.
    write_raw(root, [alpaca(i) for i in range(25)])
    assert pipeline()[0] is True, "a data change did not re-run training"
    assert pipeline()[0] is False  # and is cached again under the new key

    # A training param.
    assert pipeline("train.learning_rate=0.003")[0] is True, "a train param change did not re-run training"

    # The base model: new weights at the same path (the key holds the sha256 of its files, not its name).
    from safetensors.torch import load_file, save_file

    tensors = load_file(own_base / "model.safetensors")
    name = sorted(tensors)[0]
    save_file({**tensors, name: tensors[name] * 1.01}, own_base / "model.safetensors", metadata={"format": "pt"})
    assert pipeline("train.learning_rate=0.003")[0] is True, "new base weights at the same path did not re-run training"

    # The code: the key's code input (what an edit of loraflow/ or tasks/ changes) is different.
    from loraflow.core import fingerprint

    real = fingerprint.code_digest()
    monkeypatch.setattr(fingerprint, "code_digest", lambda: "edited-" + real)
    assert pipeline("train.learning_rate=0.003")[0] is True, "a code change did not re-run training"
    # Nothing changed since: Cached.
    assert pipeline("train.learning_rate=0.003")[0] is False


def test_a_planted_secret_never_reaches_prefects_parameters_artifacts_or_logs(tmp_path, tiny_llama, prefect_server,
                                                                               monkeypatch):
    """A password in a config value (a URI) and a token in the environment: the flow run's stored
    parameters, its artifacts and its logs on the Prefect server hold neither (queried over its API)."""
    import loraflow.flows.finetune as ff
    from prefect.client.orchestration import get_client

    password, token = "plantedPwP4", "hf_plantedTokP5"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HF_TOKEN", token)
    root = tmp_path / "p"
    write_raw(root, [alpaca(i) for i in range(24)])
    # A field mapping alpaca ignores, holding a database URI with a password (as in test_mlflow_server).
    cfg = load_config(None, _overrides(tiny_llama) + [f"data.fields.prompt=postgresql://loader:{password}@db/x"])
    assert password in json.dumps(cfg.model_dump(mode="json"))
    state = ff.finetune(config=cfg, root=str(root), return_state=True)
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        assert run.parameters["config"]["data"]["fields"]["prompt"] == "postgresql://loader:***@db/x"
        assert run.parameters["config"]["lora"]["r"] == cfg.lora.r  # the rest is intact
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        # Every flow run (this one and its train subflow, whose config parameter held the URI too).
        dumps = [json.dumps(r.model_dump(mode="json")) for r in client.read_flow_runs()]
        assert any(json.loads(d)["parameters"].get("run_id") for d in dumps)  # the train subflow is among them
        runs = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
        dumps += [json.dumps(a.model_dump(mode="json")) for a in client.read_artifacts()]
        dumps += [json.dumps(t.model_dump(mode="json")) for t in client.read_task_runs(flow_run_filter=runs)]
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        dumps += [json.dumps(x.model_dump(mode="json"))
                  for x in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))]
    assert len(dumps) > 3
    for secret in (password, token):
        assert not any(secret in d for d in dumps), secret


def test_the_overrides_parameter_is_redacted_as_the_config_is():
    """``params`` + ``overrides`` (a deployment's JSON parameters): the same rule as the config dict."""
    from loraflow.flows.common import redacted_parameters

    got = redacted_parameters({"params": "params.yaml", "overrides": [
        "eval.max_new_tokens=4", "data.fields.prompt=postgresql://loader:pw1@db/x", "model.hf_token=hf_pw2",
        "lora.r=8"]})
    assert got == {"params": "params.yaml", "overrides": [
        "eval.max_new_tokens=4", "data.fields.prompt=postgresql://loader:***@db/x", "model.hf_token=***", "lora.r=8"]}


def test_a_rerun_with_nothing_changed_trains_evaluates_and_merges_nothing(tmp_path, tiny_llama, prefect_server,
                                                                          monkeypatch):
    """The no-op re-run (issue 8): train, evaluate and merge Cached, their metrics copied into the new
    MLflow run, the same champion; a report rewritten on disk in between makes that stage run again."""
    import loraflow.flows.finetune as ff

    from loraflow.track import registry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "p"
    write_raw(root, [alpaca(i) for i in range(24)])
    paths = Paths.at(root)
    cl = tracking.client(paths)
    cfg = load_config(None, _overrides(tiny_llama))

    first = ff.finetune(config=cfg, root=str(root))
    reports = {s: paths.report(s).read_bytes() for s in ("evaluate", "merge")}
    champion = registry.alias_version(cl, "cachekey", registry.CHAMPION)
    assert champion == first["register"]["version"]

    second = ff.finetune(config=cfg, root=str(root))
    run1, run2 = (cl.get_run(o["mlflow_run_id"]).data for o in (first, second))
    for stage in ("train", "evaluate", "merge"):
        assert run2.tags.get(f"{stage}_cached_from") == first["mlflow_run_id"], (stage, run2.tags)
    assert run2.tags["lints"] == run1.tags["lints"]
    for key in ("eval_loss", "eval_exact_match", "base_eval_loss", "merge_max_abs_logit_diff"):
        assert run2.metrics[key] == run1.metrics[key], key
    assert {s: paths.report(s).read_bytes() for s in ("evaluate", "merge")} == reports
    assert second["register"]["version"] == first["register"]["version"]  # nothing new registered
    assert registry.alias_version(cl, "cachekey", registry.CHAMPION) == champion

    # samples.jsonl rewritten (as `loraflow stage evaluate` with other eval settings would): evaluate
    # runs again and writes it back; training stays cached.
    paths.samples.write_text("{}\n")
    third = ff.finetune(config=cfg, root=str(root))
    run3 = cl.get_run(third["mlflow_run_id"]).data
    assert "evaluate_cached_from" not in run3.tags and run3.tags["train_cached_from"] == first["mlflow_run_id"]
    assert paths.samples.read_text() != "{}\n"
    assert registry.alias_version(cl, "cachekey", registry.CHAMPION) == champion
