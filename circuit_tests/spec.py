"""YAML circuit specs: what to test, on which models, with which data.

A spec is read with ``yaml.safe_load`` and checked field by field; every problem is a
:class:`~circuit_tests.errors.SpecError` naming the file, the field and the fix. Example::

    name: sva-early-layers
    description: Grammatical number is written into early MLP neurons at the subject.
    models: [smollm2-135m-instruct]
    task:
      dataset: ../fixtures/sva/smoke.jsonl      # or: examples: [{clean_prefix: ..., ...}]
    expect:
      - behaves: {min_accuracy: 1.0}
      - pinned: {layers: [0, 9], position: -1, min_flip_rate: 1.0}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from circuit_tests.data import PairedExample, parse_example, read_jsonl
from circuit_tests.errors import SpecError

TOP_LEVEL = {"name", "description", "models", "task", "expect"}
TASK_FIELDS = {"dataset", "examples"}
EXPECTATIONS: dict[str, set[str]] = {
    "behaves": {"min_accuracy"},
    "pinned": {"layers", "neurons", "position", "min_flip_rate"},
}


@dataclass(frozen=True)
class Expectation:
    """One claim about a model, e.g. ``behaves: {min_accuracy: 0.9}``."""

    kind: str
    params: dict[str, Any]
    index: int  # position in the spec's ``expect`` list


@dataclass(frozen=True)
class Spec:
    """A parsed, checked circuit spec."""

    path: Path
    name: str
    description: str
    models: tuple[str, ...]
    examples: tuple[PairedExample, ...]
    expectations: tuple[Expectation, ...]


def load_spec(path: Path) -> Spec:
    """Read and check a spec file."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML ({_first_line(error)}). Fix the syntax at the line shown.") from None
    where = _Where(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a mapping with keys {', '.join(sorted(TOP_LEVEL))}.")
    where.no_unknown(raw, TOP_LEVEL, "the top level")
    return Spec(
        path=path,
        name=where.string(raw, "name"),
        description=str(raw.get("description", "")),
        models=tuple(where.string_list(raw, "models")),
        examples=tuple(_examples(where, raw.get("task"))),
        expectations=tuple(_expectations(where, raw.get("expect"))),
    )


def _examples(where: _Where, task: object) -> list[PairedExample]:
    if not isinstance(task, dict) or not (TASK_FIELDS & task.keys()):
        raise SpecError(f"{where.path}: field 'task' needs 'dataset' (a JSON-lines file) or 'examples' (a list).")
    where.no_unknown(task, TASK_FIELDS, "'task'")
    if "dataset" in task:
        dataset = where.path.parent / where.string(task, "dataset", "task.dataset")
        if not dataset.is_file():
            raise SpecError(
                f"{where.path}: field 'task.dataset' names {dataset}, which does not exist. "
                "Fix the path; it is relative to the spec file."
            )
        return read_jsonl(dataset)
    if not isinstance(task["examples"], list) or not task["examples"]:
        raise SpecError(f"{where.path}: field 'task.examples' must be a non-empty list of examples.")
    return [parse_example(record, f"{where.path}: task.examples[{i}]") for i, record in enumerate(task["examples"])]


def _expectations(where: _Where, expect: object) -> list[Expectation]:
    if not isinstance(expect, list) or not expect:
        raise SpecError(f"{where.path}: field 'expect' must be a non-empty list, e.g. '- behaves: {{min_accuracy: 0.9}}'.")
    parsed = []
    for index, entry in enumerate(expect):
        field = f"expect[{index}]"
        if not isinstance(entry, dict) or len(entry) != 1:
            raise SpecError(f"{where.path}: field '{field}' must be one mapping such as 'behaves: {{min_accuracy: 0.9}}'.")
        (kind, params), = entry.items()
        if kind not in EXPECTATIONS:
            raise SpecError(f"{where.path}: field '{field}' has unknown kind {kind!r}; known kinds: {', '.join(EXPECTATIONS)}.")
        if not isinstance(params, dict):
            raise SpecError(f"{where.path}: field '{field}.{kind}' must be a mapping of parameters.")
        where.no_unknown(params, EXPECTATIONS[kind], f"'{field}.{kind}'")
        parsed.append(Expectation(kind, params, index))
    return parsed


@dataclass(frozen=True)
class _Where:
    """Field checks that name the spec file in their errors."""

    path: Path

    def no_unknown(self, mapping: dict, allowed: set[str], place: str) -> None:
        unknown = sorted(set(mapping) - allowed)
        if unknown:
            raise SpecError(f"{self.path}: unknown key(s) {', '.join(unknown)} in {place}; allowed: {', '.join(sorted(allowed))}.")

    def string(self, mapping: dict, key: str, field: str | None = None) -> str:
        value = mapping.get(key)
        if not isinstance(value, str) or not value:
            raise SpecError(f"{self.path}: field '{field or key}' must be a non-empty string, got {value!r}.")
        return value

    def string_list(self, mapping: dict, key: str) -> list[str]:
        value = mapping.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise SpecError(f"{self.path}: field '{key}' must be a non-empty list of model names, e.g. [smollm2-135m-instruct].")
        return value


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())
