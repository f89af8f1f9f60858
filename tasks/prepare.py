"""prepare: raw records → validated, rendered, deduplicated, split ``data/prepared/`` + stats.

    read (file:line for each record) → render with the format → drop exact duplicates
    → count tokens (drop answers that would be truncated away) → split by content hash
    → write train/val/test.jsonl atomically → reports/prepare.json

A record's split depends only on its content and ``data.seed``: adding records never moves an
existing one, and two runs write byte-identical files (DVC relies on it).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from loraflow.core.atomic import atomic_dir, write_json, write_jsonl
from loraflow.core.config import Config
from loraflow.core.errors import DataError
from loraflow.core.fingerprint import dataset_digest
from loraflow.core.messages import note
from loraflow.core.paths import Paths
from loraflow.data.formats import BadRecord, check_fields, detect_format, render
from loraflow.data.readers import find_source, read_records, too_long
from loraflow.data.splits import SPLITS
from loraflow.model.loading import load_tokenizer

# Every reason a record can be dropped for; the report lists them all (zeros too) so that
# `dvc metrics diff` compares the same keys from run to run.
REASONS = (
    "invalid_json",
    "non_utf8",
    "wrong_type",
    "invalid_csv",
    "missing_field",
    "empty_field",
    "invalid_chat",
    "answer_truncated",
    "duplicate",
    "too_long",
)
PERCENTILES = (50, 90, 99)
TOKENIZE_BATCH = 512
SHOW_SKIPPED = 5  # skipped records named on stderr before "... and N more"


class PrepareResult(BaseModel):
    records_read: int
    records_kept: int
    records_dropped: int
    dropped: dict[str, int]
    splits: dict[str, int]
    token_length: dict[str, int]
    truncated: int
    dataset_digest: str
    format: str
    prepared_dir: Path
    split_paths: dict[str, Path]
    report_path: Path


@dataclass
class Example:
    key: str  # full sha256 of (prompt, completion): the dedup key
    where: str
    prompt: str
    completion: str

    @property
    def id(self) -> str:
        return self.key[:16]


def run(cfg: Config, paths: Paths) -> PrepareResult:
    """Run the prepare stage: read ``cfg.data.path``, write ``paths.prepared`` and ``reports/prepare.json``."""
    data = cfg.data
    check_fields(data.fields)
    source = find_source(data.path, paths.root)
    tokenizer = load_tokenizer(cfg, paths)
    dropped: Counter[str] = Counter()
    skipped: list[str] = []

    def bad(where: str, err: BadRecord) -> None:
        if data.on_bad_record == "error":
            raise DataError(f"{where}: {err.problem}; {err.fix}, or set data.on_bad_record: skip to drop such records")
        dropped[err.reason] += 1
        skipped.append(f"{where}: {err.problem}")

    fmt = None if data.format == "auto" else data.format
    unique: dict[str, Example] = {}
    read = 0
    for row in read_records(source, data.split, data.max_record_bytes):
        read += 1
        if row.bad is not None:
            bad(row.where, row.bad)
            continue
        if fmt is None:
            fmt = detect_format(row.record, data.fields)
        try:
            prompt, completion = render(row.record, fmt, data.fields, tokenizer)
        except BadRecord as err:
            bad(row.where, err)
            continue
        size = len(prompt.encode("utf-8")) + len(completion.encode("utf-8"))
        if size > data.max_record_bytes:  # before tokenizing: a 50 MB field would take minutes
            bad(row.where, too_long(size, data.max_record_bytes))
            continue
        key = content_key(prompt, completion)
        if key in unique:
            dropped["duplicate"] += 1  # not an error even with on_bad_record: error
            continue
        unique[key] = Example(key, row.where, prompt, completion)
    _log(f"read {read} records from {source.display} (format {fmt or data.format})")
    if read == 0:
        raise DataError(f"{source.display}: no records found; point data.path at a dataset with records")

    # Length = prompt + answer + EOS. A prompt of max_length - 1 tokens or more leaves no room
    # for a single answer token: training would see zero supervised tokens, so the record is bad.
    examples = list(unique.values())
    prompt_lens = _token_counts(tokenizer, [e.prompt for e in examples])
    full_lens = _token_counts(tokenizer, [e.prompt + e.completion for e in examples])
    kept: list[tuple[Example, int]] = []
    for ex, p_len, f_len in zip(examples, prompt_lens, full_lens):
        if p_len >= data.max_length - 1:
            bad(ex.where, BadRecord(
                "answer_truncated",
                f"the prompt alone is {p_len} tokens, so with max_length {data.max_length} no answer token is left",
                "shorten the prompt or raise data.max_length",
            ))
            continue
        kept.append((ex, f_len + 1))

    if not kept:
        why = ", ".join(f"{r} {n}" for r, n in sorted(dropped.items())) or "none"
        raise DataError(
            f"{source.display}: no usable records (read {read}, dropped: {why}); fix the data "
            "or point data.path at another dataset"
        )
    if skipped:
        more = len(skipped) - SHOW_SKIPPED
        for line in skipped[:SHOW_SKIPPED]:
            _log(f"skipped {line}")
        if more > 0:
            _log(f"... and {more} more skipped")

    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for ex, _ in kept:
        splits[assign_split(ex.id, data.seed, data.val_fraction, data.test_fraction)].append(ex)
    if not splits["train"]:
        raise DataError(
            f"{source.display}: none of the {len(kept)} usable records landed in the train split; "
            "add records, or lower data.val_fraction / data.test_fraction"
        )
    for name in ("val", "test"):
        if not splits[name]:
            _log(f"warning: the {name} split is empty ({len(kept)} usable records); add records for a meaningful {name}")

    with atomic_dir(paths.prepared) as tmp:
        for name, members in splits.items():
            members.sort(key=lambda e: (e.id, e.key))  # the full key only breaks a 64-bit id tie
            rows = [{"id": e.id, "prompt": e.prompt, "completion": e.completion} for e in members]
            write_jsonl(tmp / paths.split(name).name, rows)
    digest = dataset_digest(paths.prepared)

    lengths = sorted(n for _, n in kept)
    token_length = {f"p{p}": _percentile(lengths, p) for p in PERCENTILES} | {"max": lengths[-1]}
    report = {
        "records_read": read,
        "records_kept": len(kept),
        "records_dropped": read - len(kept),
        "dropped": {reason: dropped.get(reason, 0) for reason in REASONS},
        "splits": {name: len(rows) for name, rows in splits.items()},
        "token_length": token_length,
        "truncated": sum(n > data.max_length for n in lengths),
        "dataset_digest": digest,
        "format": fmt,
    }
    write_json(paths.report("prepare"), report)
    _log(
        f"kept {len(kept)}, dropped {read - len(kept)}"
        + (" (" + ", ".join(f"{r} {n}" for r, n in sorted(dropped.items())) + ")" if dropped else "")
        + f"; {report['truncated']} longer than max_length {data.max_length} (training truncates them)"
    )
    _log(
        "wrote " + ", ".join(f"{name} {len(rows)}" for name, rows in splits.items())
        + f" to {paths.prepared} (digest {digest})"
    )
    return PrepareResult(
        **report,
        prepared_dir=paths.prepared,
        split_paths={name: paths.split(name) for name in SPLITS},
        report_path=paths.report("prepare"),
    )


def content_key(prompt: str, completion: str) -> str:
    """sha256 hex of the rendered pair; its first 16 characters are the record's id."""
    blob = json.dumps([prompt, completion], ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def assign_split(record_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """train, val or test, from a hash of (seed, id) mapped to [0, 1).

    u < test → test; u < test + val → val; else train (0.1/0.1 → 10% test, 10% val, 80% train).
    Depends on nothing but the record and the seed, so adding records never moves one.
    """
    h = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _token_counts(tokenizer, texts: list[str]) -> list[int]:
    # No special tokens: the chat template already wrote its own, and EOS is counted by the caller.
    counts: list[int] = []
    for i in range(0, len(texts), TOKENIZE_BATCH):
        batch = tokenizer(texts[i : i + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]
        counts.extend(len(ids) for ids in batch)
    return counts


def _percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile: the smallest value with at least p% of values at or below it."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _log(line: str) -> None:
    note("prepare", line)
