"""Which weights the base model is: the fingerprint DVC and the Prefect cache keys are keyed on.

``model.base`` names a base; its name alone says nothing about its weights. A local folder keeps
its path when its files are replaced, and a hub id's ``main`` moves. So every key that depends on
the base takes this fingerprint of it, computed offline:

- a local folder (the embedded ``models/base`` too, outside DVC): the sha256 of each file in it
  (recursively; hidden files and ``*.md`` model cards left out), by relative name;
- a hub id: the commit its revision resolves to in the local Hugging Face cache
  (``refs/<revision>``); a 40-hex revision is that commit already. A model not yet in the cache
  is ``unresolved``: the first load downloads it, and the next key sees its commit.

Hashing a 7B base takes a minute, so a file's sha256 is cached by (path, size, mtime_ns, inode)
in ``models/.sha256-cache.json``: a no-op ``dvc repro`` only stats the files. A file changed
within the last 2 s is not cached (the same size and mtime could still follow within one clock tick).

DVC: the ``base-digest`` stage (``always_changed``) writes ``models/base.digest.json`` on every
``dvc repro``; the stages that load the base list it as a dependency, so new weights at the same
path re-run them, and an unchanged fingerprint (the same bytes) re-runs nothing. The embedded
``models/base`` is the ``base`` stage's output, which DVC hashes itself: the file then says so only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from loraflow.atomic import write_json
from loraflow.config import Config, ModelSection
from loraflow.paths import Paths

EMBEDDED_BASE = ModelSection.model_fields["base"].default  # "models/base" (= modeling.EMBEDDED_BASE)
CACHE_FILE = ".sha256-cache.json"  # under models/
RACY_S = 2.0
_COMMIT = re.compile(r"[0-9a-f]{40}")


def digest_path(paths: Paths) -> Path:
    """``models/base.digest.json``: what the ``base-digest`` stage writes and the base's readers depend on."""
    return paths.root / "models" / "base.digest.json"


def fingerprint(cfg: Config, paths: Paths, *, embedded_by_dvc: bool = False) -> dict[str, Any]:
    """What the configured base is, as JSON-ready data with a ``digest`` (sha256 hex) of it all.

    ``embedded_by_dvc``: for the DVC file, the embedded base is not hashed (DVC hashes that output).
    """
    base, revision = cfg.model.base, cfg.model.revision
    out: dict[str, Any] = {"model_base": base, "revision": revision}
    local = Path(base) if Path(base).is_absolute() else paths.root / base
    if base == EMBEDDED_BASE and embedded_by_dvc:
        out |= {"source": "embedded", "note": f"{EMBEDDED_BASE} is the base stage's output: DVC keys it itself"}
    elif local.is_dir():
        files = _folder_sha256(local, paths)
        out |= {"source": "local", "location": str(local.resolve()), "files": files}
    elif base == EMBEDDED_BASE:
        out |= {"source": "embedded", "built": False}  # built by the first stage that loads it
    elif base.startswith((".", "/", "~")) or base.count("/") > 1 or local.exists():
        out |= {"source": "missing", "location": str(local)}  # loading it says what is wrong
    else:
        out |= {"source": "hub", "commit": hub_commit(base, revision)}
    out["digest"] = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()
    return out


def base_digest(cfg: Config, paths: Paths) -> str:
    """The fingerprint's digest (32 hex): the base's part of a cache or lineage key."""
    return fingerprint(cfg, paths)["digest"][:32]


def write_digest_file(cfg: Config, paths: Paths) -> Path:
    """``loraflow stage base-digest``: write ``models/base.digest.json`` (stable bytes: same base, same file)."""
    target = digest_path(paths)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, fingerprint(cfg, paths, embedded_by_dvc=True))
    return target


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit ``revision`` (default ``main``) of ``repo_id`` resolves to in the local hub cache, else None."""
    rev = revision or "main"
    if _COMMIT.fullmatch(rev):
        return rev
    from huggingface_hub.constants import HF_HUB_CACHE  # a constants module: no network, ~20 ms

    ref = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / rev
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def _folder_sha256(folder: Path, paths: Paths) -> dict[str, str]:
    cache_file = paths.root / "models" / CACHE_FILE
    cache = _load_cache(cache_file)
    files: dict[str, str] = {}
    dirty = False
    now = time.time()
    for dirpath, dirnames, names in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(names):
            if name.startswith(".") or name.endswith(".md"):
                continue
            p = Path(dirpath) / name
            st = p.stat()
            key = f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
            sha = cache.get(key)
            if sha is None:
                sha = _sha256(p)
                if now - st.st_mtime_ns / 1e9 > RACY_S:
                    cache[key] = sha
                    dirty = True
            files[p.relative_to(folder).as_posix()] = sha
    if dirty:
        _save_cache(cache_file, cache)
    return files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _load_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_cache(path: Path, cache: dict[str, str]) -> None:
    # Entries of files that no longer exist are dropped, so the file stays as small as what is hashed.
    live = {k: v for k, v in cache.items() if os.path.exists(k.split("\0", 1)[0])}
    with contextlib.suppress(OSError):  # a cache: a read-only project only loses the speed-up
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, live)
