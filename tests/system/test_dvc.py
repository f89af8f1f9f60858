"""dvc.yaml under real DVC and real git.

Fast: each stage's code deps in dvc.yaml are the modules it really imports; ``loraflow stage base``
with another base writes ``models/base/REFERENCE.md``, and a folder holding only that is rebuilt;
DVC outside git fails with DVC's own message.

Slow (one temporary repository, about 3 minutes on 2 CPU cores): a copy of this work tree
(``git ls-files`` plus untracked files, working-tree versions) on a tiny Llama and 60 records,
``git init``; then ``dvc repro`` runs every stage once and a second one only the always-changed
``base-digest`` (same bytes, so nothing after it); a params change
re-runs exactly its stages; the dataset digest in MLflow is DVC's md5 of data/prepared; a forced
register registers nothing twice; ``dvc exp run -S lora.r=4`` re-runs train onward and ``dvc exp
show`` has its metrics; ``dvc push`` / ``dvc pull`` round-trips through a local remote.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.tiny import alpaca_records

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: dvc, and the `loraflow` that dvc.yaml's cmds call
STAGES = ["base", "base-digest", "prepare", "train", "evaluate", "merge", "register"]

RECORDS = alpaca_records(50)


# ---------------------------------------------------------------------------------------------
# dvc.yaml's code deps against the real imports

# Every `loraflow stage NAME` parses params.yaml through these, whatever the stage.
COMMON = ["loraflow.core.config", "loraflow.core.paths", "loraflow.core.errors", "loraflow.core.lock", "loraflow.core.private_api"]
# What each stage runs: cmd_stage's branch for it, and for the pipeline stages the one stage runner.
ENTRY = {
    "base": ["loraflow.model.loading", "loraflow.model.embedded"],  # base_location, or REFERENCE.md for another base
    "base-digest": ["loraflow.core.fingerprint"],  # models/base.digest.json: which weights model.base is
    **{s: ["loraflow.tasks.runner", f"loraflow.tasks.{s}"] for s in ("prepare", "train", "evaluate", "merge", "register")},
}
# Imported on the way but never run by the stage, so editing them must not re-run it.
NOT_RUN = {
    "base": [],
    "base-digest": [],
    "prepare": ["loraflow.model.embedded"],  # base_location finds models/base built (a dep)
    "train": ["loraflow.model.embedded"],
    "evaluate": ["loraflow.model.embedded"],
    "merge": ["loraflow.model.embedded"],
    "register": ["loraflow.model.embedded"],
}
# The installed names of the two top-level folders (pyproject's package-dir).
MAPPED = {"loraflow.tasks": "tasks", "loraflow.flows": "flows"}


def _module_file(name: str) -> Path | None:
    for installed, folder in MAPPED.items():
        if name == installed or name.startswith(installed + "."):
            name = folder + name[len(installed):]
    base = ROOT.joinpath(*name.split("."))
    for f in (base / "__init__.py", base.with_suffix(".py")):
        if f.is_file():
            return f
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Project modules ``path`` imports anywhere (functions too), except under ``if TYPE_CHECKING``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)  # `from pkg import module`
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m.split(".")[0] in ("loraflow", "tasks", "flows")}


def _trivial(path: Path) -> bool:
    """A package __init__ with nothing but a docstring and ``__version__``: no code to depend on."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return path.name == "__init__.py" and all(
        isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
        or isinstance(s, ast.Assign) and [ast.unparse(t) for t in s.targets] == ["__version__"]
        for s in body
    )


def code_closure(stage: str) -> set[str]:
    """Source files (relative, POSIX) a stage runs: loraflow/cli.py plus the import closure of its entry modules."""
    skip = NOT_RUN[stage]
    seen: dict[str, Path] = {}
    todo = COMMON + ENTRY[stage]
    while todo:
        name = todo.pop()
        if name in seen or any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if (f := _module_file(name)) is None:
            continue  # a class or function imported by name, or a third-party module
        seen[name] = f
        todo.extend(_imports(f, name))
    files = {f for f in seen.values() if not _trivial(f)} | {ROOT / "loraflow" / "cli.py"}
    return {f.relative_to(ROOT).as_posix() for f in files}


def declared_code_deps(stage: dict) -> set[str]:
    """The .py files a stage's deps name, folders expanded (no bytecode: .dvcignore drops it)."""
    out: set[str] = set()
    for dep in stage["deps"]:
        path = ROOT / dep
        if path.is_dir():
            out.update(
                f.relative_to(ROOT).as_posix() for f in path.rglob("*.py")
                if "__pycache__" not in f.parts and not _trivial(f)
            )
        elif dep.endswith(".py"):
            out.add(dep)
    return out


def test_stage_code_deps_are_the_real_imports():
    """dvc.yaml names code by package (loraflow/model, loraflow/train, ...), not file by file: every file a
    stage runs is inside a dep, every dep holds code the stage runs, and no stage depends on another
    stage's module — so editing a stage's code re-runs that stage and the ones after it, not the others."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert list(stages) == STAGES
    stage_modules = {f"tasks/{s}.py" for s in STAGES if s not in ("base", "base-digest")}
    for name, stage in stages.items():
        assert stage["cmd"] == f"loraflow stage {name}"
        declared, imported = declared_code_deps(stage), code_closure(name)
        assert imported <= declared, f"{name}: run but missing from dvc.yaml: {sorted(imported - declared)}"
        for dep in stage["deps"]:
            path = ROOT / dep
            if dep.endswith(".py") or (path.is_dir() and any(path.rglob("*.py"))):
                held = {f for f in declared_code_deps({"deps": [dep]})}
                assert held & imported, f"{name}: dvc.yaml names {dep}, which holds no code the stage runs"
        assert declared & stage_modules <= {f"tasks/{name}.py"}, f"{name} depends on another stage's module"
    # the embedded base model is built from the corpus; its text files are data the base stage reads
    assert "loraflow/model" in stages["base"]["deps"]


def test_stage_params_exist_in_params_yaml():
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"].items():
        for key in stage.get("params", []):
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{name}: params.yaml has no {key}"
                node = node[part]


# ---------------------------------------------------------------------------------------------
# the base stage with another base model


def test_base_stage_for_another_base_writes_a_reference_and_the_default_rebuilds(tmp_path, monkeypatch):
    from loraflow import cli
    from loraflow.core.atomic import atomic_dir
    from loraflow.model import embedded

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("model:\n  base: org/some-model\n")
    assert cli.main(["stage", "base"]) == 0
    folder = tmp_path / "models" / "base"
    assert [p.name for p in folder.iterdir()] == ["REFERENCE.md"]
    assert "model.base: org/some-model" in (folder / "REFERENCE.md").read_text()

    built: list[Path] = []

    def fake_build(out, **kwargs):  # build_base in seconds: the folder it would leave
        built.append(Path(out))
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
        return out

    monkeypatch.setattr(embedded, "build_base", fake_build)
    (tmp_path / "params.yaml").write_text("model:\n  base: models/base\n")
    assert cli.main(["stage", "base"]) == 0
    assert built == [folder]  # no config.json: base_location built the embedded model there
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # REFERENCE.md replaced


def test_dvc_outside_git_fails_with_dvcs_own_message(tmp_path):
    from loraflow.core.fingerprint import git_commit

    if subprocess.run(["git", "rev-parse"], cwd=tmp_path, capture_output=True).returncode == 0:
        pytest.skip(f"{tmp_path} is inside a git work tree")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy2(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    r = subprocess.run([str(BIN / "dvc"), "status"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "DVC_NO_ANALYTICS": "1"}, timeout=120)
    assert r.returncode != 0 and "is not a git repository" in r.stdout + r.stderr, r.stdout + r.stderr
    assert git_commit(tmp_path) == "unknown"  # what `loraflow run` records outside git


# ---------------------------------------------------------------------------------------------
# a temporary repository under real DVC


def _copy_work_tree(dst: Path) -> None:
    """Tracked and untracked (not ignored) files, as they are in the work tree now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # a deleted, not yet committed file is listed too
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


# `dvc status --json` of an up-to-date project: base-digest runs on every repro (always_changed)
ALWAYS = {"base-digest": ["always changed"]}


def _up_to_date(repo) -> bool:
    return json.loads(repo.sh("dvc", "status", "--json", stdout_only=True)) == ALWAYS


def _stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from tests.tiny import make_model

    tmp = tmp_path_factory.mktemp("dvc")
    root = tmp / "repo"
    root.mkdir()
    _copy_work_tree(root)
    tiny = make_model(tmp / "tiny", "llama")

    data = root / "data" / "raw" / "tiny.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    params["model"]["base"] = str(tiny)
    params["data"].update(path="data/raw/tiny.jsonl", max_length=64)
    params["train"].update(max_steps=4, batch_size=8, logging_steps=2, save_steps=100)
    params["eval"].update(num_samples=4, max_new_tokens=2)
    params["register"]["model_name"] = f"dvc-test-{tmp.name}"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(root),  # the stages import the copy's code, the code DVC hashes
        "OMP_NUM_THREADS": "1",  # 2 shared cores: threads spin under contention
        "MKL_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        "DVC_STUDIO_OFFLINE": "1",
        "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site-cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "GIT_AUTHOR_NAME": "loraflow test", "GIT_AUTHOR_EMAIL": "test@loraflow.invalid",
        "GIT_COMMITTER_NAME": "loraflow test", "GIT_COMMITTER_EMAIL": "test@loraflow.invalid",
    }

    def sh(*cmd: str, stdout_only: bool = False) -> str:
        exe = str(BIN / cmd[0]) if cmd[0] == "dvc" else cmd[0]
        r = subprocess.run([exe, *cmd[1:]], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{out[-6000:]}"
        return r.stdout if stdout_only else out

    def commit(message: str) -> None:
        sh("git", "add", "-A")
        sh("git", "commit", "-q", "--allow-empty", "-m", message)

    sh("git", "init", "-q")
    sh("git", "config", "user.name", "loraflow test")  # dvc exp commits through dulwich, which reads these
    sh("git", "config", "user.email", "test@loraflow.invalid")
    sh("dvc", "add", "data/raw/tiny.jsonl")  # the data-versioning path the README documents
    commit("loraflow on a tiny model")
    first = sh("dvc", "repro")
    second = sh("dvc", "repro")
    return SimpleNamespace(root=root, tmp=tmp, tiny=tiny, env=env, sh=sh, commit=commit, first=first,
                           second=second, model_name=params["register"]["model_name"])


def _lock(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8"))


def _out_md5(lock: dict, stage: str, path: str) -> str:
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def _client(repo):
    from mlflow import MlflowClient

    uri = repo.env["MLFLOW_TRACKING_URI"]
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.slow
def test_repro_runs_every_stage_once_and_then_nothing(repo):
    first = _stages_run(repo.first)
    assert sorted(first) == sorted(STAGES) and first[2:] == STAGES[2:], repo.first[-4000:]  # base, base-digest: any order
    assert set(_lock(repo.root)["stages"]) == set(STAGES)
    # the second: only the always-changed base-digest, which wrote the same bytes, so nothing after it
    assert _stages_run(repo.second) == ["base-digest"], repo.second
    assert all(f"Stage '{s}' didn't change" in repo.second for s in STAGES if s != "base-digest"), repo.second
    # another base model: the base stage built nothing and says what stands in for it
    base = repo.root / "models" / "base"
    assert not (base / "config.json").exists()
    assert f"model.base: {repo.tiny}" in (base / "REFERENCE.md").read_text()
    repo.sh("dvc", "plots", "show", "-o", str(repo.tmp / "plots"))
    html = (repo.tmp / "plots" / "index.html").read_text(encoding="utf-8")
    assert "train loss per step" in html and '"eval_loss"' in html and "<DVC_METRIC" not in html


@pytest.mark.slow
def test_a_param_change_reaches_exactly_the_stages_that_read_it(repo):
    """The stages DVC sees a changed param in; the ones after them follow when their inputs change."""
    params = repo.root / "params.yaml"
    original = params.read_text(encoding="utf-8")
    try:
        for key, value, readers in (
            ("data.max_length", 60, {"prepare", "train", "evaluate", "merge"}),  # then register, by its deps
            ("lora.r", 4, {"train", "register"}),  # not prepare: the data stays as it is
            ("eval.max_new_tokens", 3, {"evaluate", "register"}),
            ("merge.tolerance", 0.01, {"merge"}),
            ("model.base", "models/base", set(STAGES)),
        ):
            p = yaml.safe_load(original)
            section, leaf = key.split(".")
            p[section][leaf] = value
            params.write_text(yaml.safe_dump(p, sort_keys=False), encoding="utf-8")
            status = json.loads(repo.sh("dvc", "status", "--json", stdout_only=True))
            changed = {
                stage for stage, changes in status.items()
                if any(isinstance(c, dict) and "params.yaml" in c.get("changed deps", {}) for c in changes)
            }
            assert changed == readers, (key, status)
    finally:
        params.write_text(original, encoding="utf-8")
    assert _up_to_date(repo)


@pytest.mark.slow
def test_dataset_digest_in_mlflow_is_dvcs_md5_of_the_prepared_data(repo):
    lock = _lock(repo.root)
    md5 = _out_md5(lock, "prepare", "data/prepared")
    assert md5.endswith(".dir")
    digest = md5.removesuffix(".dir")
    reports = repo.root / "reports"
    assert json.loads((reports / "prepare.json").read_text())["dataset_digest"] == digest

    cl = _client(repo)
    run = cl.get_run(json.loads((reports / "train.json").read_text())["mlflow_run_id"])
    assert run.data.params["dataset_digest"] == digest
    reg = json.loads((reports / "register.json").read_text())
    assert cl.get_model_version(reg["name"], reg["version"]).tags["dataset_digest"] == digest

    # and the raw data version: its .dvc file and the prepare stage's dep record the same md5
    raw = yaml.safe_load((repo.root / "data" / "raw" / "tiny.jsonl.dvc").read_text())["outs"][0]["md5"]
    dep = next(d for d in lock["stages"]["prepare"]["deps"] if d["path"] == "data/raw/tiny.jsonl")
    assert dep["md5"] == raw


@pytest.mark.slow
def test_forcing_register_registers_nothing_twice(repo):
    repo.commit("results")  # a new commit: the code, data and params are still the same
    cl = _client(repo)
    before = len(cl.search_model_versions(f"name='{repo.model_name}'"))
    out = repo.sh("dvc", "repro", "--force", "--single-item", "register")
    assert _stages_run(out) == ["register"]
    # the lineage key's "code" must not be the commit id: a commit that changes no code is the same code
    assert "already holds this data, params and code" in out, out[-3000:]
    assert len(cl.search_model_versions(f"name='{repo.model_name}'")) == before
    assert json.loads((repo.root / "reports" / "register.json").read_text())["decision"] == "already-registered"


@pytest.mark.slow
def test_exp_run_with_another_rank_reruns_train_onward_and_shows_its_metrics(repo):
    out = repo.sh("dvc", "exp", "run", "-S", "lora.r=4")
    assert _stages_run(out) == ["base-digest", "train", "evaluate", "merge", "register"], out[-4000:]
    assert "Stage 'prepare' didn't change" in out and "Stage 'base' didn't change" in out

    shown = json.loads(repo.sh("dvc", "exp", "show", "--json", stdout_only=True))
    exps = [e for e in _walk_exps(shown) if e.get("rev") != "workspace"
            and e["data"]["params"]["params.yaml"]["data"]["lora"]["r"] == 4]
    assert exps, json.dumps(shown)[:3000]
    metrics = exps[0]["data"]["metrics"]
    missing = [r for r in STAGES[2:] if "data" not in metrics.get(f"reports/{r}.json", {})]
    # dvc exp run commits the experiment with git: a git-ignored metrics file is left out of it
    assert not missing, f"no metrics for {missing} in the experiment commit (is reports/ git-ignored?): {metrics}"
    assert metrics["reports/train.json"]["data"]["lora_r"] == 4


def _walk_exps(node):
    """Every {rev, data} entry of `dvc exp show --json`, baselines and experiments alike."""
    if isinstance(node, dict):
        if "rev" in node and isinstance(node.get("data"), dict):
            yield {"rev": node["rev"], "name": node.get("name"), "data": node["data"]}
        for v in node.values():
            yield from _walk_exps(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_exps(v)


@pytest.mark.slow
def test_push_and_pull_through_a_local_remote(repo):
    from loraflow.core.fingerprint import dataset_digest

    root = repo.root
    repo.sh("dvc", "remote", "add", "--default", "--force", "storage", str(repo.tmp / "remote"))
    repo.sh("dvc", "push")
    raw = (root / "data" / "raw" / "tiny.jsonl").read_bytes()
    digests = {p: dataset_digest(root / p) for p in ("data/prepared", "outputs/adapter", "outputs/merged")}

    shutil.rmtree(root / ".dvc" / "cache")
    for p in ("data/prepared", "outputs/adapter", "outputs/merged", "models/base"):
        shutil.rmtree(root / p)
    (root / "data" / "raw" / "tiny.jsonl").unlink()
    assert "deleted" in repo.sh("dvc", "status")

    repo.sh("dvc", "pull")
    assert _up_to_date(repo)
    assert (root / "data" / "raw" / "tiny.jsonl").read_bytes() == raw
    assert {p: dataset_digest(root / p) for p in digests} == digests
