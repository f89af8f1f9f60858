"""DVC glue that is not a stage of its own: what ``loraflow stage base`` writes for another base model.

dvc.yaml's ``base`` stage owns the output ``models/base``. With the default ``model.base:
models/base`` it builds the embedded model there. With any other base (a hub id, a folder
elsewhere) nothing is built: the stage writes ``models/base/REFERENCE.md`` naming the configured
base, so the output DVC expects exists and says what it stands for. The stage lists
``params: [model.base]``, so switching back to the default re-runs it, and the embedded model is
built again (``modeling.base_location`` builds whenever ``models/base/config.json`` is missing).
"""

from __future__ import annotations

from pathlib import Path

from loraflow.atomic import atomic_dir
from loraflow.config import Config
from loraflow.modeling import EMBEDDED_BASE
from loraflow.paths import Paths

REFERENCE = "REFERENCE.md"


def write_base_reference(cfg: Config, paths: Paths) -> Path:
    """Replace ``models/base`` with a folder holding only ``REFERENCE.md``; return the file's path.

    The text names ``model.base`` and nothing else the stage does not list as a param, so the file
    never goes stale without DVC noticing.
    """
    embedded = EMBEDDED_BASE
    target = paths.root / embedded
    with atomic_dir(target) as tmp:
        (tmp / REFERENCE).write_text(
            f"# {embedded}: not built\n\n"
            f"params.yaml sets `model.base: {cfg.model.base}`, so the stages load that model and the\n"
            f"embedded base model is not built here. This file stands in for the `{embedded}` output of\n"
            "dvc.yaml's `base` stage. Set `model.base` back to its default "
            f"(`{embedded}`) and run `dvc repro`\n"
            "to build the embedded model in this folder.\n",
            encoding="utf-8",
        )
    return target / REFERENCE
