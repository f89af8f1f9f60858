"""Where a model came from: git commit, dvc.lock digest, data and code digests, and the knobs."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from loraflow.config import Config
from loraflow.fingerprint import base_digest, code_digest, dvc_lock_digest, git_commit
from loraflow.paths import Paths


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
