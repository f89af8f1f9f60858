"""Where a model came from: git commit, dvc.lock digest, data and code digests, and the knobs."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from loraflow.basedigest import base_digest
from loraflow.config import Config
from loraflow.paths import Paths


def git_commit(root: Path) -> str:
    """HEAD's commit (with ``-dirty`` when the work tree has changes), or ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def dvc_lock_digest(root: Path) -> str | None:
    """md5 of dvc.lock where one exists: pins every stage's deps and outs at once."""
    lock = root / "dvc.lock"
    return hashlib.md5(lock.read_bytes()).hexdigest() if lock.exists() else None


def code_digest() -> str:
    """sha256 (32 hex) of the pipeline's own source: the ``loraflow`` and ``tasks`` packages.

    The "code" of a lineage key. A commit id is no measure of it: committing dvc.lock or a README
    makes a new one, every uncommitted edit shares one ``-dirty`` id, and outside git there is none.
    """
    import importlib

    h = hashlib.sha256()
    for package in ("loraflow", "tasks"):
        # __path__, not __file__: a namespace package (no __init__.py) has no __file__.
        root = Path(importlib.import_module(package).__path__[0])
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in (".py", ".txt") and "__pycache__" not in path.parts:
                h.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode() + path.read_bytes() + b"\0")
    return h.hexdigest()[:32]


def read_report(paths: Paths, stage: str) -> dict[str, Any]:
    path = paths.report(stage)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def lineage_tags(cfg: Config, paths: Paths) -> dict[str, str]:
    """Tags that lead a registered version back to its data, code and knobs."""
    prepare = read_report(paths, "prepare")
    tags = {
        "base_model": cfg.model.base,
        "base_revision": cfg.model.revision or "",
        "method": cfg.method,
        "lora_r": str(cfg.lora.r),
        "lora_alpha": f"{cfg.lora.alpha:g}",
        "lora_scale": f"{cfg.lora.scale:g}",
        "lora_target_modules": json.dumps(cfg.lora.target_modules),
        "dataset_digest": str(prepare.get("dataset_digest", "unknown")),
        "base_digest": base_digest(cfg, paths),  # which weights: a path or hub id alone does not say
        "git_commit": git_commit(paths.root),
        "code_digest": code_digest(),
    }
    lock = dvc_lock_digest(paths.root)
    if lock:
        tags["dvc_lock_digest"] = lock
    return tags


def lineage_key(cfg: Config, tags: dict[str, str]) -> str:
    """One hash of (data, params, base weights, code): the same key is never registered twice."""
    blob = json.dumps(
        {"config": cfg.model_dump(mode="json"), "data": tags.get("dataset_digest"), "code": tags.get("code_digest"),
         "base": tags.get("base_digest")},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
