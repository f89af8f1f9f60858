"""Batched helpers for evaluating a causal LM: completion loss and greedy generation.

The loss uses exactly the training convention (TRL's prompt-completion one, see
``encode_example``): the tokens of ``prompt + completion + EOS``, the prompt's tokens masked with
-100, so only the completion and its EOS are scored.
Every forward here runs in eval mode (no LoRA dropout) under ``torch.no_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from loraflow.core import progress

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

IGNORE_INDEX = -100


def encode_example(
    tokenizer: "PreTrainedTokenizerBase", prompt: str, completion: str, max_length: int
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example, as TRL's SFTTrainer builds them for training.

    The EOS *string* is appended to the completion (unless it ends with it), ``prompt +
    completion`` is tokenized as one text, and the prompt's share is the common prefix with the
    prompt tokenized alone (a BPE merge across the boundary counts as completion); those tokens get
    -100. Truncated on the right ("keep_start") to ``max_length``.
    """
    eos = tokenizer.eos_token or ""
    if not completion.endswith(eos):
        completion += eos
    prompt_ids = list(tokenizer(text=prompt)["input_ids"])
    ids = list(tokenizer(text=prompt + completion)["input_ids"])
    n_prompt = 0
    for a, b in zip(prompt_ids, ids):
        if a != b:
            break
        n_prompt += 1
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return ids[:max_length], labels[:max_length]


def completion_loss(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    rows: Sequence[dict],
    batch_size: int,
    max_length: int,
    *,
    desc: str = "loss",
) -> tuple[float, int]:
    """Mean cross-entropy per supervised token over ``rows`` (dicts with prompt, completion).

    Token-weighted over the whole set (sum of token losses / number of supervised tokens), so
    the result does not depend on the batch size. Returns ``(loss, n_tokens)``; ``(nan, 0)`` when
    nothing is supervised (e.g. every completion truncated away).
    """
    import torch
    import torch.nn.functional as F

    encoded = [encode_example(tokenizer, r["prompt"], r["completion"], max_length) for r in rows]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # less padding per batch
    pad_id = _pad_id(tokenizer)
    device = _device(model)
    total, n_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in _progress(range(0, len(order), batch_size), desc):
                batch = [encoded[i] for i in order[start : start + batch_size]]
                width = max(len(ids) for ids, _ in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for j, (ids, lab) in enumerate(batch):  # right padding: positions stay 0..n-1
                    input_ids[j, : len(ids)] = torch.tensor(ids)
                    labels[j, : len(lab)] = torch.tensor(lab)
                    attention[j, : len(ids)] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
                # token t predicts token t+1; upcast only the scored rows (B*T*V floats can be GBs)
                targets = labels[:, 1:].to(logits.device)
                scored = targets != IGNORE_INDEX
                picked = logits[:, :-1][scored].float()
                total += F.cross_entropy(picked, targets[scored], reduction="sum").item()
                n_tokens += int(scored.sum())
    finally:
        model.train(was_training)
    return (total / n_tokens if n_tokens else math.nan), n_tokens


def greedy_generate(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    *,
    desc: str = "generate",
) -> list[str]:
    """Greedy continuations of ``prompts``, in order: new tokens only, cut at EOS, stripped.

    Prompts are left-padded (a decoder continues from the last real token), tokenized exactly as
    in training (same bytes, same special tokens). Generation stops at the tokenizer's EOS or
    any EOS of the model's generation config.
    """
    import torch
    from transformers import GenerationConfig

    stop_ids = _eos_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer)
    gen_cfg = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=sorted(stop_ids) or None,
        pad_token_id=pad_id,
    )
    device = _device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    side = tokenizer.padding_side
    was_training = model.training
    tokenizer.padding_side = "left"
    model.eval()
    try:
        with torch.no_grad():
            for start in _progress(range(0, len(order), batch_size), desc):
                idx = order[start : start + batch_size]
                enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True)
                enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                seqs = model.generate(**enc, generation_config=gen_cfg)
                new = seqs[:, enc["input_ids"].shape[1] :].tolist()
                for i, tokens in zip(idx, new):
                    cut = next((k for k, t in enumerate(tokens) if t in stop_ids), len(tokens))
                    out[i] = tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(e) for e in extra)
    return ids


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token; call loading.ensure_pad_token first")
    return int(pad)


def _device(model) -> "torch.device":
    return next(model.parameters()).device


def _progress(iterable, desc: str):
    """A progress bar, shown only when there is more than one step to wait for."""
    return progress.bar(iterable, desc=desc, leave=False, disable=len(iterable) <= 1)
