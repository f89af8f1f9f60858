"""Interrupted writes: `loraflow stage merge` killed with SIGKILL while it writes the merged model.

The previous outputs/merged stays byte-for-byte intact (what DVC hashes and register loads); the
half-written file is left only in a hidden ``.merged.tmp-*`` sibling that no stage reads.
"""

from __future__ import annotations

import sys

import pytest

from loraflow.core.config import load_config
from loraflow.core.fingerprint import dataset_digest
from loraflow.core.paths import Paths
from tests.reliability.conftest import (
    kill,
    start,
    wait_for,
    write_params,
    write_prepared,
)

# The child process: the real merge stage, whose safetensors write is cut off halfway and then held
# there (the file on disk is half written), so that the test's kill -9 lands mid-write every time.
CHILD = """
import sys, time
from pathlib import Path
import loraflow.model.streaming_merge as sm

_write = sm._write_shard
def half_then_hang(path, items, make, progress):
    _write(path, items, make, progress)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    Path({mark!r}).write_text(str(path))
    while True:
        time.sleep(1)
sm._write_shard = half_then_hang

from loraflow.cli import main
sys.exit(main(["stage", "merge", "-c", {params!r}]))
"""


def snapshot(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_merge_killed_mid_write_leaves_the_previous_merged_model_intact(tiny_llama, tmp_path):
    import loraflow.tasks.merge
    import loraflow.tasks.train

    write_prepared(tmp_path, n_train=16, n_test=4)
    params = write_params(tmp_path, tiny_llama, method="lora", train={"max_steps": 2})
    cfg, paths = load_config(params), Paths.at(tmp_path)
    loraflow.tasks.train.run(cfg, paths)
    loraflow.tasks.merge.run(cfg, paths)
    before, digest = snapshot(paths.merged), dataset_digest(paths.merged)
    assert "model.safetensors" in before

    mark = tmp_path / "half-written"
    proc = start([sys.executable, "-c", CHILD.format(mark=str(mark), params=str(params))], tmp_path,
                 tmp_path / "merge.log")
    try:
        wait_for(mark.exists, proc, 240, tmp_path / "merge.log", "the half-written safetensors")
    finally:
        assert kill(proc) == -9
    half = mark.read_text()
    assert "/.merged.tmp-" in half  # it was writing into the temporary sibling, not into outputs/merged

    assert snapshot(paths.merged) == before and dataset_digest(paths.merged) == digest
    leftovers = list(paths.outputs.glob(".merged.tmp-*"))
    assert len(leftovers) == 1 and not leftovers[0].samefile(paths.merged)

    # what a later stage loads is the intact model (register loads outputs/merged like this)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(paths.merged, use_safetensors=True)
    with pytest.raises(Exception):  # the half file is unreadable: good that nothing reads it
        load_file(half)

    # and merge runs again cleanly over the debris
    loraflow.tasks.merge.run(cfg, paths)
    assert set(snapshot(paths.merged)) == set(before)


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
def test_a_half_file_from_outside_loraflow_is_one_line_never_a_crash(tiny_llama, tmp_path):
    """Files loraflow did not write atomically (a copy or download cut short, a hand edit) are reported, not
    half-read: a truncated base, a truncated adapter, a truncated prepared split."""
    import shutil

    import loraflow.tasks.train

    from loraflow.core.errors import DataError, ModelError
    from loraflow.model import loading
    from tests.reliability.conftest import cli_in_process, error_line

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    _truncate(base / "model.safetensors")
    cfg = load_config(None, [f"model.base={base}"])
    with pytest.raises(ModelError, match=r"model.base: a weight file in .* is damaged or incomplete"):
        loading.load_model(cfg, Paths.at(tmp_path), quantized=False)

    root = tmp_path / "p"
    write_prepared(root, n_train=16, n_test=4)
    params = write_params(root, tiny_llama, method="lora", train={"max_steps": 1})
    paths = Paths.at(root)
    loraflow.tasks.train.run(load_config(params), paths)
    _truncate(paths.adapter / "adapter_model.safetensors")
    with cli_in_process(root) as cli:
        rc, err = cli("stage", "evaluate")
    assert rc == 2
    assert "the adapter's weights are damaged or incomplete" in error_line(err)
    assert not paths.report("evaluate").exists()

    text = paths.split("train").read_text(encoding="utf-8")
    paths.split("train").write_text(text[: len(text) // 2 + 7], encoding="utf-8")  # cut inside a row
    with pytest.raises(DataError, match=r"train\.jsonl:\d+: not valid JSON .*re-run `loraflow stage prepare`"):
        loraflow.tasks.train.run(load_config(params), paths)
