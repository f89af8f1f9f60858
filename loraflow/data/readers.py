"""Read raw records from JSONL, JSON, CSV, Parquet, a ``save_to_disk`` folder or a hub dataset.

Every record comes with where it came from (``data/raw/x.jsonl:17`` for line-based files,
``data/raw/x.parquet:row 17`` otherwise), so an error can point at it. A record that cannot even
be read as an object (broken JSON, bytes that are not UTF-8, a JSON list on a line) is yielded
with a ``BadRecord`` instead of a dict: the caller decides to stop or to skip and count it.
Problems with the file as a whole (missing, unknown extension, unparseable JSON document) raise
``DataError`` at once.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.core.errors import DataError
from loraflow.data.formats import BadRecord, type_name

EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Source:
    """A resolved ``data.path``: what kind of source it is and how messages name it."""

    kind: str  # jsonl | json | csv | parquet | disk | hub
    location: str  # absolute path, or the hub dataset name
    display: str  # the path as the user wrote it (relative to the project root), or the hub name


@dataclass(frozen=True)
class Row:
    """One raw record: ``record`` is the object, or None when ``bad`` says why it is unreadable."""

    where: str
    record: dict[str, Any] | None
    bad: BadRecord | None = None


def find_source(path: str, root: Path) -> Source:
    """Resolve ``data.path`` (relative to ``root``) to a local file, a folder, or a hub dataset name.

    A relative path must stay inside the project: ``../x.jsonl`` is refused (DVC tracks only files
    inside the repository, and the pipeline would silently depend on where the checkout sits). Data
    elsewhere is allowed when named explicitly, by an absolute path.
    """
    given = Path(path).expanduser()
    if not given.is_absolute() and ".." in given.parts:
        inside = os.path.normpath(root / given)
        if os.path.commonpath([inside, os.path.normpath(root)]) != os.path.normpath(root):
            raise DataError(
                f"data.path: {path} points outside the project ({root}); move the data into the project "
                f"(DVC tracks only files inside it), or give its absolute path {inside} if you mean that file"
            )
    local = given if given.is_absolute() else root / given
    display = path if not given.is_absolute() else str(local)
    if local.is_dir():
        if (local / "dataset_dict.json").exists() or (local / "state.json").exists():
            return Source("disk", str(local), display)
        raise DataError(
            f"data.path: {display} is a folder but not one saved with datasets' save_to_disk "
            "(no dataset_dict.json or state.json); point data.path at a .jsonl, .json, .csv or .parquet file"
        )
    if local.is_file():
        kind = EXTENSIONS.get(local.suffix.lower())
        if kind is None:
            raise DataError(
                f"data.path: {display}: unknown extension {local.suffix or '(none)'!r}; "
                f"use one of {', '.join(EXTENSIONS)}, or a save_to_disk folder"
            )
        return Source(kind, str(local), display)
    looks_local = (
        given.is_absolute()
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or given.suffix.lower() in EXTENSIONS
    )
    if looks_local:
        raise DataError(
            f"data.path: {display} not found (looked at {local}); point data.path at an existing file or folder"
        )
    return Source("hub", path, path)


def read_records(source: Source, split: str = "train", max_bytes: int | None = None) -> Iterator[Row]:
    """Yield every record of ``source`` in file order. ``split`` picks a DatasetDict's or hub split.

    ``max_bytes``: a JSONL line longer than this is yielded as a ``too_long`` bad record without being
    parsed (nor held in memory whole); other sources are checked by the caller once rendered.
    """
    if source.kind == "jsonl":
        return _jsonl(source, split, max_bytes)
    reader = {
        "json": _json,
        "csv": _csv,
        "parquet": _parquet,
        "disk": _disk,
        "hub": _hub,
    }[source.kind]
    return reader(source, split)


def too_long(size: int, max_bytes: int) -> BadRecord:
    return BadRecord(
        "too_long",
        f"the record is {size:,} bytes, over data.max_record_bytes ({max_bytes:,})",
        "split or shorten it, or raise data.max_record_bytes",
    )


# ---------------------------------------------------------------------------------------------
# Line-based files: decode each line on its own so a bad byte names its line.


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            yield n, raw.removeprefix(BOM) if n == 1 else raw


def _not_utf8(raw: bytes, err: UnicodeDecodeError) -> BadRecord:
    return BadRecord(
        "non_utf8",
        f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line)",
        "re-save the file as UTF-8",
    )


def _capped_lines(path: str, max_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes, size) per line; bytes is None for a line over ``max_bytes`` (read past, never kept)."""
    with open(path, "rb") as fh:
        n = 0
        while raw := fh.readline(max_bytes + 1):
            n += 1
            if n == 1:
                raw = raw.removeprefix(BOM)
            if len(raw) <= max_bytes or raw.endswith(b"\n") and len(raw.rstrip(b"\r\n")) <= max_bytes:
                yield n, raw, len(raw)
                continue
            size = len(raw)
            while not raw.endswith(b"\n") and (raw := fh.readline(1 << 20)):
                size += len(raw)
            yield n, None, size - 1 if raw.endswith(b"\n") else size


def _jsonl(source: Source, split: str, max_bytes: int | None = None) -> Iterator[Row]:
    lines = _capped_lines(source.location, max_bytes) if max_bytes else (
        (n, raw, len(raw)) for n, raw in _lines(source.location)
    )
    for n, raw, size in lines:
        where = f"{source.display}:{n}"
        if raw is None:
            yield Row(where, None, too_long(size, max_bytes))
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Row(where, None, _not_utf8(raw, e))
            continue
        if not line.strip():
            continue  # blank lines are layout, not records
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            yield Row(where, None, BadRecord("invalid_json", f"not valid JSON ({e.msg} at column {e.colno})",
                                             "fix the JSON on that line"))
            continue
        except RecursionError:  # [[[[...]]]] thousands deep: Python's parser gives up, it must not crash us
            yield Row(where, None, BadRecord("invalid_json", "JSON nested too deeply to parse",
                                             "flatten the record to fields of strings"))
            continue
        if not isinstance(value, dict):
            yield Row(where, None, BadRecord("wrong_type", f"a JSON {type_name(value)}, expected an object",
                                             'write one {"field": value, ...} object per line'))
            continue
        yield Row(where, value)


def _csv(source: Source, split: str) -> Iterator[Row]:
    bad_lines: dict[int, BadRecord] = {}

    def decoded() -> Iterator[str]:
        for n, raw in _lines(source.location):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad_lines[n] = _not_utf8(raw, e)
                yield raw.decode("utf-8", errors="replace")

    reader = csv.reader(decoded())
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"{source.display}:1: the header is not valid CSV ({e}); fix the first line") from None
    if bad_lines:
        bad = next(iter(bad_lines.values()))
        raise DataError(f"{source.display}:1: the header is {bad.problem}; {bad.fix}")
    last = reader.line_num  # physical lines consumed so far (a quoted field may span lines)
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield Row(f"{source.display}:{last + 1}", None,
                      BadRecord("invalid_csv", f"not valid CSV ({e})", "fix the quoting on that line"))
            last = reader.line_num
            continue
        start, last = last + 1, reader.line_num
        if not cells:
            continue  # blank line
        where = f"{source.display}:{start}"
        broken = [bad_lines[n] for n in range(start, last + 1) if n in bad_lines]
        if broken:
            yield Row(where, None, broken[0])
        elif len(cells) != len(header):
            yield Row(where, None, BadRecord(
                "invalid_csv", f"the row has {len(cells)} columns, the header has {len(header)}",
                "quote fields that contain commas"))
        else:
            yield Row(where, dict(zip(header, cells)))


# ---------------------------------------------------------------------------------------------
# Whole documents and tables: records are named by their 1-based row number.


def _json(source: Source, split: str) -> Iterator[Row]:
    raw = Path(source.location).read_bytes().removeprefix(BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{source.display}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8"
        ) from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{source.display}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); fix the file, "
            "or write it as JSONL (one record a line) so bad lines can be skipped"
        ) from None
    except RecursionError:
        raise DataError(
            f"{source.display}: JSON nested too deeply to parse; flatten the records to fields of strings"
        ) from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        items = doc["data"]
    elif isinstance(doc, list):
        items = doc
    else:
        raise DataError(
            f'{source.display}: expected a list of records or {{"data": [...]}}, got a JSON {type_name(doc)}'
            + (f" with keys {', '.join(sorted(doc))}" if isinstance(doc, dict) else "")
            + "; wrap the records in a list"
        )
    yield from _objects(source.display, items)


def _objects(display: str, items) -> Iterator[Row]:
    for i, item in enumerate(items, 1):
        where = f"{display}:row {i}"
        if isinstance(item, dict):
            yield Row(where, item)
        else:
            yield Row(where, None, BadRecord("wrong_type", f"a {type_name(item)}, expected an object",
                                             "make each record an object of fields"))


def _parquet(source: Source, split: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(source.location)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{source.display}: not a readable Parquet file ({_first_line(e)}); check the file") from None
    i = 0
    for batch in table.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            i += 1
            yield Row(f"{source.display}:row {i}", row)


def _disk(source: Source, split: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(source.location)
    except (OSError, ValueError, FileNotFoundError) as e:
        raise DataError(f"data.path: cannot load the save_to_disk folder {source.display} ({_first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"data.split: {source.display} has no split {split!r} (it has {', '.join(sorted(ds))}); "
                f"set -s data.split=..."
            )
        ds = ds[split]
    yield from _objects(source.display, ds)


def _hub(source: Source, split: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(source.location, split=split)
    except Exception as e:  # the hub raises many kinds; the user needs the first line of any
        raise DataError(
            f"data.path: {source.location} is not a local file or folder, and loading it as a hub dataset "
            f"(split {split!r}) failed ({_first_line(e)}); check the path or the dataset name"
        ) from None
    yield from _objects(f"{source.location}[{split}]", ds)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
