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

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from circuit_tests.errors import SpecError
from circuit_tests.models import cache_dir
from circuit_tests.spec import Spec, load_spec

VERSION = 1


def baseline_path(spec_path: Path) -> Path:
    """``specs/x.yaml`` -> ``specs/x.baseline.json``."""
    return spec_path.with_name(spec_path.name.rsplit(".", 1)[0] + ".baseline.json")


def read_baseline(path: Path) -> dict:
    """A baseline file's content (empty when there is none); a damaged file is a clear error."""
    if not path.exists():
        return {"models": {}}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(content.get("models"), dict):
            raise ValueError("no 'models' mapping")
        return content
    except (ValueError, AttributeError) as error:
        raise SpecError(
            f"{path}: the stored baseline cannot be read ({error}). It was left untouched: restore it from "
            "version control, or delete it and run `pytest --circuit-update` to record a new one."
        ) from None


def write_baseline(path: Path, spec_name: str, models: dict[str, dict]) -> None:
    """Merge ``models`` into the file under a lock and replace it atomically."""
    lock = cache_dir() / "locks" / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        content = read_baseline(path)
        merged = {"spec": spec_name, "version": VERSION, "models": {**content["models"], **models}}
        replace_atomically(path, lambda temporary: temporary.write_text(dumps(merged), encoding="utf-8"))


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file beside ``path``, flush it to disk, then rename it over ``path``:
    readers see the old file or the new one, never a partial write, even if the writer is killed."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def dumps(content: dict) -> str:
    """Stable, reviewable JSON: sorted keys, one node or list of numbers per line."""
    text = json.dumps(content, indent=1, sort_keys=True)
    return _SCALAR_LIST.sub(lambda m: "[" + ", ".join(part.strip() for part in m.group(1).split(",")) + "]", text) + "\n"


_SCALAR_LIST = re.compile(r"\[\s+([^\[\]{}\"]*?)\s+\]")


class BaselineStore:
    """What one pytest session (or one ``circuit-tests run``) reads and writes."""

    def __init__(self, update: bool = False) -> None:
        self.update = update
        self._read: dict[Path, dict] = {}
        self._pending: dict[Path, tuple[str, dict[str, dict]]] = {}

    def entry(self, spec: Spec, model: str, preferred: str | None = None) -> tuple[str, dict] | None:
        """The stored entry for ``preferred`` if given, else for ``model``, else for the spec's first
        model (the reference a new checkpoint is compared with), and whose entry it is."""
        path = baseline_path(spec.path)
        if path not in self._read:
            self._read[path] = read_baseline(path)
        stored = self._read[path]["models"]
        for name in [preferred] if preferred else [model, spec.models[0]]:
            if name in stored:
                return name, stored[name]
        return None

    def record(self, spec: Spec, model: str, entry: dict) -> None:
        """Keep ``entry`` for the end of the run; a damaged file is reported now, on this spec's item."""
        path = baseline_path(spec.path)
        read_baseline(path)
        name, models = self._pending.setdefault(path, (spec.name, {}))
        models[model] = entry

    def flush(self) -> tuple[list[Path], list[str]]:
        """Write every recorded entry: the files written, and errors for files that could not be."""
        written, errors = [], []
        for path, (name, models) in sorted(self._pending.items()):
            try:
                write_baseline(path, name, models)
                written.append(path)
            except (SpecError, OSError) as error:
                errors.append(str(error))
        self._pending = {}
        return written, errors


def stale_entries(spec_path: Path) -> list[str]:
    """Models in a spec's baseline file that the spec no longer lists (nothing if either is unreadable)."""
    try:
        stored = read_baseline(baseline_path(spec_path))["models"]
        return sorted(set(stored) - set(load_spec(spec_path).models))
    except SpecError:
        return []
