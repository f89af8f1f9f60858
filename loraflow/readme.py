"""Keep README.md's config reference generated from the schema (`make docs`; a test checks it)."""

from __future__ import annotations

import re
from pathlib import Path

from loraflow.core.config import load_config, reference_markdown

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render(readme: str, params: Path) -> str:
    table = reference_markdown(load_config(params))
    return re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{table}\n{END}", readme, flags=re.S)


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    path = root / "README.md"
    path.write_text(render(path.read_text(encoding="utf-8"), root / "params.yaml"), encoding="utf-8")


if __name__ == "__main__":
    main()
