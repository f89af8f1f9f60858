"""The package layout: every package folder is installed, under the project's own namespace."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_installed_and_tasks_and_flows_live_under_loraflow():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    mapped = {folder: name for name, folder in tool["package-dir"].items()}  # tasks -> loraflow.tasks
    found = set()
    for init in ROOT.glob("**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        top = rel.parts[0]
        if top in ("loraflow", *mapped):
            name = ".".join(rel.parts) if top == "loraflow" else ".".join([mapped[top], *rel.parts[1:]])
            found.add(name)
    assert found == set(tool["packages"])
    assert not {"tasks", "flows"} & set(tool["packages"])  # no generic top-level names in site-packages


def test_the_core_has_no_import_cycle_between_model_and_planner():
    """loraflow/model never imports the planner (the planner imports model/ for the base's location)."""
    for f in (ROOT / "loraflow" / "model").rglob("*.py"):
        assert "loraflow.planner" not in f.read_text(encoding="utf-8"), f


def test_core_imports_no_other_loraflow_package():
    """loraflow/core is the bottom layer every stage shares (dvc.yaml names it as one dependency): it
    imports nothing from loraflow's other packages, the stages or the flows."""
    import re

    for f in (ROOT / "loraflow" / "core").rglob("*.py"):
        for name in re.findall(r"^\s*(?:from|import)\s+(loraflow[\w.]*)", f.read_text(encoding="utf-8"), re.M):
            assert name == "loraflow" or name.startswith("loraflow.core"), f"{f.name} imports {name}"
