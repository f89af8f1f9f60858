"""merge when the output's disk fills (issue 16), for real: ``outputs/`` is a small tmpfs mounted for each test.

The merge stage runs unchanged on a tiny Llama QLoRA project; what it meets is the kernel's own ENOSPC. Space
runs out in two ways:

- before it starts: a ballast file leaves less free than the merged model needs (known from the shapes and
  the output dtype), and merge refuses before writing anything;
- while it writes: an audit hook (``sys.addaudithook``, which sees every ``open``) writes the ballast the moment
  the merge opens one of its output files, as another writer on the same disk would, after the up-front
  check has passed. Nothing of loraflow's is replaced.

Either way: one line (what, where, how much is needed and free, how to fix), no ``outputs/merged`` half
written, no temporary folder left, and the previous ``outputs/merged`` byte for byte as it was.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loraflow.core.errors import DiskFullError
from loraflow.core.progress import size_text
from tests.integration.test_evaluate import make_project, plant_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

DISK = 4 * 2**20  # each test's tmpfs: the adapter, a previous merge (~570 KiB) and the ballast


# --------------------------------------------------------------------------------------------- the disk


def _mount_tmpfs(folder: Path, size: int) -> None:
    """A tmpfs of ``size`` bytes on ``folder``; skips the test only where mounting is not permitted."""
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) on this machine: these tests need a small real filesystem to fill")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (or CAP_SYS_ADMIN): these tests need a small real filesystem")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 1024}k", "tmpfs", str(folder)],
                         check=False, capture_output=True, text=True)
    if out.returncode != 0:
        said = (out.stderr or out.stdout).strip()
        if any(s in said.lower() for s in ("permission denied", "not permitted", "must be superuser")):
            pytest.skip(f"mounting a tmpfs is not permitted here ({said})")
        raise AssertionError(f"mount -t tmpfs {folder}: {said}")


def _unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], check=False, capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], check=True)  # a model still mapped from it: detach lazily


def _block(folder: Path) -> int:
    return os.statvfs(folder).f_frsize


def _stored(folder: Path) -> int:
    """What the files of ``folder`` take on its filesystem: whole blocks each."""
    block = _block(folder)
    return sum(-(-f.stat().st_size // block) * block for f in folder.iterdir() if f.is_file())


def _leave_free(folder: Path, nbytes: int, name: str = "ballast") -> None:
    """Write a ballast file into ``folder`` so that exactly ``nbytes`` stay free on its filesystem."""
    free = shutil.disk_usage(folder).free
    assert free >= nbytes and nbytes % _block(folder) == 0, (free, nbytes)
    with open(folder / name, "wb") as fh:
        fh.write(b"\0" * (free - nbytes))
    assert shutil.disk_usage(folder).free == nbytes


def _contents(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------- the other writer


@dataclass
class _Filler:
    """Fills the disk when the merge opens ``name`` in its temporary folder under ``outputs``, leaving ``leave``
    bytes free: another writer taking the space mid-merge, after the up-front check passed."""

    outputs: Path | None = None
    name: str = ""
    leave: int = 0
    fired: bool = False

    def arm(self, outputs: Path, name: str, leave: int) -> None:
        self.outputs, self.name, self.leave, self.fired = outputs, name, leave, False

    def __call__(self, event: str, args: tuple) -> None:
        if event != "open" or self.outputs is None or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = Path(os.fsdecode(args[0]))
        if path.name == self.name and path.parent.parent == self.outputs and path.parent.name.startswith(".merged.tmp-"):
            outputs, self.outputs = self.outputs, None  # disarmed before the ballast's own open
            _leave_free(outputs, self.leave, "ballast-mid-merge")
            self.fired = True


@dataclass
class _Mkdirs:
    """Records the folders made under ``outputs`` (audit event ``os.mkdir``): a refusal up front makes none."""

    outputs: Path | None = None
    made: list[str] = field(default_factory=list)

    def arm(self, outputs: Path) -> None:
        self.outputs, self.made = outputs, []

    def __call__(self, event: str, args: tuple) -> None:
        if event == "os.mkdir" and self.outputs is not None and isinstance(args[0], (str, bytes, os.PathLike)):
            path = Path(os.fsdecode(args[0]))
            if self.outputs in path.parents:
                self.made.append(path.name)


_FILLER, _MKDIRS = _Filler(), _Mkdirs()
_HOOKED: list[bool] = []


def _hooks() -> None:
    """An audit hook cannot be removed: one for the session, each part disarmed between tests."""
    if not _HOOKED:
        sys.addaudithook(_FILLER)
        sys.addaudithook(_MKDIRS)
        _HOOKED.append(True)


@pytest.fixture
def filler():
    _hooks()
    yield _FILLER
    _FILLER.outputs = None


@pytest.fixture
def mkdirs():
    _hooks()
    yield _MKDIRS
    _MKDIRS.outputs = None


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def merged_once(tmp_path_factory, tiny_models):
    """A QLoRA project (planted adapter) merged once, on an ordinary disk: the adapter and a good merged folder
    to copy into each test's small disk, and what that merge takes there."""
    cfg, paths = make_project(tmp_path_factory.mktemp("merged-once"), tiny_models["llama"])
    plant_adapter(cfg, paths)
    _run_merge(cfg, paths)
    return cfg, paths


@pytest.fixture
def small_disk(tmp_path, merged_once):
    """A project whose ``outputs/`` is a fresh tmpfs holding the adapter and a previous good ``outputs/merged``."""
    cfg, paths = merged_once
    cfg_s, paths_s = make_project(tmp_path / "project", cfg.model.base)
    paths_s.outputs.mkdir(parents=True)
    _mount_tmpfs(paths_s.outputs, DISK)
    try:
        shutil.copytree(paths.adapter, paths_s.adapter)
        shutil.copytree(paths.merged, paths_s.merged)
        # What the merge needs there: the files it writes (a previous merge of the same adapter wrote the same
        # bytes), in whole blocks, and a block for its folder.
        need = _stored(paths_s.merged) + _block(paths_s.outputs)
        yield cfg_s, paths_s, need, _contents(paths_s.merged)
    finally:
        _unmount(paths_s.outputs)


def _run_merge(cfg, paths):
    import loraflow.tasks.merge

    return loraflow.tasks.merge.run(cfg, paths)


def _assert_nothing_left(paths, previous: dict[str, bytes]) -> None:
    """Only the adapter, the ballast and the previous merged folder, byte for byte; no report of this merge."""
    assert sorted(p.name for p in paths.outputs.iterdir() if not p.name.startswith("ballast")) == ["adapter", "merged"]
    assert _contents(paths.merged) == previous
    assert not paths.report("merge").exists()


# --------------------------------------------------------------------------------------------- the tests


def test_a_merge_that_cannot_fit_is_refused_before_anything_is_written(small_disk, mkdirs):
    cfg, paths, need, previous = small_disk
    block = _block(paths.outputs)
    _leave_free(paths.outputs, need - block)  # one block short
    mkdirs.arm(paths.outputs)
    with pytest.raises(DiskFullError) as err:
        _run_merge(cfg, paths)
    message = str(err.value)
    print(message)
    assert "\n" not in message
    assert message.startswith(
        f"merge: {paths.merged} will not fit: the merged model needs {size_text(need)} (float32 weights, configs, "
        f"the tokenizer files), its filesystem (mounted on {paths.outputs}) has {size_text(need - block)} free; "
        f"free {size_text(block)} on {paths.outputs} (deleting the previous merged folder frees "
        f"{size_text(need - block)}), or set merge.dtype bfloat16 ("
    ), message
    assert message.endswith(" needed), or put outputs/ on a larger disk (a symlink will do)"), message
    assert mkdirs.made == []  # refused before its temporary folder was made: nothing written at all
    _assert_nothing_left(paths, previous)


def test_a_merge_that_just_fits_is_not_refused(small_disk):
    """The up-front estimate is what the merge takes, not more: with exactly that free it goes through."""
    cfg, paths, need, previous = small_disk
    _leave_free(paths.outputs, need)
    _run_merge(cfg, paths)
    assert _contents(paths.merged) == previous  # the same adapter merged again: the same bytes
    assert sorted(p.name for p in paths.outputs.iterdir()) == ["adapter", "ballast", "merged"]


@pytest.mark.parametrize("trigger,writing,leave_blocks,raised", [
    # the weights, half written: the ballast leaves room for half of model.safetensors
    ("model.safetensors", "model.safetensors", None, OSError),
    # the tokenizer, written by Python (tokenizer_config.json, chat_template.jinja): nothing left
    ("chat_template.jinja", "the tokenizer files", 0, OSError),
    # tokenizer.json, written by the tokenizers library (Rust): its error is a plain Exception "... (os error 28)"
    ("tokenizer_config.json", "the tokenizer files", 1, Exception),
])
def test_a_disk_that_fills_mid_merge_is_one_line_and_leaves_the_previous_output(
        trigger, writing, leave_blocks, raised, small_disk, filler):
    cfg, paths, need, previous = small_disk
    block = _block(paths.outputs)
    leave = len(previous["model.safetensors"]) // 2 // block * block if leave_blocks is None else leave_blocks * block
    filler.arm(paths.outputs, trigger, leave)
    with pytest.raises(DiskFullError) as err:
        _run_merge(cfg, paths)
    assert filler.fired  # the space went while the merge was writing, after its up-front check passed
    cause = err.value.__context__  # what the write raised (the one line hides it, `from None`)
    assert type(cause) is raised, repr(cause)
    assert cause.errno == errno.ENOSPC if raised is OSError else str(cause).endswith("(os error 28)")
    message = str(err.value)
    print(message)
    free = shutil.disk_usage(paths.outputs).free  # the partial output is gone: what the user has to work with
    assert "\n" not in message
    assert message.startswith(
        f"merge: disk full while writing {writing} into {paths.merged} (No space left on device): the merged model "
        f"needs {size_text(need)} (float32 weights, configs, the tokenizer files), its filesystem (mounted on "
        f"{paths.outputs}) has {size_text(free)} free with the partial output removed; free {size_text(need - free)} "
        f"on {paths.outputs} (deleting the previous merged folder frees {size_text(need - block)}), or set "
        "merge.dtype bfloat16 ("
    ), message
    assert message.endswith(f" needed), or put outputs/ on a larger disk (a symlink will do); nothing was written to "
                            f"{paths.merged} (the previous one is kept)"), message
    _assert_nothing_left(paths, previous)


def test_a_failed_rename_puts_the_previous_output_back(tmp_path, monkeypatch):
    """atomic_dir's last step, the rename into place, can fail too (ENOSPC where a folder must grow): the previous
    output goes back where it was. (No tmpfs needs a block to rename, so the rename is made to fail here.)"""
    from loraflow.core import atomic

    target = tmp_path / "merged"
    target.mkdir()
    (target / "kept").write_text("previous merge")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".merged.tmp-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError), atomic.atomic_dir(target) as tmp:
        (tmp / "new").write_text("new merge")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert _contents(target) == {"kept": b"previous merge"}
