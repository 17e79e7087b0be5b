"""Progress bars for long work, shown only on an interactive terminal.

The command line, and the pytest plugin while an item runs (on the real stderr, past pytest's
capture), turn them on with :func:`on_terminal`; the library never does. ``CI`` set in the
environment (as every CI service does) or an output that is not a terminal keeps them off, so
test output and CI logs stay free of carriage-return noise.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")
_stream: ContextVar[TextIO | None] = ContextVar("circuit_tests_progress", default=None)


@contextmanager
def on_terminal(stream: TextIO | None = None) -> Iterator[None]:
    """Show progress bars on ``stream`` (default stderr) inside this block, if it is an interactive terminal."""
    stream = stream or sys.stderr
    shown = stream.isatty() and not os.environ.get("CI")
    token = _stream.set(stream if shown else None)
    try:
        yield
    finally:
        _stream.reset(token)


def bar(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """``items`` unchanged, with a transient progress bar when :func:`on_terminal` is active."""
    stream = _stream.get()
    if stream is None:
        return items
    return tqdm(items, desc=description, total=total, file=stream, leave=False, dynamic_ncols=True)
