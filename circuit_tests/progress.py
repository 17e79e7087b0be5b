"""Progress of long work: bars on an interactive terminal, timestamped lines everywhere else.

One concept, two renderings. Work reports itself where it happens: :func:`stage` around a step
(loading a model, making cards), :func:`bar` over a step's batches (a trace, a curve, flips, null
draws, edges, the corpus pass), :class:`Countdown` over a series' checkpoints. Nothing is shown
unless the command line, or the pytest plugin while an item runs, opens :func:`reported`; the
library alone says nothing.

- On an interactive terminal, with ``CI`` unset: transient tqdm bars, as before.
- Anywhere else (a pipe, every CI log): one line when a stage starts and one when it ends, with
  its elapsed seconds; during a long stage, a line saying which batch of how many it has done,
  at the first batch end ``interval`` seconds (30 by default) after the last line.
- ``quiet``: nothing.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TextIO, TypeVar

from circuit_tests.text import printable

T = TypeVar("T")
HEARTBEAT = 30.0  # seconds: the longest a long stage goes without a line (checked as each batch ends)


@dataclass(frozen=True)
class _Shown:
    """Where progress goes inside a :func:`reported` block, and how."""

    stream: TextIO
    bars: bool
    interval: float


_shown: ContextVar[_Shown | None] = ContextVar("circuit_tests_progress", default=None)
_about: ContextVar[str] = ContextVar("circuit_tests_progress_about", default="")


@contextmanager
def reported(stream: TextIO | None = None, *, quiet: bool = False, interval: float = HEARTBEAT) -> Iterator[None]:
    """Show progress on ``stream`` (default stderr) inside this block: bars if it is an interactive terminal and ``CI``
    is unset, else lines (a line at least every ``interval`` seconds of a long stage); nothing when ``quiet``."""
    stream = stream or sys.stderr
    bars = stream.isatty() and not os.environ.get("CI")
    token = _shown.set(None if quiet else _Shown(stream, bars, interval))
    try:
        yield
    finally:
        _shown.reset(token)


@contextmanager
def about(subject: str) -> Iterator[None]:
    """Lines inside this block name ``subject`` (a spec on a checkpoint, say)."""
    token = _about.set(subject)
    try:
        yield
    finally:
        _about.reset(token)


def say(text: str) -> None:
    """One timestamped line, when progress is shown as lines."""
    shown = _shown.get()
    if shown is None or shown.bars:
        return
    subject = _about.get()
    line = f"[{time.strftime('%H:%M:%S')}] circuit-tests: {subject + ': ' if subject else ''}{text}"
    shown.stream.write(printable(line) + "\n")  # model and spec names may come from a pull request
    shown.stream.flush()


@contextmanager
def stage(what: str, detail: str = "") -> Iterator[None]:
    """A line when ``what`` starts (with ``detail``) and one when it ends, with the seconds it took."""
    say(f"{what}: started{detail}")
    started = time.perf_counter()
    yield
    say(f"{what}: done in {time.perf_counter() - started:.1f} s")


def bar(items: Iterable[T], description: str, total: int | None = None, unit: str = "batch") -> Iterable[T]:
    """``items`` unchanged, with a transient bar or stage lines (:func:`reported`) counting them as ``unit``s; ``total``
    defaults to their length."""
    shown = _shown.get()
    if shown is None:
        return items
    if total is None and isinstance(items, Sequence):
        total = len(items)
    if shown.bars:
        from tqdm import tqdm

        return tqdm(items, desc=description, total=total, file=shown.stream, leave=False, dynamic_ncols=True)
    return _in_lines(items, description, total, unit, shown.interval)


def _in_lines(items: Iterable[T], description: str, total: int | None, unit: str, interval: float) -> Iterator[T]:
    """``items``, as a stage whose lines say at least every ``interval`` seconds which ``unit`` of ``total`` it has done."""
    of = f" of {total}" if total is not None else ""
    plural = unit + ("es" if unit.endswith("ch") else "s")
    with stage(description, f", {total} {plural}" if total is not None else ""):
        last = time.perf_counter()
        for done, item in enumerate(items, 1):
            yield item
            now = time.perf_counter()
            if now - last >= interval:
                say(f"{description}: {unit} {done}{of}")
                last = now


class Countdown:
    """'checkpoint k of N' lines for work that goes through ``names`` in order, with the time left at the pace so far."""

    def __init__(self, names: Sequence[str], what: str = "checkpoint") -> None:
        self.names, self.what = list(names), what
        self._reached: list[str] = []
        self._started = 0.0

    def reached(self, name: str) -> None:
        """Say that work on ``name`` starts, the first time it does (names not listed are not counted)."""
        if name not in self.names or name in self._reached:
            return
        if not self._reached:
            self._started = time.perf_counter()
        self._reached.append(name)
        index, done = self.names.index(name), len(self._reached) - 1
        line = f"{self.what} {index + 1} of {len(self.names)} ({name})"
        if done and index == done:  # in order: the checkpoints done so far set the pace
            left = (time.perf_counter() - self._started) / done * (len(self.names) - done)
            line += f"; about {left:.0f} s left"
        say(line)
