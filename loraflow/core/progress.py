"""The one progress bar every long loop shows: tqdm on stderr, quiet in a log file.

On a terminal it refreshes ten times a second; when stderr is a file or a pipe (``make run``
piped, a Prefect worker's log, CI) it writes a line at most every 10 s, so a log holds a
readable trail of the run instead of hundreds of refreshes.
"""

from __future__ import annotations

import sys
from typing import Any


def interactive() -> bool:
    """Whether stderr is a terminal (refresh freely) or a log (refresh rarely)."""
    return sys.stderr.isatty()


def bar(iterable: Any = None, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)`` on stderr with loraflow's refresh policy; kwargs may override it."""
    from tqdm.auto import tqdm

    options = {"file": sys.stderr, "dynamic_ncols": True, "mininterval": 0.1 if interactive() else 10.0}
    return tqdm(iterable, **(options | kwargs))


def size_text(nbytes: float) -> str:
    """``1.86 GiB``, ``543.2 KiB``: a size as a person reads it (a tiny model is not "0.00 GiB")."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            if unit == "B":
                return f"{nbytes:.0f} B"
            return f"{nbytes:.3g} {unit}" if nbytes < 1000 else f"{nbytes:,.0f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")
