"""Padding-free batches without cross-example attention, and the check that proves it on the model at hand.

A padding-free batch is its examples laid end to end in one row (``position_ids`` restart at 0 at
each example, no ``attention_mask``): no padding token is ever computed. Each example must still
attend only to itself. transformers 5 detects such rows from ``position_ids`` and builds a
block-diagonal mask for ``sdpa``/``eager`` (``masking_utils.find_packed_sequence_indices``), but that
mask spans the whole row: attention costs (sum of lengths)^2 instead of sum(length^2), which made
padding-free slower than length-grouped batches on CPU (docs/traps.md §4). ``loraflow_varlen`` is an attention
function that runs ``sdpa`` causally on each example of the row instead (what flash-attention's
varlen kernel does on a GPU), so a packed batch costs the same attention as unpadded examples.

Whether a model really routes ``cu_seq_lens_q`` to its attention (most transformers 5 decoders do;
some architectures don't) is checked, not assumed: ``check`` compares per-token losses of a few
examples packed and padded, and ``auto`` batching uses padding-free only when they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

VARLEN = "loraflow_varlen"  # the attention implementation name registered with transformers
FLASH_PREFIX = "flash_attention"  # flash-attention implementations do varlen from cu_seq_lens natively


def register() -> None:
    """Register ``loraflow_varlen`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, _varlen_attention)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)


def _varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """sdpa on each example of a packed row (boundaries from the collator's ``cu_seq_lens_q``); anything
    else (padded batches, generation with a cache) is plain sdpa."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    packed = (
        cu is not None and attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
        and int(cu[-1]) == query.shape[2]
    )
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    bounds = cu.tolist()
    outs = [
        sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, dropout=dropout,
                               scaling=scaling, is_causal=True)[0]
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None


def _varlen_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """No mask for a training row without padding (the attention function splits it by example); sdpa's
    mask otherwise. Models with sliding windows never get here (``eligible``)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if attention_mask is None and q_length == kv_length and not q_offset:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                     mask_function or causal_mask_function, attention_mask, **kwargs)


def collator(pad_token_id: int):
    """TRL's padding-free collator: one row per batch, ``position_ids`` restarting per example, the first
    label of each example -100 (so no example is trained to predict the next one's first token), and
    ``cu_seq_lens_q``/``cu_seq_lens_k`` boundaries computed on the CPU."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)


def ineligible(model: "torch.nn.Module", max_length: int) -> str | None:
    """Why ``model`` cannot train padding-free with per-example attention here, or None.

    Models outside transformers' attention interface (Falcon, say) still get a correct block mask from
    ``position_ids``, but one that spans the whole row: slower than length-grouped batches on a CPU.
    A sliding window shorter than ``max_length`` would need a mask per example; per-example causal
    attention is exact when every example fits in the window.
    """
    base = _transformers_model(model)
    if base is None:
        return "it is not a transformers model"
    impl = base.config._attn_implementation
    text = base.config.get_text_config()
    if not getattr(base, "_supports_attention_backend", False):
        return f"{type(base).__name__} does not use transformers' attention interface"
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if kinds - {"full_attention", "sliding_attention"}:
        return f"it has {', '.join(sorted(kinds - {'full_attention', 'sliding_attention'}))} layers"
    window = getattr(text, "sliding_window", None)
    if window and window < max_length and (getattr(text, "use_sliding_window", True) or "sliding_attention" in kinds):
        return f"its sliding window ({window}) is shorter than data.max_length ({max_length})"
    if impl not in ("sdpa", VARLEN) and not str(impl).startswith(FLASH_PREFIX):
        return f"its attention implementation is {impl!r}"
    return None


def enable(model: "torch.nn.Module") -> str:
    """Switch ``model`` to per-example attention on packed rows; return the implementation it had."""
    base = _transformers_model(model)
    before = base.config._attn_implementation
    if before == "sdpa":
        register()
        base.set_attn_implementation(VARLEN)
    return before


def restore(model: "torch.nn.Module", implementation: str) -> None:
    base = _transformers_model(model)
    if base is not None and base.config._attn_implementation != implementation:
        base.set_attn_implementation(implementation)


def _transformers_model(model):
    from transformers import PreTrainedModel

    seen = model
    for _ in range(4):  # PeftModel -> LoraModel -> the transformers model
        if isinstance(seen, PreTrainedModel) and not hasattr(seen, "peft_config"):
            return seen
        seen = getattr(seen, "base_model", None) or getattr(seen, "model", None)
        if seen is None:
            return None
    return None


def per_token_losses(model: "torch.nn.Module", batch: dict[str, Any]) -> "torch.Tensor":
    """Cross-entropy of every supervised token of ``batch`` (padded or packed), in example order."""
    import torch

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "seq_idx")}
    logits = model(**inputs, use_cache=False).logits.float()
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    keep = shift_labels != -100
    return torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep], reduction="none")


@dataclass
class Check:
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance  # NaN fails


def check(model: "torch.nn.Module", examples: list[dict[str, list[int]]], pad_token_id: int,
          tolerance: float) -> Check:
    """Per-token losses of ``examples`` packed in one row vs padded, the model in eval mode (no dropout).

    Equal losses mean each example attended only to itself: attention across examples changes every
    loss after the first example's.
    """
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    device = next(p.device for p in model.parameters())
    padded = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)(examples)
    packed = collator(pad_token_id)(examples)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            a = per_token_losses(model, _to(padded, device))
            b = per_token_losses(model, _to(packed, device))
    finally:
        model.train(was_training)
    diff = float((a - b).abs().max()) if a.numel() == b.numel() and a.numel() else float("nan")
    return Check(diff, tolerance)


def _to(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
