"""Read the prepared splits that `loraflow stage prepare` wrote: train, evaluate and merge use them."""

from __future__ import annotations

import json

from loraflow.core.errors import DataError
from loraflow.core.paths import Paths

SPLITS = ("train", "val", "test")


def load_split(paths: Paths, name: str) -> list[dict]:
    """The rows ``{"id", "prompt", "completion"}`` of split ``name`` (train, val or test), in file order."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; one of {', '.join(SPLITS)}")
    path = paths.split(name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: prepared split not found; run `loraflow stage prepare` first") from None
    rows = []
    # split on "\n" only: rows are written with ensure_ascii=False, so U+2028 may sit inside a string.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); re-run `loraflow stage prepare`") from None
        if not isinstance(row, dict) or not {"id", "prompt", "completion"} <= row.keys():
            raise DataError(f"{path}:{n}: expected an id/prompt/completion object; re-run `loraflow stage prepare`")
        rows.append(row)
    return rows
