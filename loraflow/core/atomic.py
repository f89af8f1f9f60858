"""Write outputs to a temporary path and rename, so nothing half-written is ever left behind; and what a
writer needs to say why an output did not fit (``disk_full_errno``, ``disk_space``)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _umask() -> int:
    # mkdtemp/mkstemp create 0700/0600 entries; a published output should carry the
    # user's normal permissions (a shared DVC cache or a second user reads them).
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``target``; on success it replaces ``target``.

    On an exception (or a kill) the previous ``target`` stays intact and the temporary
    directory is removed (or left as ``.<name>.tmp-*``, never read by a stage).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    moved = False
    try:
        if target.exists():
            os.replace(target, old)
            moved = True
        os.replace(tmp, target)
    except BaseException:  # a rename can fail too (ENOSPC where the folder must grow): put the previous one back
        if moved:
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file next to ``target``; on success rename it over ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(target: str | Path, data: Any) -> None:
    """Atomically write pretty, key-sorted JSON (stable bytes for DVC)."""
    with atomic_file(target) as fh:
        json.dump(data, fh, indent=2, sort_keys=True, ensure_ascii=False)
        fh.write("\n")


def write_jsonl(target: str | Path, rows: list[dict]) -> None:
    """Atomically write one JSON object a line, keys sorted (stable bytes for DVC)."""
    with atomic_file(target) as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


# What a write answers when the output does not fit: the filesystem is full (ENOSPC), the user's quota is
# (EDQUOT), or the file is larger than the filesystem or ``ulimit -f`` allows (EFBIG).
DISK_FULL_ERRNOS = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, name))


def disk_full_errno(e: BaseException) -> int | None:
    """The errno when ``e`` is a write refused for lack of space (``DISK_FULL_ERRNOS``), else None.

    Writers in Rust (``tokenizers``' tokenizer.json, for one) raise a plain ``Exception`` that only says
    ``No space left on device (os error 28)``: read from the message, which ends that way for every
    ``std::io::Error`` they pass on.
    """
    if isinstance(e, OSError):
        return e.errno if e.errno in DISK_FULL_ERRNOS else None
    m = re.search(r"\(os error (\d+)\)\s*$", str(e))
    return int(m.group(1)) if m and int(m.group(1)) in DISK_FULL_ERRNOS else None


@dataclass(frozen=True)
class Space:
    """The filesystem that holds a path: its free bytes (as this user may use them), where it is mounted, and
    the block a file's size is rounded up to there."""

    free: int
    mount: Path
    block: int

    def stored(self, nbytes: int) -> int:
        """What a file of ``nbytes`` takes on this filesystem: whole blocks."""
        return -(-nbytes // self.block) * self.block


def disk_space(path: str | Path) -> Space:
    """``Space`` of the filesystem ``path`` is on (or would be: its nearest existing folder)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    free = shutil.disk_usage(p).free
    block = os.statvfs(p).f_frsize if hasattr(os, "statvfs") else 4096
    mount = p.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return Space(free, mount, block or 4096)
