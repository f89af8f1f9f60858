"""Token counts of many texts, fast: what prepare measures every record with.

``TokenCounter(tokenizer)(texts)`` is ``[len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]``,
without building the ``BatchEncoding`` (its Python lists of ids cost as much as the encoding itself here).

A fast tokenizer's Rust backend (``tokenizer.backend_tokenizer``, copied once so that nothing here changes the
caller's tokenizer) encodes a batch without holding the GIL: two batches encode at once on two cores, beside the
Python thread that reads the next records, even with ``TOKENIZERS_PARALLELISM=false`` (which the CLI sets, so
that a fork after tokenizing does not deadlock; threads are not forks). The backend copy is set up the way the
tokenizer's own call sets it (no truncation, no padding, ``split_special_tokens``), and that is checked, not
assumed: the first ``PROBE`` texts of every batch are also counted by the tokenizer's own call, and on any
difference (a tokenizer class that changes the text before encoding, say) the counter uses that call for
everything from then on. A slow (Python) tokenizer always goes through its own call.

``most_tokens(n_bytes)``: for a BPE tokenizer without a normalizer, whose pre-tokenizers only split the text, no
text of ``n_bytes`` UTF-8 bytes has more than ``n_bytes`` tokens (plus one for a prefix space): every BPE token
covers at least one character of the model's input (unknown characters: one token or none; byte fallback: one
per byte), added tokens at least one character each, and every character is at least one byte. prepare uses it
to skip counting prompts too short to matter. None for any other tokenizer (no bound: count).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROBE = 4  # texts of each batch also counted by the tokenizer's own call
# Pre-tokenizers that only split the text (or drop whitespace): none adds a character, except ByteLevel's
# add_prefix_space (one space). Metaspace (adds "▁", which byte fallback may spell as 3 tokens) is not one.
SPLITTING_PRE_TOKENIZERS = {"ByteLevel", "Digits", "Split", "Punctuation", "Whitespace", "WhitespaceSplit"}


class TokenCounter:
    """Callable: texts -> token counts, no special tokens added. Safe to call from several threads at once."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.backend = None
        self._own_call = threading.Lock()  # the tokenizer's own call resets its backend's state: one at a time
        if getattr(tokenizer, "is_fast", False) and getattr(tokenizer, "backend_tokenizer", None) is not None:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
            backend.no_truncation()
            backend.no_padding()
            backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
            self.backend = backend
        self.extra_tokens = _bytes_bound(tokenizer)

    @property
    def parallel(self) -> bool:
        """Whether calls from two threads run at once (the Rust backend releases the GIL)."""
        return self.backend is not None

    def most_tokens(self, n_bytes: int) -> int | None:
        """An upper bound on the token count of any text of ``n_bytes`` UTF-8 bytes, or None when there is none."""
        return None if self.extra_tokens is None else n_bytes + self.extra_tokens

    def __call__(self, texts: list[str]) -> list[int]:
        backend = self.backend
        if backend is not None:
            # encode_batch_fast: the same ids without the offsets, which nothing here reads
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            counts = [len(e) for e in encode(texts, add_special_tokens=False)]
            if self.own(texts[:PROBE]) == counts[:PROBE]:
                return counts
            self.backend = None  # the backend alone does not count what the tokenizer does: never again
        return self.own(texts)

    def own(self, texts: list[str]) -> list[int]:
        """Counts from the tokenizer's own call (the reference)."""
        if not texts:
            return []
        with self._own_call:
            return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _bytes_bound(tokenizer) -> int | None:
    """Tokens a text may have beyond its UTF-8 byte count (see ``most_tokens``), or None when unbounded."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except ValueError:
        return None
    if (spec.get("model") or {}).get("type") != "BPE" or spec.get("normalizer") is not None:
        return None
    pre = spec.get("pre_tokenizer")
    steps = [] if pre is None else pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if any(step.get("type") not in SPLITTING_PRE_TOKENIZERS for step in steps):
        return None
    if any(not added.get("content") for added in spec.get("added_tokens") or []):
        return None
    return sum(1 for step in steps if step.get("type") == "ByteLevel" and step.get("add_prefix_space"))
