"""A new sqlite MLflow store seeded from the cached empty schema is the store MLflow would have made."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from loraflow.core.paths import Paths
from loraflow.track import sqlite_store, tracking


def _schema(db: Path) -> tuple[list, list]:
    """Every table, index and their columns and constraints (in any order: MLflow's own migrations
    emit a table's constraints in varying order), and the alembic revision."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        tables = sorted((kind, name, sorted(part.strip().rstrip(",") for part in (sql or "").splitlines()))
                        for kind, name, sql in rows)
        version = con.execute("SELECT version_num FROM alembic_version").fetchall()
    return tables, version


def test_seeded_store_equals_mlflows_own_and_works(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow import MlflowClient

    own = tmp_path / "own" / "mlflow.db"  # made by MLflow itself (migrations), no template
    own.parent.mkdir()
    own_default = MlflowClient(tracking_uri=f"sqlite:///{own}").get_experiment("0")

    projects = [Paths.at(tmp_path / name) for name in ("a", "b")]
    for paths in projects:
        cl = tracking.client(paths)  # seeds mlflow/mlflow.db, then MLflow opens it
        db = paths.mlflow_dir / "mlflow.db"
        assert _schema(db) == _schema(own)
        default = cl.get_experiment("0")  # added by MLflow when it opened this store, as for its own
        assert (default.name, default.artifact_location) == (own_default.name, own_default.artifact_location)
        exp = cl.create_experiment("e")
        run = cl.create_run(exp)
        cl.log_metric(run.info.run_id, "loss", 1.5)
        assert cl.get_run(run.info.run_id).data.metrics == {"loss": 1.5}
    [template] = (tmp_path / "cache" / "loraflow").glob("mlflow-*-empty.db")  # built once, reused
    with sqlite3.connect(template) as con:
        assert con.execute("SELECT COUNT(*) FROM experiments").fetchone() == (0,)  # tables only, no rows


def test_an_existing_store_is_never_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"someone's store")
    assert sqlite_store.seed(db) is False
    assert db.read_bytes() == b"someone's store"
    assert not list(tmp_path.glob(".mlflow.db.seed-*"))
