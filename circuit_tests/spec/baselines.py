"""Stored baselines: per spec, one reviewable JSON file of each model's circuit and metrics.

``specs/sva_simple.yaml`` keeps its baseline in ``specs/sva_simple.baseline.json``::

    {"models": {"smollm2-135m-instruct": {"circuit": [[layer, position, neuron, score], ...],
                                          "align": "end", "machine": {...}, "metrics": {...},
                                          "revision": "..."}},
     "spec": "sva-simple", "version": 1}

Like syrupy's session, a :class:`BaselineStore` reads files lazily, collects updates during the
run and writes once at the end (under pytest-xdist, workers hand their updates to the controller,
which alone writes). A write takes a file lock, re-reads the file, merges the run's models into it
(so two runs that each updated some models both keep their entries), and replaces the file
atomically, keeping its permissions: a killed writer leaves the old file intact. A file that
cannot be read is never overwritten; it is reported with how to recover it. That includes a file
of another ``version``, a key given twice (two entries for one model), and a circuit that lists a
node twice or a node outside the ``shape`` stored beside it. :func:`entry_for` is the format of
one model's entry.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from contextlib import suppress
from pathlib import Path
from typing import Annotated, Literal

import torch
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, ValidationInfo, field_validator

import circuit_tests
from circuit_tests.analysis.attribution import ALIGNMENTS
from circuit_tests.errors import SpecError
from circuit_tests.files import BASELINE_LIMIT, UnreadableInput, parse_json, read_text, replace_atomically, resolved, reviewable_json
from circuit_tests.model.loading import cache_dir
from circuit_tests.spec.circuit_file import Row, Shape, check_rows, known_version
from circuit_tests.spec.schema import ModelName, Spec, Stable
from circuit_tests.spec.subject import Subject
from circuit_tests.text import printable

VERSION = 1
BASELINE_NODES = 100  # nodes of the circuit stored in a baseline, at least
class _Metrics(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    faithfulness: dict[str, StrictFloat]
    nodes_for_08: Annotated[StrictFloat, Field(ge=1)] | None = Field(None, alias="nodes_for_0.8")  # what `stable` compares by default


class _Entry(BaseModel):
    """What ``stable`` reads from a model's entry; other keys (revision, machine, metrics) are kept as they are."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    shape: Shape | None = None
    metrics: _Metrics
    circuit: list[Row] = Field(min_length=1)
    align: Literal[ALIGNMENTS] = "start"  # how its positions count (trace.align); entries before 0.2 have none: start

    @field_validator("circuit")
    @classmethod
    def _nodes(cls, rows: list[Row], info: ValidationInfo) -> list[Row]:
        return check_rows(rows, info.data.get("shape"))


class _File(BaseModel):
    model_config = ConfigDict(extra="allow")

    models: dict[ModelName, _Entry]
    version: Annotated[StrictInt, known_version(VERSION)]  # after models: a damaged entry is the first problem named


def entry_for(subject: Subject, spec: Spec | None = None) -> dict:
    """What ``--circuit-update`` stores for one (spec, model): the circuit and the key metrics, rounded. The
    circuit reaches the largest size a ``stable`` claim of ``spec`` (default: the subject's) compares. Nothing is
    recorded where the model does not do the task, or where faithfulness is undefined: that circuit would be noise."""
    if not subject.behaviour.present or not subject.separated:
        why = (f"it does not do the task ({subject.behaviour})" if not subject.behaviour.present else
               f"its logit difference with nothing ablated minus that with every node ablated, {subject.figures.separation[0]:.3f}"
               f" (95% CI {subject.figures.separation[1]:.3f} to {subject.figures.separation[2]:.3f}), includes 0, so "
               "faithfulness is undefined")
        raise SpecError(f"{baseline_path(subject.spec.path)}: no baseline recorded for {subject.loaded.ref.name}: {why}. A "
                        "circuit recorded there would be noise; record one from a checkpoint that does the task.")
    _ = subject.accuracy, subject.curve, subject.flip_rate(30), subject.flip_rate(100)  # what a baseline records
    faithful = subject.figures.nodes_for_08  # the size a `stable` without `nodes` compares
    sizes = [e.params.nodes or faithful or 0 for e in (spec or subject.spec).expectations
             if isinstance(e.params, Stable)]
    figures = _rounded(subject.figures.to_json())
    metrics = {key: figures[key] for key in ("accuracy", "n_test", "nodes_for_0.8", "flip_rate")}
    faithfulness = dict(zip(map(str, figures["curve"]["sizes"]), figures["curve"]["faithfulness"]))
    if faithful is not None:
        faithfulness[str(faithful)] = _rounded(subject.faithfulness_at(faithful))
    return {
        "revision": figures["revision"],
        "shape": subject.shape,
        "machine": {"device": figures["device"], "dtype": figures["dtype"], "torch": str(torch.__version__),
                    "circuit_tests": circuit_tests.__version__, "method": subject.spec.trace.method},
        "metrics": metrics | {"faithfulness": faithfulness},
        "align": subject.spec.trace.align,
        "circuit": [[*node, round(score, 8)] for node, score in subject.ranked(max([*sizes, BASELINE_NODES]))],
    }


def model_key(subject: Subject) -> str:
    """The name a model's entry has in the spec's baseline file: a checkpoint directory or ``.gguf`` file
    as the spec lists it, else by its path from the spec's directory (as the spec would list it, however
    the command line spelled it); any other model by its name."""
    ref, spec = subject.loaded.ref, subject.spec
    if ref.kind not in ("local", "gguf"):
        return ref.name
    here = Path(ref.location)
    listed = [name for name in spec.models if name == ref.name or resolved(spec.path.parent / name) == here]
    return listed[0] if listed else Path(os.path.relpath(here, spec.path.parent)).as_posix()


def _rounded(value: object, digits: int = 6) -> object:
    """Floats rounded so that stored baselines change only when a measurement does."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: _rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item, digits) for item in value]
    return value


def baseline_path(spec_path: Path) -> Path:
    """``specs/x.yaml`` -> ``specs/x.baseline.json``."""
    return spec_path.with_name(spec_path.name.rsplit(".", 1)[0] + ".baseline.json")


def read_baseline(path: Path) -> dict:
    """A baseline file's content (empty when there is none); a damaged or hostile file is a clear error.

    The file must be a regular file beside its spec (a link out of the directory, a FIFO or a device
    is refused), at most :data:`~circuit_tests.files.BASELINE_LIMIT` bytes, of the shape above.
    """
    if not path.exists() and not path.is_symlink():
        return {"models": {}}
    try:
        content = parse_json(read_text(path, [path.parent], BASELINE_LIMIT), path, parse_constant=_no_constant)
        _File.model_validate(content)
        return content
    except (UnreadableInput, ValueError) as error:
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
    return printable(str(error), one_line=True)


def write_baseline(path: Path, spec_name: str, models: dict[str, dict]) -> None:
    """Merge ``models`` into the file under a lock and replace it atomically, keeping its permissions."""
    lock = cache_dir() / "locks" / (hashlib.sha256(str(resolved(path) or path.absolute()).encode()).hexdigest()[:16] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        _remove_stale_temporaries(path)  # every writer of this file holds the lock: a temporary now is a killed writer's
        content = read_baseline(path)
        merged = {"spec": spec_name, "version": VERSION, "models": {**content["models"], **models}}
        replace_atomically(path, lambda temporary: temporary.write_text(reviewable_json(merged), encoding="utf-8"))


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries of killed writers: ``.NAME.*.tmp``, and ``NAME*.tmp`` as earlier versions named them."""
    for stale in [*path.parent.glob(f".{glob.escape(path.name)}.*.tmp"), *path.parent.glob(f"{glob.escape(path.name)}*.tmp")]:
        if stale.is_file() and not stale.is_symlink():
            stale.unlink()


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

    def copy_for(self, spec: Spec) -> dict[Path, dict | SpecError]:
        """The spec's baseline file as this store read it (or the error reading it gave), for a store on another
        machine (:meth:`preload`): a Ray actor compares with the client's file, not with its node's."""
        with suppress(SpecError):
            self.stored(spec.path)
        path = baseline_path(spec.path)
        return {path: self._read[path]}

    def preload(self, copied: dict[Path, dict | SpecError]) -> None:
        """Take files another store read (:meth:`copy_for`) as read."""
        self._read.update(copied)

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
        _, models = self._pending.setdefault(baseline_path(spec.path), (spec.name, {}))
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
