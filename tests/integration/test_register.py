"""register against a real MLflow sqlite store: versions, lineage tags, the champion gate, rollback."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from loraflow.core.atomic import write_json
from loraflow.core.config import load_config
from loraflow.core.paths import Paths
from loraflow.track import registry, tracking

pytestmark = pytest.mark.slow


def _stage_outputs(paths: Paths, model_dir, exact_match: float, digest: str = "d1") -> None:
    """What prepare/evaluate/merge leave behind, with a real (tiny) model as the merged one."""
    if paths.merged.exists():
        shutil.rmtree(paths.merged)
    shutil.copytree(model_dir, paths.merged)
    write_json(paths.report("prepare"), {"format": "alpaca", "dataset_digest": digest})
    write_json(paths.report("evaluate"), {"base": {"exact_match": 0.0, "loss": 3.0},
                                          "tuned": {"exact_match": exact_match, "loss": 1.0}})
    write_json(paths.report("merge"), {"max_abs_logit_diff": 1e-6, "loss": 1.0, "loss_delta": 0.0})


@pytest.fixture
def project(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The code digest hashes loraflow/ and tasks/, which may change while the suite runs in a
    # shared checkout; "same code" is what this test means, so hold it still.
    monkeypatch.setattr("loraflow.core.fingerprint.code_digest", lambda: "code-digest-under-test")
    return Paths.at(tmp_path)


def test_register_gate_moves_champion_only_for_a_better_version_and_rollback(project, tiny_llama, monkeypatch):
    import loraflow.tasks.register

    paths = project
    cfg = load_config(None, [f"model.base={tiny_llama}", "register.model_name=demo"])
    _stage_outputs(paths, tiny_llama, exact_match=0.5)
    # Register ships the folder merge wrote; it loads no model (a 7B would be loaded a second time).
    import transformers

    loads = []
    real_load = transformers.PreTrainedModel.from_pretrained.__func__
    with monkeypatch.context() as m, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.setattr(transformers.PreTrainedModel, "from_pretrained",
                  classmethod(lambda cls, *a, **k: loads.append(a) or real_load(cls, *a, **k)))
        first = loraflow.tasks.register.run(cfg, paths)
    assert loads == []
    # MLflow's advice to add an input example or type hints (both left out on purpose) stays out of the log.
    advice = [str(w.message) for w in caught if any(t in str(w.message) for t in ("input example", "type hints"))]
    assert advice == []
    assert first.version == "1" and first.decision == "promoted"
    assert set(first.aliases) == {"challenger", "champion"}

    # Same data, params and code again: nothing new is registered.
    again = loraflow.tasks.register.run(cfg, paths)
    assert again.decision == "already-registered" and again.version == "1"

    # A worse run (different knobs) gets challenger but not champion.
    worse_cfg = load_config(None, [f"model.base={tiny_llama}", "register.model_name=demo", "lora.r=4"])
    _stage_outputs(paths, tiny_llama, exact_match=0.25)
    worse = loraflow.tasks.register.run(worse_cfg, paths)
    cl = tracking.client(paths)
    assert worse.version == "2" and worse.decision == "kept"
    assert registry.alias_version(cl, "demo", "champion") == "1"
    assert registry.alias_version(cl, "demo", "challenger") == "2"
    mv = cl.get_model_version("demo", "2")
    assert mv.tags["gate_decision"] == "kept"
    assert float(mv.tags["gate_new_value"]) == 0.25 and float(mv.tags["gate_champion_value"]) == 0.5
    assert mv.tags["lora_r"] == "4" and mv.tags["dataset_digest"] == "d1"

    # A better one takes champion; rollback returns it to v1.
    better_cfg = load_config(None, [f"model.base={tiny_llama}", "register.model_name=demo", "lora.r=8"])
    _stage_outputs(paths, tiny_llama, exact_match=0.75)
    better = loraflow.tasks.register.run(better_cfg, paths)
    assert better.decision == "promoted"
    assert registry.alias_version(cl, "demo", "champion") == "3"
    report = json.loads(paths.report("register").read_text())
    assert report["version"] == "3" and report["champion_value"] == 0.5 and report["new_value"] == 0.75
    old, new = registry.rollback(cl, "demo")
    assert (old, new) == ("3", "1")
    assert registry.alias_version(cl, "demo", "champion") == "1"

    # Registering left no MLflow URI behind in the environment (the next pipeline may be elsewhere).
    import os

    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ

    # The champion loads with MLflow's own API and generates what the merged folder generates.
    import pandas as pd

    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(paths))  # restored after the test
    model = mlflow.pyfunc.load_model("models:/demo@champion")
    out = model.predict(pd.DataFrame({"prompt": ["What is the opposite of hot?", "Is 37 even or odd?"]}))
    assert out == _reference_generate(tiny_llama, None, ["What is the opposite of hot?", "Is 37 even or odd?"])
    assert len(out) == 2 and all(isinstance(o, str) for o in out) and any(out)
    assert model.predict([{"prompt": "What is the opposite of hot?"}]) == out[:1]  # the README's form
    meta = model.metadata
    assert meta.signature is not None and [c.name for c in meta.signature.inputs.inputs] == ["prompt", "input"]
    assert meta.saved_input_example_info is None  # an example would make log_model load the model


def _adapter(tmp_path, base_dir):
    """A real LoRA adapter folder as the train stage writes it (B non-zero, so it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path / "outputs" / "adapter"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    write_json(out / "loraflow_train.json", {"method": "lora", "base_model": str(base_dir), "quantization": None,
                                             "compute_dtype": "float32"})
    return out


def _reference_generate(base_dir, adapter_dir, instructions, inputs=None):
    """What the evaluate stage generates: prompts rendered by loraflow.data.formats, greedy_generate."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow.data.formats import render_prompt
    from loraflow.model.generation import greedy_generate

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    tok = AutoTokenizer.from_pretrained(adapter_dir or base_dir)
    inputs = inputs or [""] * len(instructions)
    prompts = [render_prompt({"instruction": i, "input": x}, "alpaca", {}) for i, x in zip(instructions, inputs)]
    return greedy_generate(model.eval(), tok, prompts, 32, 4)  # eval.max_new_tokens default


def test_adapter_version_loads_on_its_pinned_base_and_renders_like_training(tmp_path, tiny_llama, monkeypatch):
    """register.log=adapter: adapter + base reference (sha256 of a local base), not a base copy."""
    import loraflow.tasks.register
    import pandas as pd
    from safetensors.torch import load_file, save_file

    import mlflow
    from loraflow.track.pyfunc_model import weights_sha256

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    paths = Paths.at(tmp_path)
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    adapter = _adapter(tmp_path, base)
    cfg = load_config(None, [f"model.base={base}", "register.model_name=ad", "register.log=adapter", "method=lora"])
    _stage_outputs(paths, tiny_llama, exact_match=0.5)
    result = loraflow.tasks.register.run(cfg, paths)
    assert result.decision == "promoted"

    cl = tracking.client(paths)
    mv = cl.get_model_version("ad", result.version)
    assert mv.tags["model_kind"] == "adapter" and mv.tags["base_sha256"] == weights_sha256(base)
    # The version holds the adapter, not the base: no full weight file in the logged model.
    from mlflow.utils.file_utils import local_file_uri_to_path

    model_id = mv.model_id or mv.source.removeprefix("models:/")
    where = Path(local_file_uri_to_path(cl.get_logged_model(model_id).artifact_location))
    logged = {f.relative_to(where).as_posix() for f in where.rglob("*") if f.is_file()}
    assert "artifacts/adapter/adapter_model.safetensors" in logged and "MLmodel" in logged
    assert not any(p.endswith("model.safetensors") and "adapter" not in p for p in logged)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(paths))  # restored after the test
    model = mlflow.pyfunc.load_model("models:/ad@champion")
    instructions, inputs = ["What is the opposite of hot?", "Is the number even or odd?"], ["", "37"]
    out = model.predict(pd.DataFrame({"prompt": instructions, "input": inputs}))
    assert out == _reference_generate(base, adapter, instructions, inputs)
    assert out != _reference_generate(base, None, instructions, inputs)  # the adapter is applied
    # The same bytes as training: rendering through the registered model == loraflow.data.formats.
    from loraflow.data.formats import render_prompt

    py = model.unwrap_python_model()
    assert py.render({"prompt": "Name it.", "input": "x"}) == render_prompt(
        {"instruction": "Name it.", "input": "x"}, "alpaca", {})
    assert py.render({"prompt": "Name it."}) == loraflow.tasks.register.ALPACA_INFERENCE_TEMPLATE.format(prompt="Name it.")

    # Other weights under the same base path are refused on load, naming both digests.
    weights = base / "model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(Exception, match="differ from the registered"):
        mlflow.pyfunc.load_model("models:/ad@champion")
    # The same weights elsewhere (another machine's path): model_config points there, sha256 still checked.
    moved = mlflow.pyfunc.load_model("models:/ad@champion", model_config={"base_location": str(tiny_llama)})
    assert moved.predict(pd.DataFrame({"prompt": instructions, "input": inputs})) == out


def test_promote_and_models_use_the_store_next_to_the_config(project, tiny_llama, tmp_path, monkeypatch, capsys):
    import loraflow.tasks.register

    from loraflow import cli

    cfg = load_config(None, [f"model.base={tiny_llama}", "register.model_name=cl"])
    _stage_outputs(project, tiny_llama, exact_match=0.5)
    loraflow.tasks.register.run(cfg, project)
    _stage_outputs(project, tiny_llama, exact_match=0.25)
    loraflow.tasks.register.run(load_config(None, [f"model.base={tiny_llama}", "register.model_name=cl", "lora.r=4"]), project)
    (project.root / "params.yaml").write_text("register:\n  model_name: cl\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no store here: -c points at the project's
    monkeypatch.setenv("COLUMNS", "200")  # rich sizes the table to the terminal

    # v2 lost the gate: making it champion by hand takes --force and a reason (test_promotion_has_an_owner_...)
    assert cli.main(["promote", "cl", "--version", "2", "--force", "--reason", "by hand",
                     "-c", str(project.root / "params.yaml")]) == 0
    assert capsys.readouterr().out.strip() == "cl@champion: v1 -> v2 (over the gate)"
    cl = tracking.client(project)
    assert registry.alias_version(cl, "cl", "champion") == "2"
    assert cli.main(["promote", "cl", "--rollback", "-c", str(project.root / "params.yaml")]) == 0
    assert registry.alias_version(cl, "cl", "champion") == "1"
    assert cli.main(["models", "cl", "-c", str(project.root / "params.yaml")]) == 0
    table = capsys.readouterr().out
    assert "challenger" in table and "champion" in table and "merged" in table

    # Without -c, in a folder with no store: one line naming the path, and no empty store created.
    assert cli.main(["models", "cl"]) == 1
    err = capsys.readouterr().err
    assert "no MLflow store at" in err and str(elsewhere) in err and len(err.strip().splitlines()) == 1
    assert not (elsewhere / "mlflow").exists()



def test_promotion_has_an_owner_a_failed_gate_needs_force_and_reason_and_every_alias_shows(
        project, tiny_llama, monkeypatch, capsys):
    """Issue 17 item 5: who moved which alias, when and why, on the version and in an audit trail."""
    import loraflow.tasks.register

    from loraflow import cli
    from loraflow.track import promotion

    cfg = load_config(None, [f"model.base={tiny_llama}", "register.model_name=owned"])
    _stage_outputs(project, tiny_llama, exact_match=0.5)
    loraflow.tasks.register.run(cfg, project)  # v1: champion, by the gate
    _stage_outputs(project, tiny_llama, exact_match=0.25)
    loraflow.tasks.register.run(load_config(None, [f"model.base={tiny_llama}", "register.model_name=owned",
                                                   "lora.r=4"]), project)  # v2: kept out by the gate
    (project.root / "params.yaml").write_text("register:\n  model_name: owned\n")
    conf = ["-c", str(project.root / "params.yaml")]
    cl = tracking.client(project)
    monkeypatch.setenv("LORAFLOW_ACTOR", "alice")
    capsys.readouterr()

    # A version that lost the gate is not made champion by a plain promote: one line that says how
    assert cli.main(["promote", "owned", "--version", "2", *conf]) == 1
    err = capsys.readouterr().err.strip()
    assert "owned v2 failed the gate" in err and "--force --reason" in err and len(err.splitlines()) == 1
    assert cli.main(["promote", "owned", "--version", "2", "--force", *conf]) == 1
    assert "--force needs --reason" in capsys.readouterr().err
    assert registry.alias_version(cl, "owned", "champion") == "1"

    assert cli.main(["promote", "owned", "--version", "2", "--force", "--reason", "fixes ticket 42", *conf]) == 0
    assert "owned@champion: v1 -> v2" in capsys.readouterr().out
    tags = cl.get_model_version("owned", "2").tags
    assert tags["champion.promoted_by"] == "alice" and tags["champion.promotion_reason"] == "fixes ticket 42"
    assert tags["champion.gate_overridden"] == "true"
    assert tags["gate_decision"] == "kept"  # the gate's verdict stays what it was; the override is beside it
    # reports/register.json names the registry its models:/ URI lives in
    assert json.loads(project.report("register").read_text())["tracking_uri"] == tracking.tracking_uri(project)

    # Any alias, no gate to override; a rollback is recorded too
    monkeypatch.setenv("LORAFLOW_ACTOR", "bob")
    assert cli.main(["promote", "owned", "--version", "1", "--alias", "production", "--reason", "release 3", *conf]) == 0
    assert cli.main(["promote", "owned", "--rollback", *conf]) == 0
    assert registry.alias_version(cl, "owned", "champion") == "1"
    capsys.readouterr()

    assert cli.main(["models", "owned", "--json", *conf]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["aliases"] == {"champion": "1", "challenger": "2", "production": "1"}
    assert {v["version"]: sorted(v["aliases"]) for v in listing["versions"]} == {
        "1": ["champion", "production"], "2": ["challenger"]}
    trail = [(m["alias"], m["version"], m["actor"], m["forced"], m["rollback"]) for m in listing["audit"]]
    assert trail == [("champion", "1", "loraflow register", False, False),  # the gate's own promotion
                     ("champion", "2", "alice", True, False),
                     ("production", "1", "bob", False, False),
                     ("champion", "1", "bob", False, True)]
    assert listing["audit"][1]["reason"] == "fixes ticket 42" and listing["audit"][1]["previous"] == "1"
    assert promotion.audit_trail(cl.get_registered_model("owned").tags) == listing["audit"]

    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main(["models", "owned", *conf]) == 0
    table = capsys.readouterr().out
    assert "production" in table and "alice" in table and "fixes ticket 42" in table


def test_gate_directions():
    g = registry.gate("loss", 0.9, 1.0, "1", 0.0)
    assert g.promote
    assert not registry.gate("loss", 1.1, 1.0, "1", 0.0).promote
    assert not registry.gate("exact_match", 0.51, 0.5, "1", 0.05).promote
    assert registry.gate("exact_match", 0.56, 0.5, "1", 0.05).promote
    assert registry.gate("exact_match", 0.0, None, None, 0.0).promote  # no champion yet


def test_two_pipelines_registering_at_once_both_get_versions_and_the_better_is_champion(tmp_path, tiny_llama):
    """Two `loraflow stage register` processes, two project folders, one sqlite store, same name."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    (tmp_path / "shared").mkdir()
    MlflowClient(tracking_uri=uri).search_experiments()  # the shared store exists before the race
    root = Path(__file__).resolve().parents[2]
    procs = {}
    for exact_match, r in ((0.25, 4), (0.75, 8)):
        project = tmp_path / f"project-r{r}"
        project.mkdir()
        (project / "params.yaml").write_text((root / "params.yaml").read_text())
        _stage_outputs(Paths.at(project), tiny_llama, exact_match=exact_match)
        cmd = [sys.executable, "-m", "loraflow.cli", "stage", "register", "-s", f"model.base={tiny_llama}",
               "-s", "register.model_name=conc", "-s", f"lora.r={r}"]
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        procs[r] = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for r, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (r, err[-3000:])

    cl = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = {mv.tags["lora_r"]: mv for mv in cl.search_model_versions("name='conc'")}
    assert sorted(versions) == ["4", "8"] and sorted(str(mv.version) for mv in versions.values()) == ["1", "2"]
    assert registry.alias_version(cl, "conc", "champion") == str(versions["8"].version)
    assert float(versions["8"].tags["eval_exact_match"]) == 0.75
    # The gate's lock was released: only the real model is registered.
    assert [m.name for m in cl.search_registered_models()] == ["conc"]


def test_retry_backs_off_on_a_locked_store_and_raises_anything_else_at_once():
    import time

    from mlflow.exceptions import MlflowException

    calls: list[float] = []

    def locked_twice():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert registry.retry(locked_twice, delay=0.01) == "ok" and len(calls) == 3
    assert calls[2] - calls[0] >= 0.01 * (1 + 2) * 0.5  # backoff: at least half of 0.01 + 0.02 s

    def bad_name():
        calls.append(time.monotonic())
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: no such model")

    calls.clear()
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        registry.retry(bad_name, delay=0.01)
    assert len(calls) == 1
    with pytest.raises(MlflowException, match="locked"):
        registry.retry(lambda: (_ for _ in ()).throw(MlflowException("database is locked")), attempts=2, delay=0.001)


def test_gate_lock_released_between_insert_and_read_back_is_taken_not_an_error(tmp_path, monkeypatch):
    """MLflow's SQL store answers a name clash by reading the existing model back; when the other pipeline
    deletes its lock in that instant, create says "not found". The gate must take the now-free lock (this
    interleaving failed test_two_pipelines_... once in CI). Real sqlite store; the interleaving is forced."""
    from mlflow import MlflowClient
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    cl = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    lock = "m" + registry.LOCK_SUFFIX
    cl.create_registered_model(lock)  # held by "the other pipeline"
    read_back = SqlAlchemyStore.get_registered_model
    released = []

    def other_pipeline_releases_first(self, name):
        if name == lock and not released:
            released.append(name)
            cl.delete_registered_model(lock)
        return read_back(self, name)

    monkeypatch.setattr(SqlAlchemyStore, "get_registered_model", other_pipeline_releases_first)
    with registry.gate_lock(cl, "m", timeout=10):
        assert released and cl.get_registered_model(lock).name == lock  # ours now
    assert not cl.search_registered_models(filter_string=f"name = '{lock}'")
