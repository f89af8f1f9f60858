"""Where a registered model came from: git commit, dvc.lock digest, data, base and code digests, the knobs."""

from __future__ import annotations

import json
from typing import Any

from loraflow.config import Config
from loraflow.fingerprint import dvc_lock_digest, git_commit, key, stage_inputs
from loraflow.paths import Paths


def read_report(paths: Paths, stage: str) -> dict[str, Any]:
    path = paths.report(stage)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def lineage(cfg: Config, paths: Paths) -> tuple[dict[str, str], str]:
    """The tags that lead a registered version back to its data, code and knobs, and its lineage key.

    The key hashes the register stage's inputs (``fingerprint.stage_inputs``: data, params, base
    weights, code): the same key is never registered twice. The tags carry the very digests it hashes.
    """
    inputs = stage_inputs("register", cfg, paths)
    tags = {
        "base_model": cfg.model.base,
        "base_revision": cfg.model.revision or "",
        "method": cfg.method,
        "lora_r": str(cfg.lora.r),
        "lora_alpha": f"{cfg.lora.alpha:g}",
        "lora_scale": f"{cfg.lora.scale:g}",
        "lora_target_modules": json.dumps(cfg.lora.target_modules),
        "dataset_digest": inputs["data"],
        "base_digest": inputs["base"],  # which weights: a path or hub id alone does not say
        "git_commit": git_commit(paths.root),
        "code_digest": inputs["code"],
    }
    if lock := dvc_lock_digest(paths.root):
        tags["dvc_lock_digest"] = lock
    return tags, key(inputs)
