"""A checkpoint series: the checkpoints of a training run, in training order, each with its step.

The person running the suite names a series (``--circuit-series``, ``circuit-tests series`` and
``bisect``) with any mix of:

- a glob of directories, ``ckpts/step-*``: every match, in natural order (``step-900`` before
  ``step-1000``);
- ``@FILE``: a list file, read as a dataset is (:func:`~circuit_tests.files.read_text`: a regular file, at most
  :data:`LIST_LIMIT`, UTF-8), with one checkpoint (or glob) per line, ``#`` starting a comment. Under pytest it is
  written ``--circuit-series=@FILE``, one argument: pytest expands a separate ``@FILE`` argument into command-line
  arguments itself (:func:`refuse_pytest_expansion`);
- a list separated by commas, or the option repeated: kept in the order given;
- any model name (a directory, a registered name, ``org/model@revision``), as ``--circuit-model`` takes it.

A checkpoint's step is the last number in its name's final part (``step-1000``, ``pythia-70m@step3000``);
a series in which every checkpoint has a distinct step is plotted against the step, else against its place.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from circuit_tests.errors import BadOptionError, CircuitTestsError
from circuit_tests.files import MiB, read_text
from circuit_tests.text import has_control, quoted

_NUMBER = re.compile(r"\d+")
_GLOB = re.compile(r"[*?[]")
LIST_LIMIT = 1 * MiB  # a checkpoint list file (@FILE)


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a series: its name as a model option takes it, and its training step when the name has one."""

    name: str
    step: int | None


def expand_series(values: Sequence[str], cwd: Path) -> tuple[Checkpoint, ...]:
    """The series the option values name, in training order, each checkpoint once (its first place)."""
    names: list[str] = []
    for value in values:
        for part in (part.strip() for part in value.split(",")):
            names.extend(_from_file(part[1:], cwd) if part.startswith("@") else _one(part, cwd, value))
    for name in names:
        if has_control(name):
            raise BadOptionError(f"checkpoint series: {quoted(name)} has a control character or a line break in its name, "
                                 "which test ids and messages would print. Rename the checkpoint, or leave it out.")
    return tuple(Checkpoint(name, step_of(name)) for name in dict.fromkeys(names))


def _one(part: str, cwd: Path, value: str) -> list[str]:
    if not part:
        raise BadOptionError(f"checkpoint series {value!r}: an empty name. Separate checkpoints with single commas.")
    if not _GLOB.search(part):
        return [part]
    found = sorted((match for match in glob.glob(part, root_dir=cwd) if (cwd / match).is_dir()), key=natural_key)
    if not found:
        raise BadOptionError(f"checkpoint series {part!r}: no directory matches it (from {cwd}). Check the pattern.")
    return found


def _from_file(name: str, cwd: Path) -> list[str]:
    path = cwd / name
    try:
        lines = read_text(path, None, LIST_LIMIT).splitlines()  # the person running names it: it may lie anywhere
    except CircuitTestsError as error:
        raise BadOptionError(f"checkpoint series @{name}: {error}. Give a text file with one checkpoint per line.") from None
    entries = [line.split("#", 1)[0].strip() for line in lines]
    names = [found for entry in entries if entry for found in _one(entry, cwd, f"@{name}")]
    if not names:
        raise BadOptionError(f"checkpoint series @{name}: {path} lists no checkpoint. Write one per line.")
    return names


def refuse_pytest_expansion(args: Sequence[str], option: str) -> None:
    """A usage error for ``option @FILE`` given as two arguments on pytest's command line ``args``: pytest has already
    replaced ``@FILE`` by its lines as command-line arguments (a list holding ``-k`` would deselect tests)."""
    for given, following in zip(args, args[1:]):
        if given == option and following.startswith("@"):
            raise BadOptionError(f"{option} {following}: pytest reads a separate @FILE argument itself, each line becoming "
                                 f"a command-line argument. Write {option}={following}, one argument, for a list of checkpoints.")


def natural_key(name: str) -> list:
    """Sorts ``step-900`` before ``step-1000``: runs of digits compare as numbers."""
    return [(0, int(piece), "") if piece.isdigit() else (1, 0, piece) for piece in re.split(r"(\d+)", name) if piece]


def step_of(name: str) -> int | None:
    """The last number in the name's final part (after the last ``/`` or ``@``); None when it has none."""
    numbers = _NUMBER.findall(re.split(r"[/@]", name.rstrip("/"))[-1])
    return int(numbers[-1]) if numbers else None


def axis(series: Sequence[Checkpoint]) -> list[int]:
    """Where each checkpoint sits on a trend's x-axis: its step when every step is known and distinct, else its place."""
    steps = [checkpoint.step for checkpoint in series]
    if None not in steps and len(set(steps)) == len(steps):
        return [int(step) for step in steps]
    return list(range(len(series)))


def in_training_order(series: Sequence[Checkpoint]) -> Callable[[str], int]:
    """A sort key: a model's place in the series (after every checkpoint when it is not one), so a stable sort runs
    a series' work checkpoint by checkpoint and keeps the order within each."""
    place = {checkpoint.name: index for index, checkpoint in enumerate(series)}
    return lambda name: place.get(name, len(place))


def first_failure(n: int, fails: Callable[[int], bool]) -> tuple[int | None, list[int]]:
    """Bisect a series of ``n`` checkpoints for the first at which ``fails(index)``, with the checkpoints visited.

    The last checkpoint is checked first (None when it passes: nothing to find); then a binary search
    keeps the first failing index known so far, so ``1 + ceil(log2 n)`` checks at most. It assumes that
    once failing, a series keeps failing; where it does not, the answer is one checkpoint that fails
    after one that passes, not necessarily the first such.
    """
    visited = [n - 1]
    if not fails(n - 1):
        return None, visited
    low, high = 0, n - 1  # high fails; every index below low passes
    while low < high:
        middle = (low + high) // 2
        visited.append(middle)
        if fails(middle):
            high = middle
        else:
            low = middle + 1
    return high, visited
