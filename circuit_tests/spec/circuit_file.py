"""Circuit files: a spec's traced circuit exported to a documented JSON file, and read back as a pinned circuit.

``circuit-tests export SPEC`` writes one (the format is documented in docs/circuit-format.md)::

    {"format": "circuit-tests/circuit", "version": 1,
     "spec": "sva-simple", "model": "smollm2-135m-instruct", "revision": "...",
     "shape": {"layers": 30, "neurons": 1536},
     "trace": {"method": "relp", "ablation": "mean", "align": "end", "nodes": "position", "split_seed": 0},
     "measured": {"nodes": 1000, "n_test": 50, "faithfulness": 1.02, "flip_rate": 0.96},
     "nodes": [[layer, position, neuron, score], ...]}

``nodes`` are strongest first. A position counts from the end of the prompt when negative, from its
first token otherwise, and is null in a trace by neuron (every position). ``measured`` is what the
whole exported circuit did on the spec's held-out split when it was written.

A spec pins such a file with ``pinned: {circuit: FILE, nodes: N, min_faithfulness: ...}``. The file
is read like a dataset: inside the project, bounded in size, and validated, so a hand-edited or
hostile file fails its spec with one paragraph naming the file, the field and the fix.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from circuit_tests.errors import SpecError
from circuit_tests.files import BASELINE_LIMIT, UnreadableInput, parse_json, read_text
from circuit_tests.model.nodes import Circuit, format_node

if TYPE_CHECKING:
    from circuit_tests.spec.subject import Subject

FORMAT, VERSION = "circuit-tests/circuit", 1
Index = Annotated[StrictInt, Field(ge=0)]  # strict: a string or a boolean in a stored circuit is an error, not a number
Row = tuple[Index, StrictInt | None, Index, StrictFloat]  # (layer, position, neuron, signed score): a stored circuit's node


class Shape(BaseModel):
    """The model's MLP neurons: ``layers`` x ``neurons``."""

    layers: Index
    neurons: Index


def _known(expected: int, version: int) -> int:
    if version != expected:
        raise PydanticCustomError("version", "version {version} is not one this circuit-tests reads (it reads {expected}); "
                                  "if a later circuit-tests wrote the file, upgrade", {"version": version, "expected": expected})
    return version


def known_version(expected: int) -> AfterValidator:
    """The check of a format's ``version`` field (a ``StrictInt``: not ``1.0``, not ``true``): ``expected``, else an
    error that says which versions this circuit-tests reads."""
    return AfterValidator(partial(_known, expected))


def check_rows(rows: list[Row], shape: Shape | None) -> list[Row]:
    """A stored circuit's rows, refused where a node is listed twice or lies outside the ``shape`` stored with them."""
    first: dict[tuple, int] = {}
    for index, (layer, position, neuron, _) in enumerate(rows):
        node = (layer, position, neuron)
        if shape is not None and (layer >= shape.layers or neuron >= shape.neurons):
            raise PydanticCustomError("node", "row {index}, node {node}, is outside the shape stored with it ({layers} layers "
                                      "x {neurons} neurons)", {"index": index, "node": format_node(node),
                                                               "layers": shape.layers, "neurons": shape.neurons})
        if node in first:
            raise PydanticCustomError("node", "rows {first} and {index} both list the node {node}; keep one",
                                      {"first": first[node], "index": index, "node": format_node(node)})
        first[node] = index
    return rows


class CircuitFile(BaseModel):
    """A circuit file as read: validated, unknown keys kept for later versions of the format."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    format: Literal[FORMAT]
    version: Annotated[StrictInt, known_version(VERSION)]
    spec: str = ""
    model: str = ""
    shape: Shape
    nodes: list[Row] = Field(min_length=1)

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, rows: list[Row], info: ValidationInfo) -> list[Row]:
        return check_rows(rows, info.data.get("shape"))

    def circuit(self, size: int | None = None) -> Circuit:
        """Its ``size`` strongest nodes (default: all), weighted by |score|."""
        rows = self.nodes[:size]
        return Circuit.of([row[:3] for row in rows], [abs(row[3]) for row in rows])


def circuit_json(subject: Subject, size: int) -> dict:
    """The circuit file of a subject's top ``size`` nodes, with what that circuit does on the held-out split."""
    circuit, figures = subject.circuit(size), subject.figures
    trace = subject.spec.trace
    return {
        "format": FORMAT, "version": VERSION, "spec": subject.spec.name, "model": figures.model, "revision": figures.revision,
        "shape": subject.shape,
        "trace": {"method": trace.method, "ablation": trace.ablation, "align": trace.align, "nodes": trace.nodes,
                  "split_seed": subject.spec.task.seed},
        "measured": {"nodes": len(circuit), "n_test": figures.n_test, "faithfulness": _rounded(subject.faithfulness_of(circuit).value),
                     "flip_rate": _rounded(subject.flip_rate_of(circuit).value)},
        "nodes": [[*node, round(score, 8)] for node, score in subject.ranked(size)],
    }


def _rounded(value: float) -> float | None:
    """Six decimals; None for a figure that is not a number (faithfulness where the metric does not move)."""
    return round(value, 6) if math.isfinite(value) else None


def read_circuit(path: Path, roots: list[Path] | None) -> CircuitFile:
    """A circuit file inside ``roots``, validated; :class:`SpecError` (naming the file and the fix) otherwise."""
    try:
        data = parse_json(read_text(path, roots, BASELINE_LIMIT), path)
    except UnreadableInput as error:
        raise SpecError(f"{error}. A circuit file is a JSON file inside the project, written by `circuit-tests export`: "
                        "export it again.") from None
    try:
        return CircuitFile.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, problem['loc'])) or 'the top level'}: {problem['msg']}"
                             for problem in error.errors(include_url=False)[:5])
        raise SpecError(f"{path} is not a circuit file of format {FORMAT!r} version {VERSION} ({problems}). Export it "
                        "again with `circuit-tests export`, or fix the fields named.") from None
