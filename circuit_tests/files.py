"""Files the suite reads and writes: a pull request's files read within bounds, outputs replaced atomically.

A pull request can change specs, datasets, baselines and checkpoint directories (docs/security.md).
Every such file is read through :func:`read_text`, which only reads

- a path that resolves (links followed) inside one of the allowed roots: the project, or the cache;
- a regular file: never a directory, a FIFO (which would hang the session) or a device such as
  ``/dev/zero`` (which would exhaust memory);
- at most ``limit`` bytes, and only valid UTF-8;
- a path whose name (and, through links, whose target's name) holds no control character: a name such as
  ``"x\n::error::y"`` would otherwise put a line of its own into every message that names the file.

The file is opened without following a link in its last component and checked with ``fstat`` on
the open descriptor, so it cannot be swapped for a link or a FIFO between the check and the read.
:func:`sha256_of` reads a checkpoint's files for its fingerprint by the same rules, of any size, a
chunk at a time.

JSON from such a file (baselines, circuit files) is parsed by :func:`parse_json`, which refuses a key
given twice in one object (a plain reader keeps the last silently) and checks the nesting depth
(at most :data:`JSON_DEPTH`) before the recursive parser runs.

What the suite writes (baselines, cached traces) goes through :func:`replace_atomically`: readers
see the old file or the new one, never a partial write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from circuit_tests.errors import CircuitTestsError
from circuit_tests.text import has_control, shown

KiB, MiB = 1024, 1024 * 1024
SPEC_LIMIT = 1 * MiB
DATASET_LIMIT = 32 * MiB
BASELINE_LIMIT = 16 * MiB
CONFIG_LIMIT = 4 * MiB  # a checkpoint's config.json and tokenizer_config.json
JSON_DEPTH = 32  # nesting of a JSON file a pull request controls: a baseline needs 5 levels, a circuit file 3


class UnreadableInput(CircuitTestsError):
    """A file that is outside the allowed roots, not a regular file, too large or not UTF-8 text."""


def resolved(path: Path) -> Path | None:
    """``path`` with every link resolved; None for a link that loops."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # Python before 3.13 raises RuntimeError for a loop
        return None


def inside(path: Path, roots: Sequence[Path]) -> bool:
    """Whether ``path``, with every link resolved, lies inside one of ``roots`` (a link that loops lies nowhere)."""
    real = resolved(path)
    return real is not None and any(real.is_relative_to(root.resolve()) for root in roots)


def read_text(path: Path, roots: Sequence[Path] | None, limit: int) -> str:
    """The UTF-8 text of a regular file inside ``roots`` (``None``: anywhere) of at most ``limit`` bytes."""
    real = resolved(path)
    if has_control(str(path)) or (real is not None and has_control(str(real))):
        raise UnreadableInput(f"{shown(path)} has a control character or a line break in its name (or its link target's "
                              "name), which would forge lines of every message naming it; rename the file")
    with _opened(path, roots) as (handle, size):
        if size > limit:
            raise UnreadableInput(f"{path} is {_size(size)}, more than the {_size(limit)} allowed")
        data = b"".join(_chunks(handle, limit + 1))
    if len(data) > limit:
        raise UnreadableInput(f"{path} is more than the {_size(limit)} allowed")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UnreadableInput(f"{path} is not UTF-8 text (byte {error.start}, line {line}); save it as UTF-8") from None


def parse_json(text: str, path: Path, parse_constant: Callable[[str], object] | None = None) -> object:
    """The JSON value of ``text``, read from ``path``: nested at most :data:`JSON_DEPTH` deep, no key twice in one object.

    ``parse_constant`` is called for ``NaN``, ``Infinity`` and ``-Infinity`` (default: they are floats).
    """
    if _deeper_than(text, JSON_DEPTH):
        raise UnreadableInput(f"{path} is nested more than {JSON_DEPTH} levels deep, deeper than any file circuit-tests writes")
    try:
        return json.loads(text, object_pairs_hook=unique_keys, parse_constant=parse_constant)
    except json.JSONDecodeError as error:
        raise UnreadableInput(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except DuplicateKey as key:
        raise UnreadableInput(f"{path} gives the key {key} twice in one object (a JSON reader would silently keep the "
                              "second); keep one") from None


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SQUARE = str.maketrans("{}", "[]")


def _deeper_than(text: str, depth: int) -> bool:
    """Whether the brackets of ``text`` outside its strings nest more than ``depth`` deep, without recursing: each
    pass removes the innermost pairs, so a pair left after ``depth`` passes lies deeper, as does a run of more than
    ``depth`` opening brackets at any pass (which answers a deeply nested file at once)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).translate(_SQUARE)
    for _ in range(depth):
        if "[" * (depth + 1) in brackets:
            return True
        brackets = brackets.replace("[]", "")
    return "[]" in brackets


class DuplicateKey(Exception):
    """A key given twice in one JSON object (raised by :func:`unique_keys`); its text is the key, quoted."""

    def __str__(self) -> str:
        return repr(self.args[0])


def unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``json.loads``' ``object_pairs_hook`` that refuses a key given twice, where a plain reader keeps the last."""
    mapping: dict = {}
    for key, value in pairs:
        if key in mapping:
            raise DuplicateKey(key)
        mapping[key] = value
    return mapping


def sha256_of(path: Path, roots: Sequence[Path] | None) -> str:
    """The sha256 (hex) of a regular file inside ``roots`` (``None``: anywhere), read 16 MiB at a time up to the
    size ``fstat`` gave when it was opened: a file of any size, never whole in memory."""
    digest = hashlib.sha256()
    with _opened(path, roots) as (handle, size):
        for chunk in _chunks(handle, size):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def _opened(path: Path, roots: Sequence[Path] | None) -> Iterator[tuple[int, int]]:
    """The descriptor and size of a regular file inside ``roots``, its links resolved first and none followed after."""
    real = resolved(path)
    if real is None:
        raise UnreadableInput(f"{path} is a link that loops")
    if roots is not None and not inside(real, roots):
        allowed = " or ".join(str(root) for root in roots)
        link = f" (a link to {real})" if path.is_symlink() or real != path.absolute() else ""
        raise UnreadableInput(f"{path}{link} is outside {allowed}; only files inside the project are read")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        handle = os.open(real, flags)
    except FileNotFoundError:
        raise UnreadableInput(f"{real} does not exist") from None
    except OSError as error:
        raise UnreadableInput(f"{real} cannot be read ({error.strerror})") from None
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableInput(f"{real} is {file_kind(info.st_mode)}, not a regular file")
        yield handle, info.st_size
    finally:
        os.close(handle)


def _chunks(handle: int, limit: int) -> Iterator[bytes]:
    """What ``handle`` holds, up to ``limit`` bytes, 16 MiB at a time."""
    total = 0
    while total < limit:
        chunk = os.read(handle, min(16 * MiB, limit - total))
        if not chunk:
            return
        total += len(chunk)
        yield chunk


def file_kind(mode: int) -> str:
    """What a ``stat`` mode says a path is, in words: "a directory", "a FIFO", ..."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / KiB:.0f} KiB" if n >= KiB else f"{n} bytes"


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, flush it to disk, then rename it over ``path``:
    readers see the old file or the new one, never a partial write, even if the writer is killed.
    The new file keeps the old one's permissions (a new one gets the umask's)."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        if path.is_file():
            os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def mode_of(path: Path) -> int | None:
    """``stat`` mode with links followed; None for a path that does not exist (or cannot: too long, a NUL byte)."""
    try:
        return os.stat(path).st_mode
    except (OSError, ValueError):
        return None


def reviewable_json(content: dict) -> str:
    """Stable, reviewable JSON: sorted keys, one node or list of numbers per line."""
    text = json.dumps(content, indent=1, sort_keys=True, allow_nan=False)
    return _SCALAR_LIST.sub(lambda m: "[" + ", ".join(part.strip() for part in m.group(1).split(",")) + "]", text) + "\n"


_SCALAR_LIST = re.compile(r"\[\s+([^\[\]{}\"]*?)\s+\]")
