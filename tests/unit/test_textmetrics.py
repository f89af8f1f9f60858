"""Exact match and token F1 on hand-computed values (SQuAD normalization)."""

from __future__ import annotations

import pytest

from loraflow.data.textmetrics import exact_match, mean, normalize_answer, token_f1


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The Cold.", "cold"),
        ("  an   Apple, a day!  ", "apple day"),
        ("Theory of the atom", "theory of atom"),  # "the" only as a whole word
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("cold", "cold", 1.0),
        ("The cold!", "cold", 1.0),
        ("COLD", " cold ", 1.0),
        ("cold", "hot", 0.0),
        ("very cold", "cold", 0.0),
        ("", "", 1.0),
        ("", "cold", 0.0),
    ],
)
def test_exact_match(pred, ref, expected):
    assert exact_match(pred, ref) == expected


@pytest.mark.parametrize(
    "pred, ref, expected",
    [
        ("cold", "cold", 1.0),
        ("cold", "hot", 0.0),
        # 1 common token; precision 1/2, recall 1/1 -> F1 = 2*(0.5*1)/(1.5) = 2/3
        ("very cold", "cold", 2 / 3),
        # 2 common of 3 predicted and 2 reference tokens: P = 2/3, R = 1 -> F1 = 0.8
        ("cat cat dog", "cat dog", 0.8),
        # multiset overlap: "cat" counted once against one reference "cat": P = 1/2, R = 1/3 -> 0.4
        ("cat cat", "cat dog bird", 0.4),
        # "The" and "." drop out: 3 tokens "capital is paris", P = 1/3, R = 1 -> F1 = 0.5
        ("The capital is Paris.", "Paris", 0.5),
        ("", "", 1.0),
        ("", "Paris", 0.0),
        ("Paris", "", 0.0),
        ("the", "a", 1.0),  # both normalize to empty
    ],
)
def test_token_f1(pred, ref, expected):
    assert token_f1(pred, ref) == pytest.approx(expected)


def test_f1_is_symmetric_and_bounded():
    pairs = [("a b c d", "c d e"), ("x y", "y x z w"), ("Paris, France", "in Paris")]
    for p, r in pairs:
        f = token_f1(p, r)
        assert 0.0 <= f <= 1.0
        assert f == pytest.approx(token_f1(r, p))


def test_mean():
    assert mean([]) == 0.0
    assert mean([1.0, 0.0, 0.5]) == pytest.approx(0.5)
