"""One way to write progress and messages: ``stage`` (a stage's header), ``say`` (its detail lines),
``say_block`` (a block shown as it is) and ``note`` (a line naming its source).

They go to stderr, as every stage always wrote them. Inside a Prefect flow run the flow routes them
to Prefect's run logger instead (``flows/common.stage_logs`` through :func:`routed_to`), which writes
them to the run's log (the UI) and to the terminal: once, not twice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_routes: list[Callable[[str], None]] = []  # the innermost route takes the lines; none: stderr


def stage(name: str) -> None:
    """The header a stage prints first: ``==> train``."""
    _emit(f"==> {name}")


def say(msg: str) -> None:
    """An indented detail line of the running stage: ``    r=16, alpha=32 ...``."""
    _emit(f"    {msg}")


def say_block(text: str) -> None:
    """A block of lines shown as it is (the label audit's sample)."""
    for line in text.rstrip("\n").splitlines():
        _emit(line)


def note(where: str, msg: str) -> None:
    """A line that names its source: ``prepare: read 2,000 records ...``."""
    _emit(f"{where}: {msg}")


def routed() -> bool:
    """Whether the lines go to a route now (an enclosing flow already routes them)."""
    return bool(_routes)


@contextmanager
def routed_to(route: Callable[[str], None]) -> Iterator[None]:
    """Send every line to ``route`` (without its indentation) instead of stderr while the block runs."""
    _routes.append(route)
    try:
        yield
    finally:
        _routes.remove(route)


def _emit(line: str) -> None:
    if _routes:
        _routes[-1](line.strip())
    else:
        print(line, file=sys.stderr, flush=True)
