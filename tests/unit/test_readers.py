"""Readers: every source kind yields records with their location; bad rows carry a reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraflow.core.errors import DataError
from loraflow.data.readers import find_source, read_records

RECORDS = [
    {"instruction": "What is the opposite of hot?", "output": "cold"},
    {"instruction": "Name a colour.", "input": "sky", "output": "blue"},
]


def rows(root: Path, path: str, split: str = "train"):
    return list(read_records(find_source(path, root), split))


def write(root: Path, rel: str, data: bytes) -> str:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return rel


def test_jsonl_records_are_named_by_line(tmp_path):
    body = "\n".join(json.dumps(r) for r in RECORDS)
    rel = write(tmp_path, "data/raw/x.jsonl", ("\n" + body + "\n\n").encode())  # blank lines are layout
    out = rows(tmp_path, rel)
    assert [r.record for r in out] == RECORDS
    assert [r.where for r in out] == ["data/raw/x.jsonl:2", "data/raw/x.jsonl:3"]
    assert all(r.bad is None for r in out)


def test_jsonl_bad_lines_carry_reasons(tmp_path):
    lines = [
        json.dumps(RECORDS[0]).encode(),
        b'{"instruction": "broken", ',
        b"[1, 2]",
        b'{"instruction": "caf\xe9", "output": "x"}',  # latin-1 byte
        json.dumps(RECORDS[1]).encode(),
    ]
    rel = write(tmp_path, "x.jsonl", b"\n".join(lines) + b"\n")
    out = rows(tmp_path, rel)
    assert [(r.where, r.bad.reason if r.bad else None) for r in out] == [
        ("x.jsonl:1", None),
        ("x.jsonl:2", "invalid_json"),
        ("x.jsonl:3", "wrong_type"),
        ("x.jsonl:4", "non_utf8"),
        ("x.jsonl:5", None),
    ]
    assert "0xe9" in out[3].bad.problem


def test_jsonl_utf8_bom_and_crlf(tmp_path):
    body = b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in RECORDS) + b"\r\n"
    out = rows(tmp_path, write(tmp_path, "x.jsonl", body))
    assert [r.record for r in out] == RECORDS


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_or_data_key(tmp_path, wrap):
    doc = {"data": RECORDS + [7]} if wrap else RECORDS + [7]
    out = rows(tmp_path, write(tmp_path, "x.json", json.dumps(doc, indent=2).encode()))
    assert [r.record for r in out[:2]] == RECORDS
    assert [r.where for r in out] == ["x.json:row 1", "x.json:row 2", "x.json:row 3"]
    assert out[2].bad.reason == "wrong_type"


def test_json_document_errors_name_the_line(tmp_path):
    rel = write(tmp_path, "x.json", b'[\n {"a": 1},\n {"a": }\n]')
    with pytest.raises(DataError, match=r"^x\.json:3: not valid JSON"):
        rows(tmp_path, rel)
    rel = write(tmp_path, "y.json", b'[\n {"a": "\xff"}\n]')
    with pytest.raises(DataError, match=r"^y\.json:2: not valid UTF-8"):
        rows(tmp_path, rel)
    rel = write(tmp_path, "z.json", b'{"rows": []}')
    with pytest.raises(DataError, match=r'expected a list of records or \{"data"'):
        rows(tmp_path, rel)


def test_csv_lines_multiline_fields_and_bad_rows(tmp_path):
    body = (
        b"instruction,input,output\n"
        b'"What is the opposite of hot?",,cold\n'
        b'"Two\nlines",x,y\n'  # a quoted field spanning lines 3-4
        b"\n"
        b"too,many,columns,here\n"
        b"caf\xe9,,x\n"
        b"last,,z\n"
    )
    out = rows(tmp_path, write(tmp_path, "t.csv", body))
    assert [(r.where, r.bad.reason if r.bad else None) for r in out] == [
        ("t.csv:2", None),
        ("t.csv:3", None),
        ("t.csv:6", "invalid_csv"),
        ("t.csv:7", "non_utf8"),
        ("t.csv:8", None),
    ]
    assert out[0].record == {"instruction": "What is the opposite of hot?", "input": "", "output": "cold"}
    assert out[1].record["instruction"] == "Two\nlines"


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([dict(r, input=r.get("input")) for r in RECORDS]), tmp_path / "x.parquet")
    out = rows(tmp_path, "x.parquet")
    assert [r.where for r in out] == ["x.parquet:row 1", "x.parquet:row 2"]
    assert out[1].record == RECORDS[1]
    assert out[0].record["input"] is None
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        rows(tmp_path, "bad.parquet")


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([dict(r, input=r.get("input", "")) for r in RECORDS])
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "extra": ds.select([1])}).save_to_disk(str(tmp_path / "dict"))
    assert [r.record["output"] for r in rows(tmp_path, "single")] == ["cold", "blue"]
    assert [r.record["output"] for r in rows(tmp_path, "dict", split="extra")] == ["blue"]
    assert rows(tmp_path, "dict")[0].where == "dict:row 1"
    with pytest.raises(DataError, match=r"no split 'test' \(it has extra, train\)"):
        rows(tmp_path, "dict", split="test")


def test_source_resolution(tmp_path):
    write(tmp_path, "data/raw/notes.txt", b"hi")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"unknown extension '\.txt'"):
        find_source("data/raw/notes.txt", tmp_path)
    with pytest.raises(DataError, match=r"data/raw/missing\.jsonl not found"):
        find_source("data/raw/missing.jsonl", tmp_path)
    with pytest.raises(DataError, match="not one saved with datasets' save_to_disk"):
        find_source("plain", tmp_path)
    abs_file = tmp_path / write(tmp_path, "a.jsonl", b"{}\n")
    assert find_source(str(abs_file), Path("/elsewhere")).display == str(abs_file)
    assert find_source("org/some-dataset", tmp_path).kind == "hub"


def test_empty_file_yields_nothing(tmp_path):
    assert rows(tmp_path, write(tmp_path, "e.jsonl", b"\n\n")) == []
    assert rows(tmp_path, write(tmp_path, "e.csv", b"")) == []
