"""Stored baselines: per spec, one reviewable JSON file of each model's circuit and metrics.

``specs/sva_simple.yaml`` keeps its baseline in ``specs/sva_simple.baseline.json``::

    {"models": {"smollm2-135m-instruct": {"circuit": [[layer, position, neuron, score], ...],
                                          "machine": {...}, "metrics": {...}, "revision": "..."}},
     "spec": "sva-simple", "version": 1}

Like syrupy's session, a :class:`BaselineStore` reads files lazily, collects updates during the
run and writes once at the end. A write takes a file lock, re-reads the file, merges this
process's models into it (so pytest-xdist workers that each updated some models all keep their
entries), and replaces the file atomically: a killed writer leaves the old file intact. A file
that cannot be parsed is never overwritten; it is reported with how to recover it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from circuit_tests.errors import SpecError
from circuit_tests.models import cache_dir
from circuit_tests.spec import ModelName, Spec
from circuit_tests.untrusted import BASELINE_LIMIT, UnreadableInput, printable, read_text, resolved

VERSION = 1
Index = Annotated[int, Field(ge=0)]


class _Shape(BaseModel):
    layers: Index
    neurons: Index


class _Metrics(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    faithfulness: dict[str, float]


class _Entry(BaseModel):
    """What ``stable`` reads from a model's entry; other keys (revision, machine, metrics) are kept as they are."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    shape: _Shape | None = None
    metrics: _Metrics
    circuit: list[tuple[Index, Index | None, Index, float]] = Field(min_length=1)


class _File(BaseModel):
    model_config = ConfigDict(extra="allow")

    models: dict[ModelName, _Entry]


def baseline_path(spec_path: Path) -> Path:
    """``specs/x.yaml`` -> ``specs/x.baseline.json``."""
    return spec_path.with_name(spec_path.name.rsplit(".", 1)[0] + ".baseline.json")


def read_baseline(path: Path) -> dict:
    """A baseline file's content (empty when there is none); a damaged or hostile file is a clear error.

    The file must be a regular file beside its spec (a link out of the directory, a FIFO or a device
    is refused), at most :data:`~circuit_tests.untrusted.BASELINE_LIMIT` bytes, of the shape above.
    """
    if not path.exists() and not path.is_symlink():
        return {"models": {}}
    try:
        content = json.loads(read_text(path, [path.parent], BASELINE_LIMIT), parse_constant=_no_constant)
        _File.model_validate(content)
        return content
    except (UnreadableInput, ValueError, RecursionError) as error:
        raise SpecError(
            f"{path}: the stored baseline cannot be read ({_reason(error)}). It was left untouched: restore it from "
            "version control, or delete it and run `pytest --circuit-update` to record a new one."
        ) from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number a baseline can hold")


def _reason(error: Exception) -> str:
    if isinstance(error, ValidationError):
        first = error.errors(include_url=False)[0]
        where = ".".join(map(str, first["loc"])) or "the top level"
        more = f", and {error.error_count() - 1} more problems" if error.error_count() > 1 else ""
        return printable(f"field '{where}': {first['msg']}{more}", one_line=True)
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return printable(str(error), one_line=True)


def write_baseline(path: Path, spec_name: str, models: dict[str, dict]) -> None:
    """Merge ``models`` into the file under a lock and replace it atomically, keeping its permissions."""
    lock = cache_dir() / "locks" / (hashlib.sha256(str(resolved(path) or path.absolute()).encode()).hexdigest()[:16] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        _remove_stale_temporaries(path)  # every writer of this file holds the lock: a temporary now is a killed writer's
        content = read_baseline(path)
        merged = {"spec": spec_name, "version": VERSION, "models": {**content["models"], **models}}
        replace_atomically(path, lambda temporary: temporary.write_text(dumps(merged), encoding="utf-8"))


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


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries of killed writers: ``.NAME.*.tmp``, and ``NAME*.tmp`` as earlier versions named them."""
    for stale in [*path.parent.glob(f".{glob.escape(path.name)}.*.tmp"), *path.parent.glob(f"{glob.escape(path.name)}*.tmp")]:
        if stale.is_file() and not stale.is_symlink():
            stale.unlink()


def dumps(content: dict) -> str:
    """Stable, reviewable JSON: sorted keys, one node or list of numbers per line."""
    text = json.dumps(content, indent=1, sort_keys=True, allow_nan=False)
    return _SCALAR_LIST.sub(lambda m: "[" + ", ".join(part.strip() for part in m.group(1).split(",")) + "]", text) + "\n"


_SCALAR_LIST = re.compile(r"\[\s+([^\[\]{}\"]*?)\s+\]")


class BaselineStore:
    """What one pytest session (or one ``circuit-tests run``) reads and writes.

    Updates are kept until :meth:`flush`; under pytest-xdist, workers hand theirs to the
    controller (:meth:`pending`, :meth:`merge`), which alone writes.
    """

    def __init__(self, update: bool = False) -> None:
        self.update = update
        self._read: dict[Path, dict | SpecError] = {}
        self._pending: dict[Path, tuple[str, dict[str, dict]]] = {}

    def stored(self, spec_path: Path) -> dict[str, dict]:
        """Every model's stored entry for a spec, read once; a damaged file raises its error each time."""
        path = baseline_path(spec_path)
        if path not in self._read:
            try:
                self._read[path] = read_baseline(path)
            except SpecError as error:
                self._read[path] = error
        found = self._read[path]
        if isinstance(found, SpecError):
            raise found
        return found["models"]

    def entry(self, spec: Spec, model: str, preferred: str | None = None) -> tuple[str, dict] | None:
        """The stored entry for ``preferred`` if given, else for ``model``, else for the spec's first
        model (the reference a new checkpoint is compared with), and whose entry it is."""
        stored = self.stored(spec.path)
        for name in [preferred] if preferred else [model, spec.models[0]]:
            if name in stored:
                return name, stored[name]
        return None

    def record(self, spec: Spec, model: str, entry: dict) -> None:
        """Keep ``entry`` for the end of the run; a damaged file is reported now, on this spec's item."""
        self.stored(spec.path)
        name, models = self._pending.setdefault(baseline_path(spec.path), (spec.name, {}))
        models[model] = entry

    def pending(self) -> dict[str, tuple[str, dict[str, dict]]]:
        """The recorded entries, as plain JSON data a pytest-xdist worker sends to the controller."""
        return json.loads(json.dumps({str(path): entries for path, entries in self._pending.items()}))

    def merge(self, pending: dict[str, tuple[str, dict[str, dict]]]) -> None:
        """Add a worker's recorded entries (:meth:`pending`) to this store's."""
        for path, (name, models) in pending.items():
            self._pending.setdefault(Path(path), (name, {}))[1].update(models)

    def flush(self) -> tuple[list[Path], list[str]]:
        """Write every recorded entry: the files written, and errors for files that could not be."""
        written, errors = [], []
        for path, (name, models) in sorted(self._pending.items()):
            self._read.pop(path, None)  # read the file anew after this
            try:
                write_baseline(path, name, models)
                written.append(path)
            except SpecError as error:
                errors.append(str(error))
            except OSError as error:
                errors.append(f"{path}: {error.strerror or error}. Nothing was written; make the file and its directory writable.")
        self._pending = {}
        return written, errors

    def stale(self, spec: Spec) -> list[str]:
        """Models in the spec's baseline file that the spec no longer lists (none if the file cannot be read)."""
        try:
            return sorted(set(self.stored(spec.path)) - set(spec.models))
        except SpecError:
            return []
