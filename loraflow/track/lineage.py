"""Where a registered model came from: git commit, dvc.lock digest, data, base and code digests, the knobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraflow.core.config import Config
from loraflow.core.fingerprint import dvc_lock_digest, git_commit, key, stage_inputs
from loraflow.core.paths import Paths


def read_report(paths: Paths, stage: str) -> dict[str, Any]:
    path = paths.report(stage)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def lineage(cfg: Config, paths: Paths, dataset: str | None = None) -> tuple[dict[str, str], str]:
    """The tags that lead a registered version back to its data, code and knobs, and its lineage key.

    The key hashes the register stage's inputs (``fingerprint.stage_inputs``: data, params, base
    weights, code): the same key is never registered twice. The tags carry the very digests it hashes.
    ``dataset``: the prepared data's digest as prepare returned it (None: from prepare's report).
    """
    inputs = stage_inputs("register", cfg, paths, dataset=dataset)
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
        "code_digest": inputs["code"],
        **source_tags(paths.root),
    }
    return tags, key(inputs)


def source_tags(root: Path) -> dict[str, str]:
    """The contract's ``git_commit`` and (where a dvc.lock exists) ``dvc_lock_digest``: where the code and
    the pipeline's pins were. MLflow runs (``tasks/runner.open_run``) and registered versions carry them."""
    tags = {"git_commit": git_commit(root)}
    if lock := dvc_lock_digest(root):
        tags["dvc_lock_digest"] = lock
    return tags
