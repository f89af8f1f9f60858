"""The pre-flight label audit: what training will supervise, checked and shown before the first step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraflow.core.errors import TrainingError
from loraflow.train.sft import IGNORE

if TYPE_CHECKING:
    pass


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
    from trl.data_utils import common_prefix_length

    ds = trainer.train_dataset
    eos = tokenizer.eos_token_id
    by_id = {str(r["id"]): r for r in rows}
    kept = list(ds["id"])
    # sft.tokenize drops examples that truncation left without a supervised token; for us that is a data fault.
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
        prompt_end = common_prefix_length(prompt_ids, ids)
        if sup[0] < prompt_end:
            raise TrainingError(
                f"train: example {i} supervises prompt tokens ({tokenizer.decode(ids[sup[0]:prompt_end])!r}); "
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
