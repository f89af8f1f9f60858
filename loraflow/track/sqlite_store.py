"""A new sqlite MLflow store starts from a cached empty schema instead of MLflow's migrations.

MLflow creates a new sqlite store's tables by replaying every alembic migration since its first
release: 2.4 s on this CPU, at the start of a project's first ``loraflow run`` (where nothing
else can overlap it: docs/traps.md §6) and in every test that opens a new store. The result is the same
empty schema each time for one MLflow version, so loraflow builds it once per version, with
MLflow's own function, into ``~/.cache/loraflow/`` and copies it to a new store's path. MLflow
then finds its tables at the head revision (it checks, as for any existing store) and adds the
default experiment with this store's own artifact root, as it would have.

It is only ever a faster path: a store that exists is never touched, and anything unexpected
(an MLflow without the private function, a read-only cache, a file system without hard links)
leaves the new store to MLflow, as before.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def seed(db: Path) -> bool:
    """Put the cached empty schema at ``db`` if nothing is there yet; True when it did."""
    if db.exists():
        return False
    tmp = db.with_name(f".{db.name}.seed-{os.getpid()}")
    try:
        shutil.copyfile(_template(), tmp)
        os.link(tmp, db)  # fails if another process created ``db`` meanwhile: never replace a store
        return True
    except Exception:  # noqa: BLE001 - MLflow creates the tables itself, as without a template
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _template() -> Path:
    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraflow"
    path = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if path.exists():
        return path
    import sqlalchemy

    from loraflow.core.private_api import mlflow_initialize_tables

    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
    try:
        mlflow_initialize_tables(engine)
    finally:
        engine.dispose()
    os.replace(tmp, path)  # whole or not at all: a concurrent builder writes the same bytes
    return path
