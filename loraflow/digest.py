"""The dataset digest: the md5 DVC 3 records for a directory output, computed without DVC.

DVC hashes each file (plain md5 of its bytes; DVC 3 no longer converts CRLF), lists the files
as ``[{"md5": ..., "relpath": ...}]`` sorted by relpath (POSIX separators), serializes that list
with ``json.dumps(..., sort_keys=True)`` (default separators, ASCII escapes) and takes the md5 of
the UTF-8 bytes (dvc_data.hashfile.tree.Tree.as_bytes / digest). dvc.lock then shows it as
``md5: <digest>.dir``. ``dataset_digest`` returns the bare 32-hex digest, without ``.dir``, so it
reads as a plain content hash in MLflow params and registry tags; append ``.dir`` to compare
with dvc.lock.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DVC_DIR_SUFFIX = ".dir"


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    """md5 of a file's bytes, as DVC 3 hashes a file."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def dataset_digest(dir: Path) -> str:
    """DVC 3's md5 of ``dir`` as a directory output (what dvc.lock shows), without the ``.dir`` suffix."""
    dir = Path(dir)
    entries = [
        {"md5": file_md5(p), "relpath": p.relative_to(dir).as_posix()}
        for p in dir.rglob("*")
        if p.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    manifest = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(manifest, usedforsecurity=False).hexdigest()
