"""loraflow/core/private_api.py: the private names loraflow uses still exist, in the versions they were read in.

A failure here is not a bug: a library moved. Re-read the use in loraflow/core/private_api.py against the
new version, then update CHECKED_AGAINST."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sys

from loraflow.core import private_api


def test_installed_versions_are_the_ones_the_private_uses_were_checked_against():
    installed = {"python": f"{sys.version_info.major}.{sys.version_info.minor}"}
    installed |= {name: ".".join(md.version(name).split(".")[:2]) for name in private_api.CHECKED_AGAINST
                  if name != "python"}
    assert installed == private_api.CHECKED_AGAINST


def test_every_private_name_is_still_there():
    import atexit
    import threading

    from transformers import Trainer

    assert callable(threading._shutdown) and callable(atexit._run_exitfuncs)
    assert callable(importlib.import_module("mlflow.store.db.utils")._initialize_tables)
    for module, name in (("mlflow.tracking._tracking_service.utils", "_tracking_uri"),
                         ("mlflow.tracking._model_registry.utils", "_registry_uri")):
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"
    assert callable(getattr(Trainer, private_api.TRAINER_SAVE_CHECKPOINT))
    server = importlib.import_module("prefect.server.api.server")
    assert callable(server.create_app) and hasattr(server, "SubprocessASGIServer")


def test_the_fluent_uri_is_put_back(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    with private_api.mlflow_fluent_uri(f"sqlite:///{tmp_path / 'x.db'}"):
        assert mlflow.get_tracking_uri().endswith("x.db")
    assert mlflow.get_tracking_uri() == before and "MLFLOW_TRACKING_URI" not in __import__("os").environ
