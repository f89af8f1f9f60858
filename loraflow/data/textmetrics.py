"""Exact match and token F1 of generated answers, with SQuAD's answer normalization.

Normalization (SQuAD v1.1 ``normalize_answer``): lowercase, drop punctuation, drop the articles
a/an/the, collapse whitespace. So ``"The Cold."`` and ``"cold"`` match exactly.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and articles, collapse whitespace (SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalized prediction equals the normalized reference, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(ref))


def token_f1(pred: str, ref: str) -> float:
    """Harmonic mean of token precision and recall over normalized, whitespace-split tokens.

    Tokens are counted as a multiset ("cat cat dog" vs "cat dog": 2 common of 3 predicted). Two empty
    answers score 1.0; one empty answer against a non-empty one scores 0.0 (SQuAD v2 convention).
    """
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def mean(values: list[float]) -> float:
    """Mean of a list; 0.0 for an empty one (no samples means no evidence of skill)."""
    return sum(values) / len(values) if values else 0.0
