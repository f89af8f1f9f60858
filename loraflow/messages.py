"""One way to write progress and messages: ``say`` (a stage's detail lines) and ``stage`` (its header).

Both go to stderr, as every stage always wrote them, and through the ``loraflow`` logger when a
handler is attached to it: inside a Prefect flow run the flow adds Prefect's run-log handler
(``flows/common.stage_logs``), so the Prefect UI shows the lines the terminal shows.
"""

from __future__ import annotations

import logging
import sys

LOGGER = logging.getLogger("loraflow")
LOGGER.propagate = False  # stderr already has the line; the root logger must not print it twice


def say(msg: str) -> None:
    """An indented detail line of the running stage: ``    r=16, alpha=32 ...``."""
    _emit(f"    {msg}")


def stage(name: str) -> None:
    """The header a stage prints first: ``==> train``."""
    _emit(f"==> {name}")


def say_block(text: str) -> None:
    """A block of lines shown as it is (the label audit's sample)."""
    for line in text.rstrip("\n").splitlines():
        _emit(line)


def note(where: str, msg: str) -> None:
    """A line that names its source: ``prepare: read 2,000 records ...``."""
    _emit(f"{where}: {msg}")


def _emit(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    if LOGGER.handlers:
        LOGGER.info(line.strip())
