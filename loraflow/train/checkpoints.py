"""Checkpoints and resume, in one place: which checkpoint a run may continue, what each one holds.

The trainer writes ``outputs/checkpoints/checkpoint-N`` every ``train.save_steps`` (and its token
counts last, atomically: ``TOKENS_FILE``); ``loraflow_run.json`` beside them records which setup
wrote them and whether that run finished. ``plan_resume`` decides from those two.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.core.atomic import atomic_file
from loraflow.core.config import Config
from loraflow.core.errors import TrainingError
from loraflow.core.fingerprint import stage_inputs
from loraflow.core.messages import say
from loraflow.core.paths import Paths



TOKENS_FILE = "loraflow_tokens.json"  # token counters saved in each checkpoint, restored on resume


def restore_counts(trainer, checkpoint: str | Path) -> None:
    """Token counts as they were at ``checkpoint`` (for a resumed run)."""
    f = Path(checkpoint) / TOKENS_FILE
    if f.exists():
        data = json.loads(f.read_text())
        trainer.counts.total, trainer.counts.supervised = int(data["total"]), int(data["supervised"])


# Train-stage inputs whose change continues a run instead of starting another: how long it trains (a
# re-run with more steps picks up where the last stopped), how often it saves and logs, whether to
# resume, and gradient checkpointing (the same numbers, computed with less memory: the fix for an
# out-of-memory crash must not throw the run away).
CONTINUABLE = ("train.epochs", "train.max_steps", "train.save_steps", "train.logging_steps", "train.resume",
               "train.gradient_checkpointing")


def fingerprint(cfg: Config, paths: Paths, *, method: str, targets: list[str], dataset: str | None = None) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed, key by key (so the note can say what
    changed): the train stage's inputs (``fingerprint.stage_inputs("train")``, the same the Prefect cache
    keys on) with its config flattened to ``section.key``, the method and targets as training resolved
    them, minus ``CONTINUABLE``, and minus the code digest: resume is crash recovery, and the fix for a
    crash is often an edit to the code.

    ``dataset``: the prepared data's digest, as prepare returned it."""
    inputs = stage_inputs("train", cfg, paths, dataset=dataset)
    flat = {f"{section}.{k}" if isinstance(values, dict) else section: v
            for section, values in inputs["config"].items()
            for k, v in (values.items() if isinstance(values, dict) else [(None, values)])}
    flat = {k: v for k, v in flat.items() if k not in CONTINUABLE and not (k.startswith("quantization.") and method != "qlora")}
    return flat | {"method": method, "lora.target_modules": list(targets), "prepared_data": inputs["data"],
                   "base_weights": inputs["base"]}


FINGERPRINT_FILE = "loraflow_run.json"


@dataclass
class Resume:
    """Where training starts: a checkpoint of this same setup, or step 0."""

    checkpoint: str | None = None
    step: int = 0
    done: bool = False  # the checkpoint is already at the planned last step: nothing left to train
    note: str = ""  # what to tell the user


def plan_resume(paths: Paths, fp: dict[str, Any], planned_steps: int, restart: bool = False) -> Resume:
    """Resume from the last checkpoint when the same setup made it and it is not past the planned end.

    A checkpoint of another setup (data, base, method, LoRA or quantization config): refused
    (``TrainingError``) when its run was interrupted, since discarding hours of training for a
    setting changed by mistake is worse than one line to read; when its run finished (the
    last checkpoint is kept so that more steps continue it), removed, and training starts at 0:
    ``dvc exp run -S lora.r=...`` after a finished run trains the new setup. ``restart``
    (``train.resume: restart``), or a shorter run than the checkpoint, removes the checkpoints and
    starts at 0.
    """
    import shutil

    complete, incomplete = complete_checkpoints(paths)
    for d in incomplete:  # a kill while saving left it half written: never resume from it
        say(f"{_rel_to(paths.root, d)} is incomplete (the run stopped while saving it); removed it")
        shutil.rmtree(d, ignore_errors=True)
    last = str(complete[-1]) if complete else None
    resume = Resume()
    if last is not None and restart:
        resume.note = f"train.resume is restart: removed {_rel_to(paths.root, paths.checkpoints)}; starting at step 0"
    elif last is not None:
        f = paths.checkpoints / FINGERPRINT_FILE
        old = json.loads(f.read_text()) if f.exists() else {}
        changed = [k for k in fp if old.get(k) != fp[k]]
        step = int(last.rsplit("-", 1)[-1])
        where = _rel_to(paths.root, last)
        # Refused: what the run was about (data, base, method, LoRA, quantization). A changed training knob
        # (a lower learning rate after a non-finite loss, a smaller batch after running out of memory) restarts.
        # A file from before FINISHED existed counts as finished: restart, as before.
        setup = [k for k in changed if not k.startswith("train.")]
        if setup and not old.get(FINISHED, True):
            what = "; ".join(_change(k, old.get(k), fp[k]) for k in setup[:4])
            raise TrainingError(
                f"train: {where} is from an interrupted run of another setup ({what}); resuming it would mix two "
                f"setups. To start over at step 0 add -s train.resume=restart (or delete "
                f"{_rel_to(paths.root, paths.checkpoints)}); to resume it, go back to that setup"
            )
        if changed:
            resume.note = f"{where} is from another setup ({', '.join(changed[:4])} changed); starting at step 0"
        elif step > planned_steps:
            resume.note = f"{where} is past the planned {planned_steps} steps; starting at step 0"
        else:
            done = step == planned_steps
            resume = Resume(last, step, done, f"{where} is at the planned last step; nothing left to train"
                            if done else f"resuming from {where} (step {step} of {planned_steps})")
    if resume.checkpoint is None and paths.checkpoints.exists():
        shutil.rmtree(paths.checkpoints, ignore_errors=True)
    write_fingerprint(paths, fp | {FINISHED: False})  # until mark_finished: a kill leaves an interrupted run
    return resume


FINISHED = "finished"  # key of FINGERPRINT_FILE: the run that wrote the checkpoints ended successfully


def mark_finished(paths: Paths) -> None:
    """Record that training ended successfully: its kept checkpoint no longer blocks another setup."""
    f = paths.checkpoints / FINGERPRINT_FILE
    if f.exists():
        write_fingerprint(paths, json.loads(f.read_text()) | {FINISHED: True})


def _change(key: str, old: Any, new: Any) -> str:
    """``lora.r 8 -> 4`` for a short value; ``prepared_data changed`` for a digest, a list or a section."""
    short = all(isinstance(v, (int, float, str, bool, type(None))) and len(str(v)) <= 24 for v in (old, new))
    return f"{key} {old} -> {new}" if short else f"{key} changed"


def complete_checkpoints(paths: Paths) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) checkpoint folders, each by step. Complete: the trainer state and the token
    counts (written last, atomically) are both there; Trainer itself writes a checkpoint in place."""
    if not paths.checkpoints.is_dir():
        return [], []
    found = [d for d in paths.checkpoints.glob("checkpoint-*") if d.is_dir() and d.name.split("-")[-1].isdigit()]
    found.sort(key=lambda d: int(d.name.split("-")[-1]))
    complete, incomplete = [], []
    for d in found:
        try:
            json.loads((d / TOKENS_FILE).read_text())
            json.loads((d / "trainer_state.json").read_text())
            complete.append(d)
        except (OSError, ValueError):
            incomplete.append(d)
    return complete, incomplete


def planned_steps(trainer) -> int:
    """Optimizer steps the trainer will run in total: max_steps, or epochs x steps per epoch (as Trainer counts)."""
    args = trainer.args
    if args.max_steps > 0:
        return int(args.max_steps)
    batches = len(trainer.get_train_dataloader())
    per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    return math.ceil(args.num_train_epochs * per_epoch)


def checkpoint_state(checkpoint: str | Path):
    """The ``TrainerState`` saved in ``checkpoint`` (step, log history)."""
    from transformers import TrainerState

    return TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))


def load_checkpoint(trainer, checkpoint: str | Path) -> None:
    """Adapter weights and trainer state (log history, step) of ``checkpoint``, without training."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    set_peft_model_state_dict(trainer.model, load_file(str(checkpoint / "adapter_model.safetensors")))
    trainer.state = checkpoint_state(checkpoint)


def _rel_to(root: Path, p: str | Path) -> str:
    try:
        return Path(p).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(p)


def write_fingerprint(paths: Paths, fp: dict[str, Any]) -> None:
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    with atomic_file(paths.checkpoints / FINGERPRINT_FILE) as fh:
        json.dump(fp, fh, indent=2, sort_keys=True)


def keep_last_checkpoint(paths: Paths) -> str | None:
    """Remove every checkpoint but the last (kept so that a re-run with more steps continues)."""
    import shutil

    from transformers.trainer_utils import get_last_checkpoint

    if not paths.checkpoints.is_dir():
        return None
    last = get_last_checkpoint(str(paths.checkpoints))
    for d in paths.checkpoints.glob("checkpoint-*"):
        if d.is_dir() and str(d) != last:
            shutil.rmtree(d, ignore_errors=True)
    return last
