"""Prepare streams and tokenizes in batches: same bytes as the read-everything-first prepare, early stop in error
mode, batch boundaries, and the token counter it uses."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from loraflow.tasks import prepare

from loraflow.core.config import load_config
from loraflow.core.errors import DataError
from loraflow.core.paths import Paths
from loraflow.data import readers
from loraflow.data.tokencount import TokenCounter

ROOT = Path(__file__).resolve().parents[2]

# reports/prepare.json of the prepare before streaming (loraflow c91df1a, which read every record, then tokenized
# all prompts and all full texts; plus the not_unicode reason added since, 0 on these inputs), run once on the inputs
# below. The dataset digest covers data/prepared's bytes.
CLEAN = {"answer_truncated": 0, "duplicate": 0, "empty_field": 0, "invalid_chat": 0, "invalid_csv": 0,
         "invalid_json": 0, "missing_field": 0, "non_utf8": 0, "not_unicode": 0, "too_long": 0, "wrong_type": 0}
SAMPLE = {"dataset_digest": "4740844168fc1c61850ea459474f2551", "dropped": CLEAN, "format": "alpaca",
          "records_dropped": 0, "records_kept": 2118, "records_read": 2118,
          "splits": {"test": 235, "train": 1682, "val": 201}, "truncated": 0}
BEFORE = {
    # data/raw/sample.jsonl with params.yaml's data section (max_length 128)
    ("sample", "embedded"): {**SAMPLE, "token_length": {"max": 62, "p50": 36, "p90": 52, "p99": 59}},
    ("sample", "tiny"): {**SAMPLE, "token_length": {"max": 61, "p50": 36, "p90": 52, "p99": 61}},
    # hard_dataset(), data.on_bad_record: skip
    ("hard", "tiny"): {
        "dataset_digest": "8d622efb78e3684f3019fe60c0517a7b",
        "dropped": {"answer_truncated": 400, "duplicate": 113, "empty_field": 28, "invalid_chat": 0, "invalid_csv": 0,
                    "invalid_json": 67, "missing_field": 40, "non_utf8": 21, "not_unicode": 0, "too_long": 0, "wrong_type": 69},
        "format": "alpaca", "records_dropped": 738, "records_kept": 701, "records_read": 1439,
        "splits": {"test": 68, "train": 555, "val": 78},
        "token_length": {"max": 182, "p50": 31, "p90": 46, "p99": 158}, "truncated": 313},
    ("hard", "embedded"): {
        "dataset_digest": "52ae45444361396b6fab7cdd330b7eca",
        "dropped": {"answer_truncated": 65, "duplicate": 113, "empty_field": 28, "invalid_chat": 0, "invalid_csv": 0,
                    "invalid_json": 67, "missing_field": 40, "non_utf8": 21, "not_unicode": 0, "too_long": 0, "wrong_type": 69},
        "format": "alpaca", "records_dropped": 403, "records_kept": 1036, "records_read": 1439,
        "splits": {"test": 106, "train": 828, "val": 102},
        "token_length": {"max": 152, "p50": 47, "p90": 63, "p99": 132}, "truncated": 83},
}
HARD_MAX_LENGTH = {"tiny": 32, "embedded": 64}  # both drop some prompts as answer_truncated and keep others


def hard_dataset() -> bytes:
    """1,500 lines: good records, duplicates near and far apart, every kind of unreadable line, blank lines,
    prompts too long for max_length, long answers, non-ASCII (U+2028 too), escaped and raw."""
    rng = random.Random(7)
    words = ["hot", "cold", "big", "small", "up", "down", "the", "a", "of", "and", "to", "in", "is", "what", "why", "how", "Paris", "France", "37", "odd", "even"]
    # (up to this draw, this line): unreadable JSON, a missing field, an empty one, not UTF-8, not an object,
    # a wrong type, a blank line
    fixed = [(0.05, b'{"instruction": "x", '), (0.08, b'{"instruction": "x"}'), (0.10, b'{"instruction": "x", "output": ""}'),
             (0.12, b'{"instruction": "caf\xe9", "output": "x"}'), (0.14, b"[1, 2]"),
             (0.16, b'{"instruction": "x", "output": 5}'), (0.20, b"")]
    lines = []
    for _ in range(1500):
        r = rng.random()
        if r < fixed[-1][0]:
            lines.append(next(line for upto, line in fixed if r < upto))
        elif r < 0.30:  # 40 distinct records, repeated all over the file
            j = rng.randrange(40)
            lines.append(json.dumps({"instruction": f"What is {j} plus one?", "input": "", "output": str(j + 1)}).encode())
        elif r < 0.34:  # a long prompt
            n = rng.randrange(30, 80)
            lines.append(json.dumps({"instruction": " ".join(rng.choice(words) for _ in range(n)), "output": "ok"}).encode())
        elif r < 0.38:  # a long answer
            n = rng.randrange(30, 80)
            lines.append(json.dumps({"instruction": "say", "output": " ".join(rng.choice(words) for _ in range(n))}).encode())
        else:
            n = rng.randrange(1, 12)
            rec = {"instruction": " ".join(rng.choice(words) for _ in range(n)),
                   "input": rng.choice(["", "", "é\u2028ü", str(rng.randrange(100))]),
                   "output": " ".join(rng.choice(words) for _ in range(rng.randrange(1, 8)))}
            lines.append(json.dumps(rec, ensure_ascii=rng.random() < 0.5).encode())
    return b"\n".join(lines) + b"\n"


@pytest.fixture(scope="module")
def embedded_tokenizer(tmp_path_factory) -> Path:
    """A model folder holding the embedded base's tokenizer (trained as build_base trains it: seconds, and
    identical to models/base/tokenizer.json) and its config, without the weights prepare never loads."""
    from loraflow.model.embedded import base_config, read_corpus, train_tokenizer

    out = tmp_path_factory.mktemp("embedded-tokenizer")
    train_tokenizer(read_corpus()).save_pretrained(out)
    base_config().save_pretrained(out)
    return out


@pytest.fixture
def bases(tiny_llama, embedded_tokenizer) -> dict[str, Path]:
    return {"tiny": tiny_llama, "embedded": embedded_tokenizer}


def project(tmp_path: Path, base: Path, content: bytes, *overrides: str):
    (tmp_path / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data" / "raw" / "x.jsonl").write_bytes(content)
    return load_config(None, [f"model.base={base}", "data.path=data/raw/x.jsonl", *overrides]), Paths.at(tmp_path)


def report(paths: Paths) -> dict:
    return json.loads(paths.report("prepare").read_text())


def prepared_bytes(paths: Paths) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(paths.prepared.iterdir())}


# --- same bytes as before ---------------------------------------------------------------------


@pytest.mark.parametrize("tok", ["embedded", "tiny"])
def test_sample_data_prepares_to_the_same_bytes_as_before(tmp_path, bases, tok):
    sample = (ROOT / "data" / "raw" / "sample.jsonl").read_bytes()
    cfg, paths = project(tmp_path, bases[tok], sample, "data.max_length=128")
    result = prepare.run(cfg, paths)
    assert report(paths) == BEFORE["sample", tok]
    assert result.dataset_digest == BEFORE["sample", tok]["dataset_digest"]


@pytest.mark.parametrize("batch", [1, 2, 7, 64, 4096])
@pytest.mark.parametrize("tok", ["tiny", "embedded"])
def test_batch_size_changes_nothing(tmp_path, bases, monkeypatch, tok, batch):
    """Batches of 1, 2, 7, 64 and more than the file: records straddle every kind of boundary; duplicates of a
    record sit in other batches (and of records dropped as answer_truncated); every skip reason is counted."""
    monkeypatch.setattr(prepare, "BATCH", batch)
    cfg, paths = project(tmp_path, bases[tok], hard_dataset(), "data.on_bad_record=skip",
                         f"data.max_length={HARD_MAX_LENGTH[tok]}")
    prepare.run(cfg, paths)
    assert report(paths) == BEFORE["hard", tok]


def test_rows_are_what_write_jsonl_writes(tmp_path, tiny_llama):
    """The rows are built from the escaped strings: the same bytes json.dumps(sort_keys) gives, for text that
    JSON escapes (quotes, backslashes, control characters, U+2028, non-ASCII, astral)."""
    from loraflow.data.splits import load_split

    texts = ['say "hi"', "back\\slash", "tab\there\nnewline", "line\u2028sep", "naïve ünïcode", "emoji 🎉", "\x00\x1f"]
    records = [{"instruction": a, "input": b, "output": c} for a in texts for b in ("", texts[2]) for c in texts[:3]]
    cfg, paths = project(tmp_path, tiny_llama, "".join(json.dumps(r) + "\n" for r in records).encode())
    prepare.run(cfg, paths)
    for name, data in prepared_bytes(paths).items():
        rows = load_split(paths, name.removesuffix(".jsonl"))
        assert data == "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode()
        assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert sum(len(load_split(paths, n)) for n in ("train", "val", "test")) == len(records)


# --- error mode stops at the first bad record ---------------------------------------------------


def _count_rows(monkeypatch) -> list[int]:
    """How many rows prepare has taken from the reader."""
    taken = [0]
    real = readers.read_records

    def counting(*args, **kwargs):
        for row in real(*args, **kwargs):
            taken[0] += 1
            yield row

    monkeypatch.setattr(prepare, "read_records", counting)
    return taken


def test_error_mode_stops_at_a_long_prompt_without_reading_the_rest(tmp_path, tiny_llama, monkeypatch):
    """Line 1's prompt is too long (found only by counting its tokens); the file goes on for 5,000 lines and ends
    in broken JSON. The stage names line 1 after reading at most two batches past it, never the broken end."""
    monkeypatch.setattr(prepare, "BATCH", 16)
    taken = _count_rows(monkeypatch)
    good = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}).encode() for i in range(5000)]
    body = b"\n".join([json.dumps({"instruction": "hot cold " * 40, "output": "x"}).encode(), *good,
                       b'{"instruction": "broken']) + b"\n"
    cfg, paths = project(tmp_path, tiny_llama, body, "data.max_length=32")
    with pytest.raises(DataError, match=r"^data/raw/x\.jsonl:1: the prompt alone is \d+ tokens.*on_bad_record: skip"):
        prepare.run(cfg, paths)
    assert taken[0] <= 2 * 16 + 1
    assert not paths.prepared.exists() and not paths.report("prepare").exists()


def test_error_mode_reports_the_first_bad_record_in_file_order(tmp_path, tiny_llama, monkeypatch):
    """A long prompt on line 2 and broken JSON on line 4, in one batch: the broken line is read first, but the
    long prompt comes first in the file, so it is the one reported."""
    taken = _count_rows(monkeypatch)
    lines = [json.dumps({"instruction": "hi", "output": "x"}).encode(),
             json.dumps({"instruction": "hot cold " * 40, "output": "x"}).encode(),
             json.dumps({"instruction": "ho", "output": "x"}).encode(),
             b'{"instruction": ',
             *[json.dumps({"instruction": f"q{i}", "output": "x"}).encode() for i in range(100)]]
    cfg, paths = project(tmp_path, tiny_llama, b"\n".join(lines) + b"\n", "data.max_length=32")
    with pytest.raises(DataError, match=r"^data/raw/x\.jsonl:2: the prompt alone"):
        prepare.run(cfg, paths)
    assert taken[0] == 4  # stopped at the broken line: the 100 lines after it are never read

    # Without the long prompt, the broken line is the first bad record.
    del lines[1]
    cfg, paths = project(tmp_path, tiny_llama, b"\n".join(lines) + b"\n", "data.max_length=32")
    with pytest.raises(DataError, match=r"^data/raw/x\.jsonl:3: not valid JSON"):
        prepare.run(cfg, paths)


def test_skip_mode_reads_everything_and_counts_across_batches(tmp_path, tiny_llama, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "BATCH", 3)
    long = {"instruction": "hot cold " * 40, "output": "x"}
    records = [r for i in range(20) for r in (long, {"instruction": f"q{i}", "output": "b"}) * 2]
    body = b"\n".join([json.dumps(r).encode() for r in records] + [b"{broken"]) + b"\n"
    cfg, paths = project(tmp_path, tiny_llama, body, "data.max_length=32", "data.on_bad_record=skip")
    result = prepare.run(cfg, paths)
    assert (result.records_read, result.records_kept) == (81, 20)
    assert result.dropped["answer_truncated"] == 1  # the later copies of the long prompt are duplicates
    assert result.dropped["duplicate"] == 39 + 20 and result.dropped["invalid_json"] == 1
    err = capsys.readouterr().err
    assert "skipped data/raw/x.jsonl:1: the prompt alone" in err and "skipped data/raw/x.jsonl:81: not valid JSON" in err


# --- the token counter ------------------------------------------------------------------------

TEXTS = ["", " ", "hello world", "### Instruction:\nWhat is 37 plus one?\n\n### Response:\n38", "naïve café ünï 🎉",
         "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>x<|pad|>", "a\u2028b\r\n\t  z",
         "1234567890" * 30, "word " * 200]


@pytest.mark.parametrize("tok", ["tiny", "embedded"])
def test_counter_counts_what_the_tokenizer_call_counts(bases, tok):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bases[tok])
    counter = TokenCounter(tokenizer)
    want = [len(ids) for ids in tokenizer(TEXTS, add_special_tokens=False)["input_ids"]]
    assert counter.parallel and counter(TEXTS) == want and counter(TEXTS[::-1]) == want[::-1]
    assert counter.backend is not None  # the fast path stayed on
    # Byte-level BPE without a normalizer: never more tokens than bytes (prepare skips counting such prompts).
    assert counter.most_tokens(0) == 0
    for text, n in zip(TEXTS, want):
        assert n <= counter.most_tokens(len(text.encode("utf-8")))


def test_counter_falls_back_to_the_tokenizer_call_when_its_backend_differs(tiny_llama):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    counter = TokenCounter(tokenizer)
    other = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))  # one token a word: counts differ
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    counter.backend = other
    want = [len(ids) for ids in tokenizer(TEXTS, add_special_tokens=False)["input_ids"]]
    assert counter(TEXTS) == want
    assert counter.backend is None


def test_no_bound_for_a_tokenizer_that_rewrites_text(tiny_llama, tmp_path):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert TokenCounter(tokenizer).most_tokens(10) == 10
    tokenizer.backend_tokenizer.normalizer = normalizers.NFKD()  # "ﬁ" (3 bytes) -> "fi": may grow
    assert TokenCounter(tokenizer).most_tokens(10) is None
