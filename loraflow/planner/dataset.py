"""How much data a run trains on, counted cheaply: records, and tokens per record."""

from __future__ import annotations

import json
from pathlib import Path

from loraflow.core.config import Config
from loraflow.core.errors import LoraflowError
from loraflow.core.paths import Paths
from loraflow.planner.result import DataSize


def data_size(cfg: Config, paths: Paths) -> DataSize:
    """Train records and mean-ish tokens per record, each with the source it came from.

    Records: the prepared train split (``data/prepared/train.jsonl``) when present; else the
    records of ``data.path`` × the train share ``1 − val_fraction − test_fraction``; a hub
    dataset is not counted (no network).
    Tokens per record: the median (p50) of ``reports/prepare.json``'s ``token_length``, capped
    at ``data.max_length``; else ``max_length / 2``.
    Test records (what evaluate and merge's logit check run through): the prepared test split when
    present, else the train count scaled by ``test_fraction / train share``.
    """
    records, records_source = _train_records(cfg, paths)
    per_record, tokens_source = _tokens_per_record(cfg, paths)
    return DataSize(records, records_source, per_record, tokens_source, _test_records(cfg, paths, records))


def _test_records(cfg: Config, paths: Paths, train: int | None) -> int | None:
    split = paths.split("test")
    if split.exists():
        return _count_lines(split)
    share = 1 - cfg.data.val_fraction - cfg.data.test_fraction
    if train is None or share <= 0:
        return None
    return round(train / share * cfg.data.test_fraction)


def _train_records(cfg: Config, paths: Paths) -> tuple[int | None, str]:
    split = paths.split("train")
    if split.exists():
        return _count_lines(split), f"{_rel(split, paths)}"
    share = 1 - cfg.data.val_fraction - cfg.data.test_fraction
    try:
        raw = _count_source(cfg, paths)
    except (LoraflowError, OSError, ValueError) as e:
        return None, f"unknown ({e})"
    if raw is None:
        return None, f"unknown: {cfg.data.path} is a hub dataset and plan reads no network"
    return round(raw * share), f"{cfg.data.path}: {raw} records × train share {share:g} (not prepared yet)"


def _count_source(cfg: Config, paths: Paths) -> int | None:
    from loraflow.data.readers import find_source

    source = find_source(cfg.data.path, paths.root)
    where = Path(source.location)
    if source.kind == "jsonl":
        return _count_lines(where)
    if source.kind == "csv":
        import csv

        with open(where, encoding="utf-8-sig", newline="") as f:
            return max(sum(1 for row in csv.reader(f) if row) - 1, 0)  # less the header
    if source.kind == "json":
        data = json.loads(where.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"data": [...]}-style wrappers
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        return len(data)
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(where).metadata.num_rows
    if source.kind == "disk":
        import datasets

        ds = datasets.load_from_disk(str(where))  # memory-mapped: the count reads no rows
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.data.split] if cfg.data.split in ds else next(iter(ds.values()))
        return len(ds)
    return None  # hub


def _tokens_per_record(cfg: Config, paths: Paths) -> tuple[float, str]:
    report = paths.report("prepare")
    limit = cfg.data.max_length
    try:
        lengths = json.loads(report.read_text(encoding="utf-8")).get("token_length") or {}
        p50 = float(lengths["p50"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return limit / 2, f"assumed max_length/2 = {limit / 2:g} (no token_length in {_rel(report, paths)})"
    return min(p50, limit), f"median (p50) of {_rel(report, paths)} token_length, capped at max_length {limit}"


def _count_lines(path: Path) -> int:
    """Non-blank lines, read in binary chunks (a JSONL record is one line)."""
    n = 0
    with open(path, "rb") as f:
        for line in f:
            n += bool(line.strip())
    return n


def _rel(path: Path, paths: Paths) -> str:
    try:
        return str(path.relative_to(paths.root))
    except ValueError:
        return str(path)
