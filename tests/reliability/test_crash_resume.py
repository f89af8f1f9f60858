"""Crash mid-training: `loraflow stage train` killed with SIGKILL after a checkpoint, then re-run.

The kill lands while the next checkpoint is half written (the worst moment). The re-run removes
that one, resumes from the last complete checkpoint (step, optimizer, scheduler and RNG restored),
ends at the same step, and its loss and learning-rate curve equals an uninterrupted run's. A checkpoint from
another setup (data, LoRA config, quantization config) is never resumed: an interrupted run's is
refused with one line (what changed, where, `-s train.resume=restart`), a finished run's (the kept
last checkpoint) is removed and training starts at step 0, with a line that names what changed.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys

import pytest

from loraflow.core.config import load_config
from loraflow.core.paths import Paths
from tests.reliability.conftest import (
    error_line,
    kill,
    run_cli,
    start,
    wait_for,
    write_params,
    write_prepared,
)

STEPS, SAVE = 12, 4

# The child process: the real train stage, held inside Trainer._save_checkpoint of step 8 (adapter,
# optimizer and scheduler written; RNG state, trainer state and token counts not yet), so that the
# test's kill -9 lands mid-checkpoint every time.
CHILD = """
import sys, time
from pathlib import Path
from transformers import Trainer

_save_rng = Trainer._save_rng_state
def hang_mid_checkpoint(self, output_dir):
    if self.state.global_step == {step}:
        Path({mark!r}).write_text(str(output_dir))
        while True:
            time.sleep(1)
    return _save_rng(self, output_dir)
Trainer._save_rng_state = hang_mid_checkpoint

from loraflow.cli import main
sys.exit(main({argv!r}))
"""
TRAIN = {"max_steps": STEPS, "save_steps": SAVE, "logging_steps": 1, "lr_scheduler": "cosine",
         "warmup_ratio": 0.1, "batch_size": 4}
LORA = {"dropout": 0.1}  # dropout draws random numbers: the resumed run matches only if the RNG is restored


def curve(paths: Paths) -> dict[int, tuple[float, float]]:
    with open(paths.train_log, newline="") as fh:
        return {int(r["step"]): (float(r["loss"]), float(r["lr"])) for r in csv.DictReader(fh) if r["loss"]}


@pytest.mark.slow
def test_killed_training_resumes_and_matches_an_uninterrupted_run(tiny_llama, tmp_path):
    import loraflow.tasks.train

    # the uninterrupted run, in-process (the same stage function the CLI calls)
    ref_root = tmp_path / "ref"
    write_prepared(ref_root)
    ref_cfg = load_config(write_params(ref_root, tiny_llama, train=TRAIN, lora=LORA))
    ref_paths = Paths.at(ref_root)
    ref = loraflow.tasks.train.run(ref_cfg, ref_paths)
    assert ref.steps == STEPS

    root = tmp_path / "crash"
    write_prepared(root)
    params = write_params(root, tiny_llama, train=TRAIN, lora=LORA)
    paths = Paths.at(root)
    mark = root / "inside-checkpoint"
    child = CHILD.format(step=2 * SAVE, mark=str(mark), argv=["stage", "train", "-c", str(params)])
    proc = start([sys.executable, "-c", child], root, tmp_path / "killed.log")
    try:
        ckpt = paths.checkpoints / f"checkpoint-{SAVE}"
        wait_for(lambda: (ckpt / "trainer_state.json").exists() and mark.exists(), proc, 240, tmp_path / "killed.log",
                 f"checkpoint-{SAVE} and the kill point inside checkpoint-{2 * SAVE}")
    finally:
        assert kill(proc) == -9
    assert not paths.adapter.exists() and not paths.report("train").exists()  # nothing published by the dead run
    half = paths.checkpoints / f"checkpoint-{2 * SAVE}"
    assert (half / "optimizer.pt").exists() and not (half / "trainer_state.json").exists()

    # another rank by mistake: the half checkpoint dropped, then refused in one line, the last complete
    # checkpoint kept for the resume below
    r = run_cli(root, "stage", "train", "-c", str(params), "-s", "lora.r=4")
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"outputs/checkpoints/checkpoint-{2 * SAVE} is incomplete (the run stopped while saving it)" in r.stderr
    assert error_line(r.stderr) == (
        f"loraflow: error: train: outputs/checkpoints/checkpoint-{SAVE} is from an interrupted run of another setup "
        "(lora.r 8 -> 4); resuming it would mix two setups. To start over at step 0 add -s train.resume=restart "
        "(or delete outputs/checkpoints); to resume it, go back to that setup")
    assert (paths.checkpoints / f"checkpoint-{SAVE}" / "trainer_state.json").exists()

    # the same stage again: resumes from step 4 and redoes 5..12
    r = run_cli(root, "stage", "train", "-c", str(params))
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resuming from outputs/checkpoints/checkpoint-{SAVE} (step {SAVE} of {STEPS})" in r.stderr
    report = json.loads(paths.report("train").read_text())
    assert report["steps"] == STEPS and report["resumed_from"] == f"outputs/checkpoints/checkpoint-{SAVE}"

    got, want = curve(paths), curve(ref_paths)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        (loss, lr), (ref_loss, ref_lr) = got[step], want[step]
        assert lr == pytest.approx(ref_lr, rel=1e-6), (step, lr, ref_lr)  # the scheduler continued, not restarted
        assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-5), (step, loss, ref_loss)
    assert report["train_loss"] == pytest.approx(ref.train_loss, rel=1e-4)

    # the adapter equals the uninterrupted run's (optimizer moments restored: Adam without them drifts)
    from safetensors.torch import load_file

    a, b = (load_file(p / "adapter_model.safetensors") for p in (paths.adapter, ref_paths.adapter))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def _checkpointed(root, tiny_llama, **sections):
    """A finished 3-step run whose last checkpoint is kept (what a re-run would find)."""
    import loraflow.tasks.train

    write_prepared(root)
    cfg = load_config(write_params(root, tiny_llama, train={"max_steps": 3, "save_steps": 3}, **sections))
    loraflow.tasks.train.run(cfg, Paths.at(root))
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("change", ["data", "lora.r", "lora.target_modules", "quantization.double_quant",
                                    "quantization.quant_type"])
def test_a_checkpoint_of_another_setup_is_not_resumed(tiny_llama, tmp_path_factory, change):
    """An interrupted run's checkpoint of another setup: refused (one line: what changed, where, how to
    start over); `train.resume: restart` starts at step 0. A finished run's kept checkpoint: removed, and
    training starts at step 0 with a note naming what changed (so `dvc exp run -S lora.r=...` after a
    finished run just trains)."""
    from loraflow.core.errors import TrainingError
    from loraflow.core.fingerprint import dataset_digest
    from loraflow.train import checkpoints

    # one trained project per session, copied per case (training it is the slow part)
    root0 = tmp_path_factory.getbasetemp() / "resume-base"
    if not (root0 / "outputs" / "checkpoints" / "checkpoint-3").exists():
        _checkpointed(root0, tiny_llama)
    root = tmp_path_factory.mktemp("resume")
    shutil.copytree(root0, root, dirs_exist_ok=True)
    paths = Paths.at(root)
    cfg = load_config(root / "params.yaml")
    targets = json.loads((paths.checkpoints / checkpoints.FINGERPRINT_FILE).read_text())["lora.target_modules"]
    digest = dataset_digest(paths.prepared)  # what prepare returned for these files

    def fp(cfg):
        return checkpoints.fingerprint(cfg, paths, method="qlora", targets=targets, dataset=digest)

    same = checkpoints.plan_resume(paths, fp(cfg), 5)
    assert same.checkpoint and same.step == 3  # the unchanged setup resumes

    section, _, key = change.partition(".")
    if change == "data":
        with open(paths.split("train"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"id": "new", "prompt": "Q?\n", "completion": "A"}) + "\n")
        digest = dataset_digest(paths.prepared)
    else:
        value = {"r": 4, "target_modules": "attention-qv", "double_quant": False, "quant_type": "fp4"}[key]
        sec = getattr(cfg, section).model_copy(update={key: value})
        cfg = cfg.model_copy(update={section: sec})
        if key == "target_modules":
            targets = ["q_proj", "v_proj"]
    new = fp(cfg)
    named = {"data": "prepared_data"}.get(change, change)
    fp_file = paths.checkpoints / checkpoints.FINGERPRINT_FILE
    assert json.loads(fp_file.read_text())[checkpoints.FINISHED] is False  # the plan_resume above started a run

    # interrupted (no mark_finished after it): refused, nothing removed
    with pytest.raises(TrainingError) as e:
        checkpoints.plan_resume(paths, new, 5)
    want = {"lora.r": "lora.r 8 -> 4", "lora.target_modules": "lora.target_modules changed",
            "quantization.double_quant": "quantization.double_quant True -> False",
            "quantization.quant_type": "quantization.quant_type nf4 -> fp4"}.get(change, f"{named} changed")
    assert (f"train: outputs/checkpoints/checkpoint-3 is from an interrupted run of another setup ({want}); "
            "resuming it would mix two setups. To start over at step 0 add -s train.resume=restart") in str(e.value)
    assert (paths.checkpoints / "checkpoint-3").is_dir()
    assert checkpoints.plan_resume(paths, new, 5, restart=True).step == 0  # train.resume: restart
    assert not list(paths.checkpoints.glob("checkpoint-*"))

    # finished (what loraflow.tasks.train leaves): the kept checkpoint is removed and training starts at 0
    shutil.rmtree(paths.checkpoints)
    shutil.copytree(root0 / "outputs" / "checkpoints", paths.checkpoints)
    assert json.loads(fp_file.read_text())[checkpoints.FINISHED] is True
    resume = checkpoints.plan_resume(paths, new, 5)
    assert resume.checkpoint is None and resume.step == 0
    assert f"is from another setup ({named} changed); starting at step 0" in resume.note
    assert not list(paths.checkpoints.glob("checkpoint-*"))  # removed: never mixed into the new run
