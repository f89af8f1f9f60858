"""The SFT trainer: TRL's ``SFTTrainer`` with every setting chosen on purpose, token counts, a NaN stop.

``build_trainer`` is what the train stage uses, and what tests build to look at what training sees:
``trainer.train_dataset`` (tokenized, labels with the prompt set to -100) and
``trainer.get_train_dataloader()`` (collated batches).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.core.atomic import atomic_file
from loraflow.core.config import Config
from loraflow.core.errors import ConfigError, TrainingError
from loraflow.core.messages import say
from loraflow.core.paths import Paths
from loraflow.train.batching import choose_batching
from loraflow.train.callbacks import LossBar
from loraflow.train.checkpoints import TOKENS_FILE

if TYPE_CHECKING:
    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase, TrainerCallback
    from trl import SFTConfig


IGNORE = -100  # label of a token that is not trained on (prompt, padding)


TOKENIZE_BATCH = 1024  # rows per tokenizer call: a fast tokenizer's batch call runs ~3x faster than row by row


def to_dataset(rows: list[dict]) -> "datasets.Dataset":
    """Prepared rows as the prompt/completion dataset TRL would tokenize itself (prompt masked, completion + EOS
    trained). ``tokenize`` builds what TRL builds from it, faster; tests compare the two."""
    import datasets

    return datasets.Dataset.from_dict(
        {
            "id": [str(r["id"]) for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "completion": [r["completion"] for r in rows],
        }
    )


def tokenize(tokenizer: "PreTrainedTokenizerBase", rows: list[dict], max_length: int | None) -> "datasets.Dataset":
    """Prepared rows as the training dataset: ``id``, ``input_ids``, ``labels`` (prompt = -100).

    The same ids and labels TRL's SFTTrainer derives from ``to_dataset(rows)`` with ``completion_only_loss``
    (trl 1.x ``_prepare_dataset``: append EOS to a completion lacking it, tokenize prompt and prompt+completion,
    supervise from where the two diverge, keep the first ``max_length`` tokens, drop rows left with no supervised
    token), but tokenized in batches: TRL maps one row at a time through five ``datasets.map`` passes, 1,117 rows/s
    against 2,548 here (``bench/train_tokenize.py``), so a large set would spend minutes on it before step 1.
    ``tests/integration/test_train.py::test_pretokenized_equals_trl`` holds the two equal.
    """
    import datasets
    from trl.data_utils import common_prefix_length  # where TRL itself starts the supervision

    eos = tokenizer.eos_token
    ids_out: list[str] = []
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    diverged = 0
    for start in range(0, len(rows), TOKENIZE_BATCH):
        chunk = rows[start : start + TOKENIZE_BATCH]
        prompts = [r["prompt"] for r in chunk]
        completions = [c if c.endswith(eos) else c + eos for c in (r["completion"] for r in chunk)]
        prompt_ids = tokenizer(text=prompts)["input_ids"]
        full_ids = tokenizer(text=[p + c for p, c in zip(prompts, completions)])["input_ids"]
        for row, p_ids, ids in zip(chunk, prompt_ids, full_ids):
            cut = common_prefix_length(p_ids, ids)
            diverged += cut < len(p_ids)
            row_labels = [IGNORE] * cut + ids[cut:]
            if max_length is not None:
                ids, row_labels = ids[:max_length], row_labels[:max_length]
            if all(x == IGNORE for x in row_labels):
                continue  # a prompt alone fills max_length: nothing to learn from it
            ids_out.append(str(row["id"]))
            input_ids.append(ids)
            labels.append(row_labels)
    if diverged:
        say(f"train: in {diverged} of {len(rows)} rows the tokenized prompt is not a prefix of prompt + completion "
            "(tokens merge across the boundary); their supervision starts where the two diverge")
    return datasets.Dataset.from_dict({"id": ids_out, "input_ids": input_ids, "labels": labels})


def sft_config(
    cfg: Config, paths: Paths, compute_dtype: "torch.dtype", batching: str = "group_by_length"
) -> "SFTConfig":
    """Every SFTConfig value that matters, set on purpose (docs/traps.md §3: its defaults differ from Trainer's).

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
            # build_trainer hands over tokenized, labelled, truncated rows (``tokenize``): TRL's own per-row
            # preparation would only repeat it, three times slower.
            dataset_kwargs={"skip_prepare_dataset": True},
            # Padded batches: length-grouped ones carry far less padding on varied lengths (docs/traps.md §4: 2.4x on
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
            # Without a GPU, say so: transformers refuses bf16 unless it trains on the CPU on purpose
            # ("Your setup doesn't support bf16/gpu"), and compute_dtype auto is bf16 on CPUs with
            # AVX512-BF16 or AMX (docs/traps.md §10). With use_cpu, bf16 runs as CPU autocast.
            use_cpu=not torch.cuda.is_available(),
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

    from loraflow.model.loading import ensure_pad_token

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
            train_dataset=tokenize(tokenizer, train_rows, cfg.data.max_length),
            eval_dataset=tokenize(tokenizer, val_rows, cfg.data.max_length) if val_rows else None,
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
