"""Fingerprints: what the inputs of a stage are, as digests — the one answer to "are they the same?".

- **Data.** ``dataset_digest``: the md5 DVC 3 records for a directory output, computed without
  DVC. DVC hashes each file (plain md5 of its bytes; DVC 3 no longer converts CRLF), lists the files
  as ``[{"md5": ..., "relpath": ...}]`` sorted by relpath (POSIX separators), serializes that list
  with ``json.dumps(..., sort_keys=True)`` and takes the md5 of the UTF-8 bytes
  (dvc_data.hashfile.tree.Tree.as_bytes / digest). dvc.lock shows it as ``md5: <digest>.dir``; the
  bare 32-hex digest reads as a plain content hash in MLflow params and registry tags.
- **Base weights.** ``model.base`` names a base; its name alone says nothing about its weights (a
  local folder keeps its path when its files are replaced, a hub id's ``main`` moves). So
  ``base_fingerprint`` is computed offline: a local folder (the embedded ``models/base`` too, outside
  DVC) by the sha256 of each file in it (recursively; hidden files and ``*.md`` model cards left
  out); a hub id by the commit its revision resolves to in the local Hugging Face cache
  (``refs/<revision>``; a 40-hex revision is that commit already; not yet cached: ``unresolved``).
  Hashing a 7B base takes a minute, so a file's sha256 is cached by (path, size, mtime_ns, inode)
  in ``models/.sha256-cache.json``: a no-op ``dvc repro`` only stats the files. A file changed
  within the last 2 s is not cached (the same size and mtime could still follow within one tick).
  DVC: the ``base-digest`` stage (``always_changed``) writes ``models/base.digest.json`` on every
  ``dvc repro``; the stages that load the base depend on it, so new weights at the same path re-run
  them and the same bytes re-run nothing.
- **Code.** ``code_digest``: the pipeline's own source. **Commit.** ``git_commit`` and
  ``dvc_lock_digest`` are lineage tags (where a model came from), not keys.
- **A stage's inputs.** ``stage_inputs(stage, ...)`` says what a stage's result depends on, from the
  digests above and its config sections; ``key()`` hashes it. The Prefect cache keys
  (``flows/finetune.py``, which add where the output lives), the registry's lineage key
  (``track/lineage.lineage``: the register stage's inputs) and training resume (whose checkpoint
  record holds the same dataset digest) all use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from loraflow.core.atomic import write_json
from loraflow.core.config import EMBEDDED_BASE, Config
from loraflow.core.paths import Paths

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



CACHE_FILE = ".sha256-cache.json"  # under models/

RACY_S = 2.0

_COMMIT = re.compile(r"[0-9a-f]{40}")



def digest_path(paths: Paths) -> Path:
    """``models/base.digest.json``: what the ``base-digest`` stage writes and the base's readers depend on."""
    return paths.root / "models" / "base.digest.json"



def base_fingerprint(cfg: Config, paths: Paths, *, embedded_by_dvc: bool = False) -> dict[str, Any]:
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
    return base_fingerprint(cfg, paths)["digest"][:32]



def write_digest_file(cfg: Config, paths: Paths) -> Path:
    """``loraflow stage base-digest``: write ``models/base.digest.json`` (stable bytes: same base, same file)."""
    target = digest_path(paths)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_json(target, base_fingerprint(cfg, paths, embedded_by_dvc=True))
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



def git_commit(root: Path) -> str:
    """HEAD's commit (with ``-dirty`` when the work tree has changes), or ``unknown`` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha



def dvc_lock_digest(root: Path) -> str | None:
    """md5 of dvc.lock where one exists: pins every stage's deps and outs at once."""
    lock = root / "dvc.lock"
    return hashlib.md5(lock.read_bytes()).hexdigest() if lock.exists() else None



def code_digest() -> str:
    """sha256 (32 hex) of the pipeline's own source: the ``loraflow`` package and the stages (``tasks/``,
    installed as ``loraflow.tasks``). Not the Prefect flows (``flows/``): they decide where and when a
    stage runs, not what it computes, so editing them keys no stage anew.

    The "code" of a lineage key. A commit id is no measure of it: committing dvc.lock or a README
    makes a new one, every uncommitted edit shares one ``-dirty`` id, and outside git there is none.
    """
    import importlib

    h = hashlib.sha256()
    # (the name hashed with each file, the installed package): the stages keep the name "tasks" they were
    # hashed under before they were installed as loraflow.tasks, so the same code gives the same digest.
    for package, installed in (("loraflow", "loraflow"), ("tasks", "loraflow.tasks")):
        root = Path(importlib.import_module(installed).__path__[0])
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix in (".py", ".txt") and "__pycache__" not in path.parts:
                h.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode() + path.read_bytes() + b"\0")
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------------------------- stage inputs

# The config sections that change what training produces (eval, merge, register and orchestration do not).
TRAIN_SECTIONS = ("model", "data", "method", "quantization", "lora", "train")


def key(inputs: dict[str, Any]) -> str:
    """32 hex of ``inputs``: the form of every cache, resume and lineage key."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:32]


def source_digest(cfg: Config, root: Path) -> str | None:
    """The raw data's content: a file's md5, a folder's DVC digest; None for a hub dataset (no local content)."""
    given = Path(cfg.data.path).expanduser()
    local = given if given.is_absolute() else root / given
    if local.is_file():
        return file_md5(local)
    if local.is_dir():
        return dataset_digest(local)
    return None


def prepared_digest(paths: Paths) -> str:
    """The prepared data's digest as prepare reported it (``reports/prepare.json``); computed only
    when there is no report (prepared data written by hand)."""
    try:
        return json.loads(paths.report("prepare").read_text(encoding="utf-8"))["dataset_digest"]
    except (OSError, ValueError, KeyError):
        return dataset_digest(paths.prepared)


def stage_inputs(stage: str, cfg: Config, paths: Paths, *, dataset: str | None = None) -> dict[str, Any] | None:
    """What ``stage``'s result depends on: digests of what it reads (data, base weights, adapter, code)
    and the config sections it uses. None when there is nothing to key on (a hub dataset for
    prepare; no adapter or test split yet for evaluate and merge).

    ``dataset``: the prepared data's digest when the caller has it (the flow, from prepare's result).
    """
    config = cfg.model_dump(mode="json")
    inputs: dict[str, Any] = {"code": code_digest(), "base": base_digest(cfg, paths)}  # weights, not only a name
    if stage == "prepare":
        source = source_digest(cfg, paths.root)
        if source is None:
            return None
        return inputs | {"data": config["data"], "model": config["model"], "source": source}
    if stage == "train":
        return inputs | {"config": {k: config[k] for k in TRAIN_SECTIONS}, "data": dataset or prepared_digest(paths)}
    if stage == "register":  # the lineage key: the same key is never registered twice
        return inputs | {"config": config, "data": dataset or prepared_digest(paths)}
    if stage not in ("evaluate", "merge"):
        raise ValueError(f"unknown stage {stage!r}")
    test = paths.split("test")
    if not (paths.adapter / "adapter_config.json").exists() or not test.exists():
        return None
    inputs |= {"adapter": dataset_digest(paths.adapter), "test": file_md5(test), "model": config["model"],
               "max_length": cfg.data.max_length}
    if stage == "evaluate":
        return inputs | {"eval": config["eval"]}
    evaluated = paths.report("evaluate")  # merge compares its merged loss with the tuned loss there
    return inputs | {"merge": config["merge"], "eval_batch": cfg.eval.batch_size,
                     "evaluate_report": file_md5(evaluated) if evaluated.exists() else None}
