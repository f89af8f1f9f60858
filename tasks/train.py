"""The train stage: LoRA or QLoRA on the prepared train split, answers only.

    loraflow stage train [-c params.yaml] [-s lora.r=32 ...]

seed → data → tokenizer → model (4-bit NF4 for QLoRA) → LoRA on the resolved targets → SFT trainer
→ label audit → train (resuming from the last checkpoint of the same setup) → eval on val
→ adapter (safetensors + adapter_config.json + tokenizer) → reports/train.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraflow.core.atomic import atomic_dir, atomic_file, write_json
from loraflow.core.config import Config
from loraflow.core.errors import DataError
from loraflow.core.messages import say, say_block, stage
from loraflow.core.paths import Paths
from loraflow.track.tracking import NullTracker, Tracker


@dataclass
class TrainResult:
    """What the train stage hands on (also the bulk of reports/train.json)."""

    train_loss: float | None  # mean loss over the last train.logging_steps steps
    steps: int  # optimizer steps in total (a resumed run counts the earlier ones)
    tokens: int  # non-padding tokens trained on
    supervised_tokens: int  # of which answer + EOS tokens (the ones in the loss)
    tokens_per_second: float  # this process's throughput, non-padding tokens
    trainable_params: int
    trainable_pct: float
    adapter_dir: str  # relative to the project root
    method: str  # qlora | lora (auto resolved)
    quantized_layers: int = 0  # bitsandbytes Linear4bit layers in the frozen base (0 for lora)
    eval_loss: float | None = None  # loss on the val split after training (None without a val split)
    resumed_from: str | None = None


def run(cfg: Config, paths: Paths, tracker: Tracker = NullTracker(), callbacks: list | None = None,
        dataset_digest: str | None = None) -> TrainResult:
    """Train the adapter, save it to ``paths.adapter`` and write ``reports/train.json``.

    ``dataset_digest``: the prepared data's digest as prepare returned it (the flows pass it on); None
    takes it from prepare's report, its result persisted (``loraflow stage``, ``dvc repro``: one process
    per stage). ``callbacks``: extra ``transformers.TrainerCallback`` objects (tests use one to plant faults).
    """
    import torch
    from transformers import set_seed

    from loraflow import planner
    from loraflow.core.fingerprint import prepared_digest
    from loraflow.data.splits import load_split
    from loraflow.model import loading, quant
    from loraflow.model.targets import resolve_targets
    from loraflow.train import checkpoints, label_audit, lora, memory, rankcheck, sft
    from loraflow.train.callbacks import LossBar, TrainLog, final_loss

    stage("train")
    started = time.perf_counter()
    dataset_digest = dataset_digest or prepared_digest(paths)
    set_seed(cfg.train.seed)

    # data
    train_rows, val_rows = load_split(paths, "train"), _optional_split(paths, "val")
    if not train_rows:
        raise DataError(f"{paths.split('train')}: the train split is empty; check data.path and re-run prepare")

    # tokenizer and model
    tokenizer = loading.load_tokenizer(cfg, paths)
    method, why = planner.resolve_method(cfg, paths)
    if cfg.method == "auto":
        say(why)
    quantized = method == "qlora"
    cdtype = loading.compute_dtype(cfg)
    model = loading.load_model(cfg, paths, quantized=quantized, dtype=cdtype if not quantized else None)
    quantized_layers = quant.count_4bit_layers(model)
    if quantized and quantized_layers == 0:
        say(f"warning: {type(model).__name__} has no layer bitsandbytes can quantize; training it unquantized")
    targets = resolve_targets(model, cfg.lora.target_modules)
    model = lora.attach_lora(model, cfg, targets, quantized=quantized)
    trainable, total = lora.trainable_params(model)
    pct = 100.0 * trainable / max(total, 1)
    say(
        f"{method} on {cfg.model.base}: r={cfg.lora.r}, alpha={cfg.lora.alpha:g} (scale {cfg.lora.scale:g}), "
        f"targets {', '.join(targets)}; {trainable:,} trainable params ({pct:.3f}% of {total:,})"
    )
    params = _params(cfg, method, targets, trainable, pct) | {"dataset_digest": dataset_digest}
    tracker.log_params(params)
    # the same digest as an MLflow dataset input: "Datasets used" in the UI
    tracker.log_dataset("prepared", dataset_digest, _rel(paths, paths.prepared), "training")

    # trainer, and what it will train on
    log = TrainLog(paths.train_log, tracker)
    trainer = sft.build_trainer(
        cfg, paths, model, tokenizer, train_rows, val_rows, compute_dtype=cdtype, callbacks=[log, *(callbacks or [])]
    )
    audit = label_audit.audit_labels(trainer, tokenizer, train_rows, cfg.data.max_length)
    with atomic_file(paths.label_audit) as fh:
        fh.write(audit.text)
    say_block(audit.text)

    # resume only from a checkpoint of this same setup; anything else starts over
    fp = checkpoints.fingerprint(cfg, paths, method=method, targets=targets, dataset=dataset_digest)
    resume = checkpoints.plan_resume(paths, fp, checkpoints.planned_steps(trainer), restart=cfg.train.resume == "restart")
    if resume.note:
        say(resume.note)
    if resume.checkpoint:
        checkpoints.restore_counts(trainer, resume.checkpoint)
    log.start(checkpoints.checkpoint_state(resume.checkpoint).log_history if resume.checkpoint else [])

    train_seconds = 0.0
    if resume.done:
        checkpoints.load_checkpoint(trainer, resume.checkpoint)
    else:
        bar = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LossBar))
        try:
            with memory.out_of_memory_as_error(cfg, paths, method, trainer):  # one line with advice, not a crash
                output = trainer.train(resume_from_checkpoint=resume.checkpoint)
        finally:
            bar.close()
        train_seconds = float(output.metrics.get("train_runtime") or 0.0)
    steps = trainer.state.global_step
    tokens_per_second = trainer.counts.session_total / train_seconds if train_seconds > 0 else 0.0

    eval_loss = None
    if val_rows:
        # Safe on the 4-bit model: load_model turned the CPU repack off (docs/traps.md §1).
        with memory.out_of_memory_as_error(cfg, paths, method):
            eval_loss = float(trainer.evaluate()["eval_loss"])
        say(f"eval_loss {eval_loss:.4f} on {len(val_rows)} val examples")
        # "val_loss", not "eval_loss": that name is the evaluate stage's test-split metric in the same run.
        tracker.log_metrics({"val_loss": eval_loss}, step=steps)

    # the adapter: written whole or not at all, and only after training succeeded
    with atomic_dir(paths.adapter) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        _sort_sets(tmp / "adapter_config.json")
        tokenizer.save_pretrained(str(tmp))
        write_json(tmp / loading.ADAPTER_META, _adapter_meta(cfg, method, targets, cdtype))
    last = checkpoints.keep_last_checkpoint(paths)
    checkpoints.mark_finished(paths)  # its kept checkpoint now lets another setup start over (plan_resume)
    # How much of r the adapter uses (singular values of each B·A), and whether to raise r.
    adapter_rank = rankcheck.check_adapter(paths.adapter, trainer.state.log_history, cfg.lora.r, cfg.lora.alpha)
    tracker.log_metrics(adapter_rank.metrics(), step=steps)
    if adapter_rank.suggestion:
        say(f"suggestion: {adapter_rank.suggestion}")

    result = TrainResult(
        train_loss=final_loss(trainer.state.log_history, cfg.train.logging_steps),
        steps=steps,
        tokens=trainer.counts.total,
        supervised_tokens=trainer.counts.supervised,
        tokens_per_second=round(tokens_per_second, 1),
        trainable_params=int(trainable),
        trainable_pct=round(pct, 4),
        adapter_dir=_rel(paths, paths.adapter),
        method=method,
        quantized_layers=quantized_layers,
        eval_loss=eval_loss,
        resumed_from=_rel(paths, resume.checkpoint) if resume.checkpoint else None,
    )
    report = asdict(result) | {
        "tokens": {"total": result.tokens, "supervised": result.supervised_tokens},
        "lora_r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "lora_target_modules": targets,
        "mlflow_run_id": tracker.run_id,
        "last_checkpoint": _rel(paths, last) if last else None,
        "seconds": round(time.perf_counter() - started, 1),
        "batching": trainer.batching.mode,  # what train.batching resolved to (auto: padding_free when safe)
        "adapter": adapter_rank.to_dict(),
    }
    report.pop("supervised_tokens")
    write_json(paths.report("train"), report)
    # The adapter in the run as exactly `adapter/`: later stages on other machines download it from there.
    tracker.log_artifact(paths.adapter, "adapter")
    say(
        f"{steps} steps, final loss {result.train_loss if result.train_loss is not None else float('nan'):.4f}, "
        f"{result.tokens_per_second:,.0f} tokens/s; adapter in {result.adapter_dir}"
    )
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------


def _optional_split(paths: Paths, name: str) -> list[dict]:
    from loraflow.data.splits import load_split

    return load_split(paths, name) if paths.split(name).exists() else []


def _params(cfg: Config, method: str, targets: list[str], trainable: int, pct: float) -> dict[str, Any]:
    """The contract's MLflow run params."""
    from loraflow.model.loading import compute_dtype

    params: dict[str, Any] = {
        "base_model": cfg.model.base,
        "method": method,
        "lora_r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "lora_scale": cfg.lora.scale,
        "lora_dropout": cfg.lora.dropout,
        "lora_target_modules": ",".join(targets),
        "quant_type": cfg.quantization.quant_type if method == "qlora" else "none",
        "double_quant": cfg.quantization.double_quant if method == "qlora" else False,
        "compute_dtype": str(compute_dtype(cfg)).removeprefix("torch."),
        "trainable_params": trainable,
        "trainable_pct": round(pct, 4),
        "max_length": cfg.data.max_length,
        "learning_rate": cfg.train.learning_rate,
    }
    return params


def _sort_sets(config_file: Path) -> None:
    """peft holds target_modules as a set and writes it in hash order, which changes with every process
    (PYTHONHASHSEED); sorted, the same training writes the same bytes and DVC sees an unchanged adapter."""
    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    for key in ("target_modules", "exclude_modules"):
        if isinstance(cfg.get(key), list):
            cfg[key] = sorted(cfg[key])
    config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")


def _adapter_meta(cfg: Config, method: str, targets: list[str], cdtype) -> dict[str, Any]:
    """How this adapter was trained: evaluate and merge (maybe on another machine) load the base the same way."""
    return {
        "method": method,
        "base_model": cfg.model.base,
        "revision": cfg.model.revision,
        "quantization": cfg.quantization.model_dump() if method == "qlora" else None,
        "compute_dtype": str(cdtype).removeprefix("torch."),
        "target_modules": list(targets),
        "lora_r": cfg.lora.r,
        "lora_alpha": cfg.lora.alpha,
        "max_length": cfg.data.max_length,
    }


def _rel(paths: Paths, p) -> str:
    p = Path(p)
    try:
        return p.resolve().relative_to(paths.root).as_posix()
    except ValueError:
        return str(p)

