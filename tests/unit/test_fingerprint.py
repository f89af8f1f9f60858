"""The lineage fingerprints that carry no key of their own: git_commit, dvc_lock_digest, code_digest.

Known answers: a commit git itself names, md5 of fixed bytes, and a code digest that moves with one
changed source file (on copies of the packages, never the checkout another process may be editing).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from loraflow.core import fingerprint

ROOT = Path(__file__).resolve().parents[2]
LOCK = b"schema: '2.0'\nstages:\n  prepare:\n    cmd: loraflow stage prepare\n"
LOCK_MD5 = "20d8f185383c289e315324b80818e772"  # md5sum of LOCK


def git(root: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": os.devnull}
    return subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    (root / "params.yaml").write_text("lora:\n  r: 16\n")
    git(root, "add", "params.yaml")
    git(root, "commit", "-q", "-m", "first")
    return root


def test_git_commit_is_head_and_dirty_only_for_tracked_changes(repo):
    head = git(repo, "rev-parse", "HEAD")
    assert re.fullmatch(r"[0-9a-f]{40}", head)
    assert fingerprint.git_commit(repo) == head
    (repo / "reports.json").write_text("{}")  # untracked outputs do not make the tree dirty
    assert fingerprint.git_commit(repo) == head
    (repo / "params.yaml").write_text("lora:\n  r: 8\n")  # a tracked file changed
    assert fingerprint.git_commit(repo) == f"{head}-dirty"
    git(repo, "commit", "-q", "-am", "second")
    second = git(repo, "rev-parse", "HEAD")
    assert second != head and fingerprint.git_commit(repo) == second


def test_git_commit_outside_git_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above tmp_path counts
    assert fingerprint.git_commit(tmp_path) == "unknown"


def test_dvc_lock_digest_is_md5_of_the_lock_file(repo):
    assert fingerprint.dvc_lock_digest(repo) is None  # no dvc.lock: no tag
    (repo / "dvc.lock").write_bytes(LOCK)
    assert fingerprint.dvc_lock_digest(repo) == LOCK_MD5
    (repo / "dvc.lock").write_bytes(b"")
    assert fingerprint.dvc_lock_digest(repo) == "d41d8cd98f00b204e9800998ecf8427e"


@pytest.fixture
def source_copy(tmp_path, monkeypatch):
    """Copies of the ``loraflow`` and ``tasks`` package folders, and ``digest()``: code_digest over them.

    code_digest finds each package with ``importlib.import_module(name).__path__``; here that answers the
    copies (the checkout itself may be edited by another process while the suite runs)."""
    copies = tmp_path / "src"
    for name in ("loraflow", "tasks"):
        shutil.copytree(ROOT / name, copies / name, ignore=shutil.ignore_patterns("__pycache__"))
    real = importlib.import_module
    where = {"loraflow": copies / "loraflow", "tasks": copies / "tasks", "loraflow.tasks": copies / "tasks"}

    def import_copy(name, package=None):
        if name in where:
            return types.SimpleNamespace(__name__=name, __path__=[str(where[name])])
        return real(name, package)

    def digest() -> str:
        with monkeypatch.context() as m:
            m.setattr(importlib, "import_module", import_copy)
            return fingerprint.code_digest()

    return copies, digest


def test_code_digest_moves_with_any_source_file_and_nothing_else(source_copy):
    copies, digest = source_copy
    first = digest()
    assert re.fullmatch(r"[0-9a-f]{32}", first) and digest() == first

    config = copies / "loraflow" / "core" / "config.py"
    original = config.read_bytes()
    config.write_bytes(original + b"\n# one more line\n")
    changed = digest()
    assert changed != first
    assert b"alpha" in original
    config.write_bytes(original.replace(b"alpha", b"alphb", 1))  # same size, same name, one byte differs
    assert digest() not in (first, changed)
    config.write_bytes(original)
    assert digest() == first  # the content, not the file's time

    stage = copies / "tasks" / "train.py"
    stage.write_bytes(stage.read_bytes() + b"\n")
    assert digest() not in (first, changed)  # the stages count too
    stage.write_bytes(stage.read_bytes()[:-1])
    assert digest() == first

    (copies / "loraflow" / "model" / "added.py").write_text("X = 1\n")  # a new module in a subpackage
    assert digest() != first
    (copies / "loraflow" / "model" / "added.py").unlink()
    corpus = next((copies / "loraflow").rglob("*.txt"))  # data files that ship in the package (the corpus)
    original = corpus.read_bytes()
    corpus.write_bytes(original + b"x")
    assert digest() != first
    corpus.write_bytes(original)
    assert digest() == first

    # what is not source: bytecode caches and other files
    (copies / "loraflow" / "__pycache__").mkdir(exist_ok=True)
    (copies / "loraflow" / "__pycache__" / "config.cpython-311.pyc").write_bytes(b"\0")
    (copies / "loraflow" / "NOTES.md").write_text("notes")
    assert digest() == first


def test_code_digest_works_where_the_checkout_is_not_on_sys_path(tmp_path):
    """``loraflow stage register`` runs in the project's folder, where only the installed packages import (the
    stages as ``loraflow.tasks``: a top-level ``tasks`` imports only from the checkout's root)."""
    code = "from loraflow.core.fingerprint import code_digest; print(code_digest())"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.fullmatch(r"[0-9a-f]{32}", proc.stdout.strip())
