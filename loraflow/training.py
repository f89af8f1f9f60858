"""The pieces of the train stage: LoRA attachment, the SFT trainer, the label audit, callbacks.

``tasks/train.py`` reads top to bottom with these; tests build the very same trainer
(``build_trainer``) to look at what training sees: ``trainer.train_dataset`` (tokenized,
labels with the prompt set to -100) and ``trainer.get_train_dataloader()`` (collated batches).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow import progress
from loraflow.atomic import atomic_file
from loraflow.config import Config
from loraflow.errors import ConfigError, TrainingError
from loraflow.paths import Paths
from loraflow.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
    from trl import SFTConfig

IGNORE = -100  # label of a token that is not trained on (prompt, padding)
TOKENS_FILE = "loraflow_tokens.json"  # token counters saved in each checkpoint, restored on resume
LOG_COLUMNS = ("step", "loss", "lr", "tokens_per_second", "eval_loss")


def say(msg: str) -> None:
    print(f"    {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Data


def to_dataset(rows: list[dict]) -> "datasets.Dataset":
    """Prepared rows as the prompt/completion dataset TRL tokenizes (prompt masked, completion + EOS trained)."""
    import datasets

    return datasets.Dataset.from_dict(
        {
            "id": [str(r["id"]) for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "completion": [r["completion"] for r in rows],
        }
    )


# ---------------------------------------------------------------------------------------------
# Model


def attach_lora(
    model: "PreTrainedModel", cfg: Config, targets: list[str], *, quantized: bool
) -> "torch.nn.Module":
    """Freeze the base, prepare a 4-bit base for training, and wrap it with LoRA on ``targets``.

    r=16, alpha=32 → each update is scaled by alpha/r = 2.0.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    from loraflow.modeling import disable_cpu_repack, peft_quietly

    with peft_quietly():
        if quantized:
            # Casts norms to fp32, freezes the base, and turns on checkpointing only when asked (TRAPS 3).
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
            disable_cpu_repack(model)  # again, in case anything re-created a 4-bit layer (TRAPS 1)
        return get_peft_model(model, _lora_config(model, cfg, targets))


def _lora_config(model, cfg: Config, targets: list[str]):
    from peft import LoraConfig

    from loraflow.targets import targets_conv1d

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(targets),
        bias=cfg.lora.bias,
        task_type="CAUSAL_LM",
        # GPT-2's Conv1D stores weights as (in, out): peft must transpose the update.
        fan_in_fan_out=targets_conv1d(model, targets),
    )


def trainable_params(model: "torch.nn.Module") -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight counts its unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Trainer


def sft_config(
    cfg: Config, paths: Paths, compute_dtype: "torch.dtype", batching: str = "group_by_length"
) -> "SFTConfig":
    """Every SFTConfig value that matters, set on purpose (TRAPS 3: its defaults differ from Trainer's).

    ``batching`` is the resolved layout (``choose_batching``): padding-free batches come from the collator
    ``build_trainer`` passes, so TRL's own ``padding_free`` stays off (it would refuse ``max_length``).
    """
    import torch
    from trl import SFTConfig

    t = cfg.train
    try:
        return SFTConfig(
            output_dir=str(paths.checkpoints),
            # TRL defaults: gradient checkpointing on, bf16 on. Both cost time on CPU; take them from config.
            **_checkpointing_args(SFTConfig, t.gradient_checkpointing),
            bf16=compute_dtype == torch.bfloat16,
            fp16=compute_dtype == torch.float16,
            # The data: prompt/completion rows, loss on the completion (+ EOS) only, no packing.
            completion_only_loss=True,
            max_length=cfg.data.max_length,
            packing=False,
            padding_free=False,
            # Padded batches: length-grouped ones carry far less padding on varied lengths (TRAPS 4: 2.4x on
            # CPU). Padding-free batches have none to save, and keep the plain shuffled batches.
            train_sampling_strategy="group_by_length" if batching == "group_by_length" else "random",
            # The optimization.
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.lr_scheduler,
            warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a share of the total steps
            per_device_train_batch_size=t.batch_size,
            per_device_eval_batch_size=t.batch_size,
            gradient_accumulation_steps=t.grad_accum,
            num_train_epochs=t.epochs,
            max_steps=t.max_steps,
            seed=t.seed,
            data_seed=t.seed,
            # Logging: every logging_steps, plus step 1 (the starting loss); a NaN must reach the logs, not be
            # replaced by the running mean (Trainer's default logging_nan_inf_filter).
            logging_strategy="steps",
            logging_steps=t.logging_steps,
            logging_first_step=True,
            logging_nan_inf_filter=False,
            report_to="none",
            disable_tqdm=False,  # its ProgressCallback is replaced by LossBar
            # Checkpoints: every save_steps and at the end; a re-run resumes from the last one.
            save_strategy="steps",
            save_steps=t.save_steps,
            save_total_limit=2,
            # Evaluation on val runs once, after training (no eval forward on the 4-bit model mid-training).
            eval_strategy="no",
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
        )
    except ValueError as e:
        raise ConfigError(f"train: the trainer rejects this config ({str(e).strip().splitlines()[0]})") from None


def _checkpointing_args(config_cls, on: bool) -> dict[str, Any]:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; set whichever exists."""
    kwargs = {"use_reentrant": False} if on else None
    if "activation_checkpointing" in getattr(config_cls, "__dataclass_fields__", {}):
        return {"activation_checkpointing": on, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": on, "gradient_checkpointing_kwargs": kwargs}


@dataclass
class TokenCounts:
    """Tokens trained on: all non-padding tokens and the supervised (answer + EOS) ones."""

    total: int = 0
    supervised: int = 0
    session_total: int = 0  # this process only: what tokens/s is measured on

    def add(self, total: int, supervised: int) -> None:
        self.total += total
        self.supervised += supervised
        self.session_total += total


def _trainer_class():
    from trl import SFTTrainer

    class LoraflowSFTTrainer(SFTTrainer):
        """SFTTrainer that counts tokens, stops on a non-finite loss before the optimizer step, and keeps the
        token counts in each checkpoint."""

        counts: TokenCounts

        def training_step(self, model, inputs, num_items_in_batch=None):
            labels = inputs["labels"]
            mask = inputs.get("attention_mask")
            self.counts.add(
                int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()),
                int((labels != IGNORE).sum()),
            )
            loss = super().training_step(model, inputs, num_items_in_batch)
            value = float(loss.detach())
            if not math.isfinite(value):
                # Raised before the optimizer step: no non-finite weight reaches a checkpoint or the adapter.
                raise TrainingError(
                    f"train: loss is {value} at step {self.state.global_step + 1}; lower train.learning_rate "
                    f"(now {self.args.learning_rate:g}) or raise train.warmup_ratio"
                )
            return loss

        def log(self, logs, start_time=None):
            if "loss" in logs:
                # non-padding tokens per second since the previous log, kept in log_history (and checkpoints)
                now, seen = time.perf_counter(), self.counts.session_total
                then, before = self._tps_mark
                logs["tokens_per_second"] = round((seen - before) / max(now - then, 1e-9), 1)
                self._tps_mark = (now, seen)
            super().log(logs, start_time)

        def train(self, *args, **kwargs):
            self._tps_mark = (time.perf_counter(), self.counts.session_total)
            return super().train(*args, **kwargs)

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            ckpt = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            if ckpt.is_dir():
                # Written last and atomically: a checkpoint holding it is complete (see complete_checkpoints).
                with atomic_file(ckpt / TOKENS_FILE) as fh:
                    fh.write(json.dumps({"total": self.counts.total, "supervised": self.counts.supervised}))

    return LoraflowSFTTrainer


@dataclass
class Batching:
    """How the trainer lays out a batch: ``mode`` (padding_free | group_by_length | padded), why, and the
    collator (None: TRL's padding one)."""

    mode: str
    reason: str
    collator: Any = None


PACKING_CHECK_EXAMPLES = 3


def choose_batching(
    cfg: Config, model: "torch.nn.Module", tokenizer: "PreTrainedTokenizerBase", rows: list[dict],
    compute_dtype: "torch.dtype",
) -> Batching:
    """Resolve ``train.batching``. padding_free (asked for, or tried by auto) needs a model whose attention
    keeps packed examples apart: checked here on a few training examples, packed vs padded, before training."""
    import torch

    from loraflow import packing

    asked = cfg.train.batching
    if asked in ("group_by_length", "padded"):
        return Batching(asked, "as configured")
    why_not = packing.ineligible(model, cfg.data.max_length)
    result = None
    if why_not is None:
        before = packing.enable(model)
        examples = []
        for r in rows[:PACKING_CHECK_EXAMPLES]:
            ids = tokenizer(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"][: cfg.data.max_length]
            if len(ids) >= 2:
                examples.append({"input_ids": ids, "labels": list(ids)})
        # fp32 paths agree to ~1e-6; bf16/fp16 roundings differ with the batch layout, cross-example attention
        # moves the loss of every token after the first example by far more than either.
        tolerance = 1e-3 if compute_dtype == torch.float32 else 5e-2
        result = packing.check(model, examples, tokenizer.pad_token_id, tolerance)
        if result.ok:
            return Batching("padding_free", "auto: packed and padded examples give the same per-token loss on this "
                            f"model, max difference {result.max_abs_diff:.1e}" if asked == "auto" else
                            f"as configured; packed vs padded per-token loss differ by {result.max_abs_diff:.1e}",
                            packing.collator(tokenizer.pad_token_id))
        packing.restore(model, before)
        why_not = (f"packed and padded examples give different losses on it (max per-token difference "
                   f"{result.max_abs_diff:.3g} > {result.tolerance:g}): its attention would cross examples")
    if asked == "padding_free":
        raise ConfigError(f"train.batching: padding_free is not safe for this model: {why_not}; "
                          "use -s train.batching=group_by_length")
    return Batching("group_by_length", f"auto: not padding-free, {why_not}")


def build_trainer(
    cfg: Config,
    paths: Paths,
    model: "torch.nn.Module",
    tokenizer: "PreTrainedTokenizerBase",
    train_rows: list[dict],
    val_rows: list[dict] | None = None,
    *,
    compute_dtype: "torch.dtype | None" = None,
    callbacks: list["TrainerCallback"] | None = None,
):
    """The SFT trainer the train stage uses, on a LoRA-wrapped ``model``; tokenizes and masks the data.

    ``trainer.train_dataset`` holds ``input_ids`` and ``labels`` (prompt = -100, completion + EOS
    supervised), ``trainer.data_collator`` pads them; ``trainer.counts`` counts tokens trained on.
    """
    import datasets
    import torch
    from transformers import ProgressCallback

    from loraflow.modeling import ensure_pad_token

    if compute_dtype is None:
        compute_dtype = torch.float32
    ensure_pad_token(tokenizer)
    batching = choose_batching(cfg, model, tokenizer, train_rows, compute_dtype)
    say(f"batching: {batching.mode} ({batching.reason})")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # five "map" bars per split say nothing on a few thousand rows
    try:
        trainer = _trainer_class()(
            model=model,
            args=sft_config(cfg, paths, compute_dtype, batching.mode),
            train_dataset=to_dataset(train_rows),
            eval_dataset=to_dataset(val_rows) if val_rows else None,
            processing_class=tokenizer,
            data_collator=batching.collator,
            callbacks=list(callbacks or []),
        )
    finally:
        if bars:
            datasets.enable_progress_bars()
    trainer.batching = batching
    trainer.counts = TokenCounts()
    # TRL casts a quantized model's adapter to bf16 (the QLoRA paper's choice with bf16 compute). With fp32
    # compute (CPU) that only loses precision: an AdamW step of 2e-5 on a weight of 1e-2 is below bf16's 3 digits.
    if compute_dtype != torch.bfloat16:
        for p in model.parameters():
            if p.requires_grad and p.dtype == torch.bfloat16:
                p.data = p.data.to(compute_dtype)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LossBar())
    return trainer


def restore_counts(trainer, checkpoint: str | Path) -> None:
    """Token counts as they were at ``checkpoint`` (for a resumed run)."""
    f = Path(checkpoint) / TOKENS_FILE
    if f.exists():
        data = json.loads(f.read_text())
        trainer.counts.total, trainer.counts.supervised = int(data["total"]), int(data["supervised"])


# ---------------------------------------------------------------------------------------------
# Out of memory


def is_out_of_memory(e: BaseException) -> bool:
    """Python's MemoryError, CUDA's OutOfMemoryError, or the CPU allocator's "can't allocate memory"."""
    if isinstance(e, MemoryError):
        return True
    try:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def oom_advice(cfg: Config, paths: Paths, method: str) -> str:
    """What to change, least first, with the planner's estimate for this setup when it can make one."""
    t = cfg.train
    changes = []
    if t.batch_size > 1:
        changes.append(f"-s train.batch_size={t.batch_size // 2} -s train.grad_accum={t.grad_accum * 2} "
                       "(same effective batch)")
    if not t.gradient_checkpointing:
        changes.append("-s train.gradient_checkpointing=true")
    if method == "lora":
        changes.append("-s method=qlora (4-bit base)")
    if cfg.data.max_length > 128:
        changes.append(f"-s data.max_length={cfg.data.max_length // 2}")
    advice = "try " + ", then ".join(changes) if changes else "use a device with more memory or a smaller model.base"
    try:  # the estimate is advice: a planner failure must not hide the out-of-memory error
        from loraflow.planner import plan

        p = plan(cfg, paths, with_lints=False)
        advice += (f"; the planner estimates ~{p.estimates_gib[method]:.1f} GiB for {method} at batch "
                   f"{t.batch_size}, length {cfg.data.max_length}")
        if p.fit_hint:
            advice += f" ({p.fit_hint})"
    except Exception:  # noqa: BLE001
        pass
    return advice + "; `loraflow plan` shows what fits"


@contextlib.contextmanager
def out_of_memory_as_error(cfg: Config, paths: Paths, method: str, trainer=None) -> Iterator[None]:
    """Turn running out of memory into one ``TrainingError`` line with the planner's advice (not a crash)."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        step = getattr(getattr(trainer, "state", None), "global_step", None)
        where = f" at step {step + 1}" if step is not None else ""
        detail = " ".join((str(e).strip().splitlines() or [type(e).__name__])[0].split())[:160]
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
        raise TrainingError(
            f"train: out of memory{where} ({type(e).__name__}: {detail or 'no details'}); "
            + oom_advice(cfg, paths, method)
        ) from None


# ---------------------------------------------------------------------------------------------
# Label audit


@dataclass
class LabelAudit:
    text: str  # the rendered sample, supervised tokens in [[...]]
    examples: int
    supervised_tokens: int
    total_tokens: int
    truncated: int


def render_supervised(tokenizer, input_ids: list[int], labels: list[int]) -> str:
    """The sequence as text, supervised runs wrapped in ``[[...]]``: ``### Response:\\n[[cold<|endoftext|>]]``."""
    out, run, run_sup = [], [], None
    for tok, lab in zip(input_ids, labels):
        sup = lab != IGNORE
        if run and sup != run_sup:
            out.append(_wrap(tokenizer.decode(run), run_sup))
            run = []
        run.append(tok)
        run_sup = sup
    if run:
        out.append(_wrap(tokenizer.decode(run), run_sup))
    return "".join(out)


def _wrap(text: str, supervised: bool) -> str:
    return f"[[{text}]]" if supervised else text


def audit_labels(trainer, tokenizer, rows: list[dict], max_length: int, sample: int = 0) -> LabelAudit:
    """Check what training will see, before it starts; raise ``TrainingError`` on a masking fault.

    Every example must have a supervised token and no supervised prompt token; every example that
    fits in ``max_length`` must end with a supervised EOS. Returns the rendered ``sample``.
    """
    ds = trainer.train_dataset
    eos = tokenizer.eos_token_id
    by_id = {str(r["id"]): r for r in rows}
    kept = list(ds["id"])
    # TRL drops examples that truncation left without a supervised token; for us that is a data fault.
    kept_set = set(kept)
    missing = [i for i in by_id if i not in kept_set]
    if missing:
        raise TrainingError(
            f"train: {len(missing)} of {len(rows)} training examples have no answer token within "
            f"data.max_length={max_length} (e.g. id {missing[0]}); raise data.max_length or shorten their prompts"
        )
    prompts = tokenizer([by_id[i]["prompt"] for i in kept])["input_ids"]
    supervised = total = truncated = 0
    all_ids, all_labels = list(ds["input_ids"]), list(ds["labels"])
    for i, ids, labels, prompt_ids in zip(kept, all_ids, all_labels, prompts):
        sup = [k for k, lab in enumerate(labels) if lab != IGNORE]
        if not sup:
            raise TrainingError(f"train: example {i} has no supervised token; check its completion")
        if any(labels[k] != ids[k] for k in sup):
            raise TrainingError(f"train: example {i} has labels that differ from its tokens; this is a bug")
        if sup[0] < _common_prefix(prompt_ids, ids):
            raise TrainingError(
                f"train: example {i} supervises prompt tokens ({tokenizer.decode(ids[sup[0]:_common_prefix(prompt_ids, ids)])!r}); "
                "prompt tokens must be -100 in the labels"
            )
        # Shorter than max_length means nothing was cut: the answer must end with a supervised EOS.
        if labels[-1] != eos:
            if len(ids) < max_length:
                raise TrainingError(
                    f"train: example {i} does not end with a supervised EOS ({tokenizer.eos_token!r}); "
                    "the model would never learn to stop"
                )
            truncated += 1
        supervised += len(sup)
        total += len(ids)

    k = min(sample, len(kept) - 1)
    i, ids, labels = kept[k], all_ids[k], all_labels[k]
    n_sup = sum(lab != IGNORE for lab in labels)
    text = (
        f"label audit: example {i} (1 of {len(kept)}), {len(ids)} tokens, {n_sup} supervised "
        f"(shown in [[...]]), max_length {max_length}\n"
        f"all examples: {total} tokens, {supervised} supervised ({supervised / max(total, 1):.0%}), "
        f"{truncated} truncated\n"
        "----\n" + render_supervised(tokenizer, ids, labels) + "\n"
    )
    return LabelAudit(text, len(kept), supervised, total, truncated)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Callbacks


def _callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class LossBar(_callback_base()):
    """A tqdm bar over optimizer steps whose postfix shows the last logged loss and learning rate."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = progress.bar(total=state.max_steps, initial=state.global_step, desc="train", unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(
                loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}", refresh=progress.interactive()
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TrainLog(_callback_base()):
    """Each log: a row in reports/train_log.csv and the contract's metrics to the tracker.

    Also logs at the last step (so the final loss is always measured) and refuses to checkpoint
    weights that are no longer finite.
    """

    def __init__(self, path: Path, tracker: Tracker | None = None) -> None:
        self.path = Path(path)
        self.tracker = tracker or NullTracker()
        self.rows: list[dict[str, Any]] = []

    def start(self, history: list[dict] = ()) -> None:
        """Rows of a resumed run's earlier steps (its checkpoint's log history); a fresh run starts empty."""
        self.rows = [_row(h["step"], h) for h in history if "loss" in h]
        self._write()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
        if control.should_save and model is not None:
            bad = [n for n, p in model.named_parameters() if p.requires_grad and not p.isfinite().all()]
            if bad:
                raise TrainingError(
                    f"train: adapter weights became non-finite at step {state.global_step} ({bad[0]}); "
                    f"lower train.learning_rate (now {args.learning_rate:g})"
                )
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        step = state.global_step
        if "loss" in logs:
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                raise TrainingError(
                    f"train: loss is {loss} at step {step}; lower train.learning_rate (now {args.learning_rate:g})"
                )
            row = _row(step, logs)
            self.rows.append(row)
            self.tracker.log_metrics(
                {"train_loss": loss, "learning_rate": row["lr"], "train_tokens_per_second": row["tokens_per_second"]},
                step=step,
            )
            self._write()
        elif "eval_loss" in logs:
            self.rows.append({"step": step, "eval_loss": float(logs["eval_loss"])})
            self._write()

    def _write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: row.get(k, "") for k in LOG_COLUMNS})
        with atomic_file(self.path) as fh:
            fh.write(buf.getvalue())


def final_loss(history: list[dict], window: int) -> float | None:
    """Mean training loss over (at least) the last ``window`` steps, from the logged windows.

    The last log may cover a single step (the end of an epoch's last, short batch): weighting each
    logged mean by the steps it covers keeps "final loss" as steady as one logging window.
    """
    logged = sorted((int(h["step"]), float(h["loss"])) for h in history if "loss" in h)
    total = steps = 0.0
    for k in range(len(logged) - 1, -1, -1):
        step, loss = logged[k]
        span = step - (logged[k - 1][0] if k > 0 else 0)
        total, steps = total + loss * span, steps + span
        if steps >= window:
            break
    return total / steps if steps else None


def _row(step: int, logs: dict) -> dict[str, Any]:
    return {
        "step": int(step),
        "loss": float(logs["loss"]),
        "lr": float(logs.get("learning_rate", 0.0)),
        "tokens_per_second": float(logs.get("tokens_per_second", 0.0)),
    }


# ---------------------------------------------------------------------------------------------
# Resume


def fingerprint(cfg: Config, targets: list[str], method: str, train_digest: str) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed. Length (epochs, max_steps) may change:
    a re-run with more steps continues where the last one stopped."""
    return {
        "model.base": cfg.model.base,
        "model.revision": cfg.model.revision,
        "method": method,
        "quantization": cfg.quantization.model_dump() if method == "qlora" else None,
        "lora.r": cfg.lora.r,
        "lora.alpha": cfg.lora.alpha,
        "lora.dropout": cfg.lora.dropout,
        "lora.bias": cfg.lora.bias,
        "lora.target_modules": list(targets),
        "train.learning_rate": cfg.train.learning_rate,
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "train.batching": cfg.train.batching,  # group_by_length orders the data differently: no mixed epochs
        "train.lr_scheduler": cfg.train.lr_scheduler,
        "train.warmup_ratio": cfg.train.warmup_ratio,
        "train.seed": cfg.train.seed,
        "data.max_length": cfg.data.max_length,
        "data.train_md5": train_digest,
    }


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
    """``lora.r 8 -> 4`` for a short value; ``data.train_md5 changed`` for a digest, a list or a section."""
    short = all(isinstance(v, (int, float, str, bool, type(None))) and len(str(v)) <= 24 for v in (old, new))
    return f"{key} {old} -> {new}" if short and not key.endswith("md5") else f"{key} changed"


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
