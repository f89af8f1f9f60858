"""How a training batch is laid out: padding-free when the model keeps packed examples apart, else grouped by length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loraflow.core.config import Config
from loraflow.core.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


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

    from loraflow.train import packing


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
