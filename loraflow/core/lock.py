"""The project lock: one ``loraflow run`` or ``loraflow stage`` at a time in a project folder."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from loraflow.core.errors import LoraflowError

LOCK_FILE = ".loraflow.lock"


@contextlib.contextmanager
def project_lock(root: Path):
    """Hold ``<root>/.loraflow.lock`` (fcntl.flock) for a whole ``run``/``stage``: two pipelines in one
    project share data/prepared, outputs/ and reports/, so the second waits, saying for whom.

    The kernel drops the lock when its holder dies (even by kill -9): a stale file never blocks.
    """
    import fcntl

    try:
        fh = open(root / LOCK_FILE, "a+", encoding="utf-8")
    except OSError as e:  # a read-only project (or lock file): nothing could be written there anyway
        raise LoraflowError(
            f"cannot write the project lock {root / LOCK_FILE} ({e.strerror or type(e).__name__}): loraflow writes "
            f"data/prepared, outputs/ and reports/ in the project folder; make {root} writable (chmod u+w) or run "
            "from a writable copy of the project"
        ) from None
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            print(f"loraflow: waiting for another loraflow run in this project (pid {holder})", file=sys.stderr,
                  flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock
