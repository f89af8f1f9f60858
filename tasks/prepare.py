"""prepare: raw records → validated, rendered, deduplicated, split ``data/prepared/`` + stats.

    read (file:line for each record) → render with the format → drop exact duplicates
    → count tokens (drop answers that would be truncated away) → split by content hash
    → write train/val/test.jsonl atomically → reports/prepare.json

The file is streamed: records are read, rendered and deduplicated in batches of ``BATCH``, and each batch's
tokens are counted by the tokenizer's batch encoding in worker threads while the next batch is read
(``_Stream`` says what stays in memory). With ``data.on_bad_record: error`` the first bad record in file order
stops the stage before the rest of the file is read.

A record's split depends only on its content and ``data.seed``: adding records never moves an
existing one, and two runs write byte-identical files (DVC relies on it).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from json.encoder import encode_basestring
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel

from loraflow.core.atomic import atomic_dir, atomic_file, write_json
from loraflow.core.config import Config
from loraflow.core.errors import DataError
from loraflow.core.fingerprint import dataset_digest
from loraflow.core.messages import note
from loraflow.core.paths import Paths
from loraflow.data.formats import BadRecord, check_fields, detect_format, render
from loraflow.data.readers import find_source, read_records, too_long
from loraflow.data.splits import SPLITS
from loraflow.data.tokencount import TokenCounter
from loraflow.model.loading import load_tokenizer

# Every reason a record can be dropped for; the report lists them all (zeros too) so that
# `dvc metrics diff` compares the same keys from run to run.
REASONS = (
    "invalid_json",
    "non_utf8",
    "not_unicode",
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
# Records rendered and deduplicated, then token-counted together (prompts and prompt + answer: two batch encodes,
# run beside the reading of the next batch). In error mode, a bad record is reported once every record before
# it has been checked, so at most two batches past it are read, never the rest of the file.
BATCH = 2048
WORKERS = 2  # tokenizing threads (a fast tokenizer's batch call holds no GIL); this machine has 2 cores
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


class Candidate(NamedTuple):
    """A rendered record seen for the first time, waiting in its batch for its token counts."""

    digest: bytes  # sha256 of (prompt, completion), see content_key: the dedup key
    where: str
    prompt: str
    completion: str
    prompt_json: str  # the two strings as JSON writes them, for the output row
    completion_json: str
    prompt_bytes: int


def run(cfg: Config, paths: Paths) -> PrepareResult:
    """Run the prepare stage: read ``cfg.data.path``, write ``paths.prepared`` and ``reports/prepare.json``."""
    data = cfg.data
    check_fields(data.fields)
    source = find_source(data.path, paths.root)
    tokenizer = load_tokenizer(cfg, paths)
    stream = _Stream(cfg, TokenCounter(tokenizer))
    try:
        fmt = stream.read(source, tokenizer)
    finally:
        stream.pool.shutdown(wait=True, cancel_futures=True)
    read, dropped, kept = stream.read_count, stream.dropped, stream.kept
    _log(f"read {read} records from {source.display} (format {fmt or data.format})")
    if read == 0:
        raise DataError(f"{source.display}: no records found; point data.path at a dataset with records")
    if not kept:
        why = ", ".join(f"{r} {n}" for r, n in sorted(dropped.items())) or "none"
        raise DataError(
            f"{source.display}: no usable records (read {read}, dropped: {why}); fix the data "
            "or point data.path at another dataset"
        )
    for line in stream.skipped_shown:
        _log(f"skipped {line}")
    if stream.skipped > SHOW_SKIPPED:
        _log(f"... and {stream.skipped - SHOW_SKIPPED} more skipped")

    splits = stream.splits
    if not splits["train"]:
        raise DataError(
            f"{source.display}: none of the {kept} usable records landed in the train split; "
            "add records, or lower data.val_fraction / data.test_fraction"
        )
    for name in ("val", "test"):
        if not splits[name]:
            _log(f"warning: the {name} split is empty ({kept} usable records); add records for a meaningful {name}")

    with atomic_dir(paths.prepared) as tmp:
        for name, members in splits.items():
            # Each member is digest + row: sorting the bytes sorts by the full content key, which is sorting by
            # (id, key) as rows always were (the id is the key's first 16 hex digits).
            members.sort()
            with atomic_file(tmp / paths.split(name).name, "wb") as fh:
                fh.writelines(memoryview(m)[DIGEST_SIZE:] for m in members)
    digest = dataset_digest(paths.prepared)

    token_length = {f"p{p}": _percentile(stream.lengths, kept, p) for p in PERCENTILES} | {
        "max": max(stream.lengths)
    }
    report = {
        "records_read": read,
        "records_kept": kept,
        "records_dropped": read - kept,
        "dropped": {reason: dropped.get(reason, 0) for reason in REASONS},
        "splits": {name: len(rows) for name, rows in splits.items()},
        "token_length": token_length,
        "truncated": sum(n for length, n in stream.lengths.items() if length > data.max_length),
        "dataset_digest": digest,
        "format": fmt,
    }
    write_json(paths.report("prepare"), report)
    _log(
        f"kept {kept}, dropped {read - kept}"
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


DIGEST_SIZE = hashlib.sha256().digest_size


class _Stream:
    """Reads, renders, deduplicates and token-counts records in file order, one batch at a time.

    What it holds, all the way through (everything else lives for one batch at most):

    - ``seen``: the 32-byte digest of every distinct rendered record (kept, or dropped as answer_truncated:
      a later copy of either counts as a duplicate);
    - ``splits``: each kept record once, as its digest followed by its output row (UTF-8 bytes of the JSON line
      prepare writes), in the split it belongs to: the rows must be sorted before the first one is written;
    - ``lengths``: how many kept records have each token length (for the percentiles), and counters.

    Tokenizing runs in a worker thread pool, one batch behind the reading: batch N's prompts and full texts
    encode (two batch calls, on two cores with a fast tokenizer) while batch N + 1 is read and rendered.
    Batches are finished in order, so records are checked, counted and failed in file order.
    """

    def __init__(self, cfg: Config, counter: TokenCounter) -> None:
        self.data = cfg.data
        self.count_tokens = counter
        self.seen: set[bytes] = set()
        self.splits: dict[str, list[bytes]] = {name: [] for name in SPLITS}
        self.lengths: Counter[int] = Counter()
        self.dropped: Counter[str] = Counter()
        self.read_count = 0
        self.kept = 0
        self.skipped = 0
        self.skipped_shown: list[str] = []
        self.pending: list[Candidate] = []
        self.in_flight: deque[tuple[list[Candidate], list[Future], list[Future]]] = deque()
        self.workers = WORKERS if counter.parallel else 1
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="prepare-tokens")

    def read(self, source, tokenizer) -> str | None:
        """Consume the whole source; return the format (None when no record was readable)."""
        data = self.data
        fmt = None if data.format == "auto" else data.format
        seen, pending = self.seen, self.pending
        for row in read_records(source, data.split, data.max_record_bytes):
            self.read_count += 1
            if row.bad is not None:
                self.bad(row.where, row.bad)
                continue
            if fmt is None:
                fmt = detect_format(row.record, data.fields)
            try:
                prompt, completion = render(row.record, fmt, data.fields, tokenizer)
            except BadRecord as err:
                self.bad(row.where, err)
                continue
            try:
                prompt_bytes = len(prompt.encode("utf-8"))
                size = prompt_bytes + len(completion.encode("utf-8"))
            except UnicodeEncodeError as e:  # a lone UTF-16 surrogate ("\ud800" in JSON): no tokenizer takes it
                self.bad(row.where, not_unicode(e))
                continue
            if size > data.max_record_bytes:  # before tokenizing: a 50 MB field would take minutes
                self.bad(row.where, too_long(size, data.max_record_bytes))
                continue
            prompt_json, completion_json = encode_basestring(prompt), encode_basestring(completion)
            # content_key's blob, built from the escaped strings the output row needs too
            digest = hashlib.sha256(f"[{prompt_json}, {completion_json}]".encode()).digest()
            if digest in seen:
                self.dropped["duplicate"] += 1  # not an error even with on_bad_record: error
                continue
            seen.add(digest)
            pending.append(Candidate(digest, row.where, prompt, completion, prompt_json, completion_json, prompt_bytes))
            if len(pending) >= BATCH:
                self.submit()
        self.drain()
        return fmt

    def bad(self, where: str, err: BadRecord, *, earlier_checked: bool = False) -> None:
        if self.data.on_bad_record == "error":
            if not earlier_checked:
                self.drain()  # a bad record earlier in the file, found by its token count, is the one to report
            raise DataError(f"{where}: {err.problem}; {err.fix}, or set data.on_bad_record: skip to drop such records")
        self.dropped[err.reason] += 1
        self.skipped += 1
        if len(self.skipped_shown) < SHOW_SKIPPED:
            self.skipped_shown.append(f"{where}: {err.problem}")

    def submit(self) -> None:
        """Start counting the pending batch's tokens; finish the batch before it (one batch in flight)."""
        if not self.pending:
            return
        batch = self.pending.copy()
        self.pending.clear()  # in place: read() holds it
        # No special tokens: the chat template already wrote its own, and EOS is counted below.
        # A prompt whose byte count bounds its tokens below the limit needs no count (see finish).
        limit, bound = self.data.max_length - 1, self.count_tokens.most_tokens
        unsure = [c.prompt for c in batch if (most := bound(c.prompt_bytes)) is None or most >= limit]
        full = [c.prompt + c.completion for c in batch]
        self.in_flight.append((batch, self._count(unsure), self._count(full)))
        while len(self.in_flight) > 1:
            self.finish(*self.in_flight.popleft())

    def drain(self) -> None:
        """Finish every batch read so far, in file order."""
        self.submit()
        while self.in_flight:
            self.finish(*self.in_flight.popleft())

    def _count(self, texts: list[str]) -> list[Future]:
        """Count ``texts`` in one slice per worker (a batch call encodes on one core)."""
        step = max(1, -(-len(texts) // self.workers))
        return [self.pool.submit(self.count_tokens, texts[i : i + step]) for i in range(0, len(texts), step)]

    def finish(self, batch: list[Candidate], prompts: list[Future], full: list[Future]) -> None:
        data = self.data
        limit, bound = data.max_length - 1, self.count_tokens.most_tokens
        counted = (n for part in prompts for n in part.result())
        full_lens = (n for part in full for n in part.result())
        for c, f_len in zip(batch, full_lens):
            # Length = prompt + answer + EOS. A prompt of max_length - 1 tokens or more leaves no room for a
            # single answer token: training would see zero supervised tokens, so the record is bad.
            most = bound(c.prompt_bytes)
            p_len = next(counted) if most is None or most >= limit else None  # else: fewer than limit, surely
            if p_len is not None and p_len >= limit:
                # Batches finish in file order: every record before this one has been checked.
                self.bad(c.where, BadRecord(
                    "answer_truncated",
                    f"the prompt alone is {p_len} tokens, so with max_length {data.max_length} no answer token is left",
                    "shorten the prompt or raise data.max_length",
                ), earlier_checked=True)
                continue
            record_id = c.digest[:8].hex()
            row = f'{{"completion": {c.completion_json}, "id": "{record_id}", "prompt": {c.prompt_json}}}\n'
            split = assign_split(record_id, data.seed, data.val_fraction, data.test_fraction)
            self.splits[split].append(c.digest + row.encode("utf-8"))
            self.lengths[f_len + 1] += 1
            self.kept += 1


def not_unicode(err: UnicodeEncodeError) -> BadRecord:
    char = err.object[err.start : err.end]
    return BadRecord(
        "not_unicode",
        f"the text holds {char.encode('unicode_escape').decode()}, a lone UTF-16 surrogate "
        "that is not valid Unicode",
        "fix the escape in the source (a surrogate pair encodes one character: \\ud83d\\ude00)",
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


def _percentile(counts: Counter[int], total: int, p: float) -> int:
    """Nearest-rank percentile of ``total`` values given as value -> how many: the smallest value with at least
    p% of values at or below it."""
    rank = max(1, math.ceil(p / 100 * total))
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= rank:
            return value
    raise ValueError("rank past the last value")


def _log(line: str) -> None:
    note("prepare", line)
