"""DVC's cache keys: change data, params, the base model and code in turn, and `dvc status` marks
exactly the stages that read what changed (the stages after them follow through their outputs).

The lock is recorded with `dvc commit` over placeholder outputs (nothing is trained): what is under
test is which stage each kind of change reaches, not what the stages compute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from tests.reliability.conftest import BIN, alpaca, env
from tests.system.test_dvc import STAGES, _copy_work_tree

OUTPUTS = {
    "data/prepared/train.jsonl": "{}\n",
    "reports/prepare.json": "{}\n",
    "outputs/adapter/adapter_config.json": "{}\n",
    "reports/label_audit.txt": "",
    "reports/train_log.csv": "step,loss\n",
    "reports/train.json": "{}\n",
    "reports/samples.jsonl": "",
    "reports/evaluate.json": "{}\n",
    "outputs/merged/config.json": "{}\n",
    "reports/merge.json": "{}\n",
    "reports/register.json": "{}\n",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("dvc-keys") / "repo"
    root.mkdir()
    _copy_work_tree(root)  # tracked and untracked files; outputs are git-ignored, so not copied
    shutil.rmtree(root / "models", ignore_errors=True)
    shutil.copytree(tiny_models["llama"], root / "models" / "base")  # the embedded base's place: a DVC output
    for rel, text in OUTPUTS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    raw = root / "data" / "raw" / "x.jsonl"
    raw.write_text("".join(json.dumps(alpaca(i)) + "\n" for i in range(20)), encoding="utf-8")
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    params["data"]["path"] = "data/raw/x.jsonl"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    e = env(root) | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the `loraflow` of dvc.yaml's cmds
                     "DVC_NO_ANALYTICS": "1", "DVC_STUDIO_OFFLINE": "1",
                     "DVC_SITE_CACHE_DIR": str(root.parent / "site-cache"),
                     "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid",
                     "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t.invalid"}

    def sh(*cmd: str) -> str:
        exe = str(BIN / cmd[0]) if cmd[0] in ("dvc", "loraflow") else cmd[0]
        r = subprocess.run([exe, *cmd[1:]], cwd=root, env=e, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{' '.join(cmd)}: {r.stdout[-3000:]}{r.stderr[-3000:]}"
        return r.stdout

    sh("git", "init", "-q")
    sh("loraflow", "stage", "base-digest")  # models/base.digest.json, as `dvc repro` would write it
    sh("dvc", "commit", "--force", "--quiet")  # record every stage's deps, params and outputs as they are
    assert json.loads(sh("dvc", "status", "--json")) == ALWAYS
    return root, sh


ALWAYS = {"base-digest": ["always changed"]}  # `dvc status` of an up-to-date project: that stage runs on every repro


def changed_stages(sh) -> dict[str, set[str]]:
    """{stage: what changed} for stages whose own deps, params or outputs changed."""
    out: dict[str, set[str]] = {}
    for stage, changes in json.loads(sh("dvc", "status", "--json")).items():
        for change in changes:
            if isinstance(change, dict):
                for kind in ("changed deps", "changed outs"):
                    for path in change.get(kind, {}):
                        out.setdefault(stage, set()).add(path)
    return out


# A file edited -> (the dep DVC reports changed: its package folder, or the file itself) and the stages
# that re-run. dvc.yaml names code by package, so an edit reaches every stage that runs that package,
# and a stage's own module (tasks/NAME.py) reaches that stage alone.
CODE = {
    "loraflow/train/rankcheck.py": ("loraflow/train", {"train"}),
    "loraflow/train/sft.py": ("loraflow/train", {"train"}),
    "loraflow/planner/estimates.py": ("loraflow/planner", {"train"}),  # method: auto, OOM advice
    "loraflow/data/readers.py": ("loraflow/data", {"prepare", "train", "evaluate", "merge", "register"}),
    "loraflow/model/generation.py": ("loraflow/model", {"base", "prepare", "train", "evaluate", "merge", "register"}),
    "tasks/merge.py": ("tasks/merge.py", {"merge"}),
    "tasks/train.py": ("tasks/train.py", {"train"}),
    "loraflow/core/config.py": ("loraflow/core", set(STAGES)),  # every stage parses params.yaml through it
}


@pytest.mark.slow
def test_each_kind_of_change_marks_exactly_the_stages_that_read_it(project):
    root, sh = project

    def changed_by(rel: str, edit) -> dict[str, set[str]]:
        path = root / rel
        original = path.read_bytes()
        try:
            edit(path)
            return changed_stages(sh)
        finally:
            path.write_bytes(original)
            os.utime(path)

    # data: a record more
    got = changed_by("data/raw/x.jsonl", lambda p: p.write_bytes(p.read_bytes() + json.dumps(alpaca(99)).encode() + b"\n"))
    assert got == {"prepare": {"data/raw/x.jsonl"}}, got

    # params: the rank is read by train (and register, which tags versions with it); not by prepare
    def rank(p):
        params = yaml.safe_load(p.read_text(encoding="utf-8"))
        params["lora"]["r"] = 4
        p.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    got = changed_by("params.yaml", rank)
    assert got == {"train": {"params.yaml"}, "register": {"params.yaml"}}, got

    # the base model's weights: the base stage's output changed, and every stage that loads it
    def reweigh(p):
        from safetensors.torch import load_file, save_file

        tensors = load_file(p)
        name = sorted(tensors)[0]
        tensors[name] = tensors[name] + 1
        save_file(tensors, p, metadata={"format": "pt"})

    got = changed_by("models/base/model.safetensors", reweigh)
    assert got == {"base": {"models/base"}, **{s: {"models/base"} for s in ("prepare", "train", "evaluate", "merge")}}, got

    # code: a change to a module reaches the stages that run it, and only those
    for rel, (dep, stages) in CODE.items():
        got = changed_by(rel, lambda p: p.write_text(p.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8"))
        assert got == {s: {dep} for s in stages}, (rel, got)

    assert changed_stages(sh) == {}  # every edit undone: up to date again


@pytest.mark.slow
def test_changing_the_weights_of_a_base_outside_the_project_reruns_its_readers(project, tiny_models, tmp_path):
    """New weights at the same path outside the project: the always-changed base-digest stage writes
    another fingerprint, and every stage that loads the base is out of date; an unchanged base
    rewrites the same bytes (nothing else re-runs) and reads no weights again (the sha256 cache)."""
    root, sh = project
    outside = tmp_path / "my-base"
    shutil.copytree(tiny_models["llama"], outside)
    params = root / "params.yaml"
    original = params.read_bytes()
    p = yaml.safe_load(original)
    p["model"]["base"] = str(outside)
    try:
        params.write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
        shutil.rmtree(root / "models" / "base")
        sh("loraflow", "stage", "base")  # models/base/REFERENCE.md names the base outside
        sh("dvc", "repro", "--single-item", "base-digest")
        sh("dvc", "commit", "--force", "--quiet")
        assert changed_stages(sh) == {}
        digest = json.loads((root / "models" / "base.digest.json").read_text())
        assert digest["source"] == "local" and digest["location"] == str(outside.resolve())
        weights = digest["files"]["model.safetensors"]

        # a no-op repro of the stage: same bytes, so nothing downstream is out of date
        cache = root / "models" / ".sha256-cache.json"
        assert any(k.startswith(str(outside / "model.safetensors")) for k in json.loads(cache.read_text()))
        sh("dvc", "repro", "--single-item", "base-digest")
        assert changed_stages(sh) == {}

        from safetensors.torch import load_file, save_file

        tensors = load_file(outside / "model.safetensors")
        name = sorted(tensors)[0]
        tensors[name] = tensors[name] + 1
        save_file(tensors, outside / "model.safetensors", metadata={"format": "pt"})
        assert changed_stages(sh) == {}  # DVC alone cannot see it: the path is outside the project
        sh("dvc", "repro", "--single-item", "base-digest")
        readers = {"prepare", "train", "evaluate", "merge", "register"}
        assert changed_stages(sh) == {s: {"models/base.digest.json"} for s in readers}
        assert json.loads((root / "models" / "base.digest.json").read_text())["files"]["model.safetensors"] != weights
    finally:
        params.write_bytes(original)


def test_a_hub_base_is_keyed_by_its_cached_commit(tmp_path, monkeypatch):
    """A hub id: the commit its revision resolves to in the local Hugging Face cache (read offline);
    a 40-hex revision is that commit; not yet downloaded: no commit (the first load fetches it)."""
    import huggingface_hub.constants

    from loraflow.core.config import load_config
    from loraflow.core.fingerprint import base_fingerprint as fingerprint
    from loraflow.core.paths import Paths

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    paths = Paths.at(tmp_path / "project")
    refs = tmp_path / "hub" / "models--org--name" / "refs"
    refs.mkdir(parents=True)

    def fp(*overrides: str) -> dict:
        return fingerprint(load_config(None, ["model.base=org/name", *overrides]), paths)

    assert fp()["source"] == "hub" and fp()["commit"] is None  # not in the cache
    (refs / "main").write_text("a" * 40)
    first = fp()
    assert first["commit"] == "a" * 40
    (refs / "main").write_text("b" * 40)  # `main` moved: another model under the same name
    assert fp()["commit"] == "b" * 40 and fp()["digest"] != first["digest"]
    assert fp("model.revision=" + "c" * 40)["commit"] == "c" * 40  # pinned: no lookup
    (refs / "v1").write_text("d" * 40)
    assert fp("model.revision=v1")["commit"] == "d" * 40
