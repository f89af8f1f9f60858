"""Generate the sample dataset, ``data/raw/sample.jsonl`` (alpaca format), deterministically.

    python data/raw/make_sample.py                 # rewrite data/raw/sample.jsonl
    python data/raw/make_sample.py --out X.jsonl   # write elsewhere (the test compares bytes)

Short, checkable answers (exact match means something): opposites, days and months before and
after, plurals, capitals, animal sounds and young, past tenses, letters before and after,
parity, number words, next numbers (2,118 records from 706 facts). The facts come from
``loraflow/corpus/facts.py``, the same tables the embedded base model's corpus states in prose
and on quiz sheets, so the base model knows the facts and the fine-tune teaches the
instruction format and recall. Each fact is asked in each of its family's
three phrasings, one of them with the subject in the ``input`` field.

Original text written for loraflow, dedicated to the public domain (CC0 1.0).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from anywhere, without an installed package
    sys.path.insert(0, str(ROOT))

from loraflow.model.corpus.facts import all_facts  # noqa: E402

OUT = Path(__file__).resolve().parent / "sample.jsonl"
SEED = 0
PHRASINGS_PER_FACT = 3

# (instruction, input); {s} is the fact's subject.
INSTRUCTIONS: dict[str, list[tuple[str, str]]] = {
    "opposite": [
        ("What is the opposite of {s}?", ""),
        ("Give the opposite of this word.", "{s}"),
        ('Write the antonym of the word "{s}".', ""),
    ],
    "day_after": [
        ("What day comes after {s}?", ""),
        ("Name the day of the week that follows the given day.", "{s}"),
        ("If today is {s}, what day is tomorrow?", ""),
    ],
    "day_before": [
        ("What day comes before {s}?", ""),
        ("Name the day of the week just before the given day.", "{s}"),
        ("If today is {s}, what day was yesterday?", ""),
    ],
    "month_after": [
        ("What month comes after {s}?", ""),
        ("Which month follows the given month?", "{s}"),
        ("Name the month after {s}.", ""),
    ],
    "month_before": [
        ("What month comes before {s}?", ""),
        ("Which month comes just before the given month?", "{s}"),
        ("Name the month before {s}.", ""),
    ],
    "plural": [
        ("What is the plural of {s}?", ""),
        ("Write the plural form of the noun.", "{s}"),
        ('Give the plural of "{s}".', ""),
    ],
    "capital": [
        ("What is the capital of {s}?", ""),
        ("Name the capital city of the given country.", "{s}"),
        ("Which city is the capital of {s}?", ""),
    ],
    "animal_sound": [
        ("What sound does a {s} make?", ""),
        ("Write the sound this animal makes.", "{s}"),
        ("What does a {s} say?", ""),
    ],
    "baby_animal": [
        ("What is a baby {s} called?", ""),
        ("Name the young of the given animal.", "{s}"),
        ("What do you call a young {s}?", ""),
    ],
    "past_tense": [
        ("What is the past tense of {s}?", ""),
        ("Write the simple past tense of the verb.", "{s}"),
        ('Give the past tense of "{s}".', ""),
    ],
    "letter_after": [
        ("What letter comes after {s}?", ""),
        ("Which letter of the alphabet follows the given letter?", "{s}"),
        ("Name the letter after {s} in the alphabet.", ""),
    ],
    "letter_before": [
        ("What letter comes before {s}?", ""),
        ("Which letter of the alphabet comes just before the given letter?", "{s}"),
        ("Name the letter before {s} in the alphabet.", ""),
    ],
    "parity": [
        ("Is {s} even or odd?", ""),
        ("Say whether the number is even or odd.", "{s}"),
        ("Is the number {s} odd or even?", ""),
    ],
    "number_word": [
        ("Write {s} in words.", ""),
        ("Spell out the number in English words.", "{s}"),
        ("How do you write {s} in words?", ""),
    ],
    "number_after": [
        ("What number comes after {s}?", ""),
        ("Add one to the number.", "{s}"),
        ("What is {s} plus one?", ""),
    ],
}


def build_records(seed: int = SEED) -> list[dict[str, str]]:
    """Every fact in PHRASINGS_PER_FACT of its family's phrasings, shuffled with ``seed``."""
    rng = random.Random(seed)
    records = []
    for fact in all_facts():
        for instruction, inp in rng.sample(INSTRUCTIONS[fact.family], PHRASINGS_PER_FACT):
            records.append(
                {
                    "instruction": instruction.format(s=fact.subject),
                    "input": inp.format(s=fact.subject),
                    "output": fact.answer,
                }
            )
    rng.shuffle(records)
    return records


def write(path: Path, seed: int = SEED) -> int:
    """Write the records as JSONL (keys in alpaca order, one record a line); returns the count."""
    records = build_records(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return len(records)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"output JSONL (default {OUT})")
    args = ap.parse_args(argv)
    n = write(args.out)
    print(f"wrote {n} records to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
