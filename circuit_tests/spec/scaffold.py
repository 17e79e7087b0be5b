"""A first spec for a dataset: its claims, with thresholds copied from the SVA specs or measured.

``circuit-tests new`` writes :func:`spec_text`. With ``--measure`` the thresholds come from the
data on the chosen model (:func:`measured_claims`): each sits at the measured value's lower 95%
bootstrap bound less a margin (upper bound plus the margin for completeness), rounded away from
the measurement to two decimals, so the spec holds on that model and fails when the figure drops
below what the data could show by chance. Each line is commented with what was measured. A claim
whose threshold would not be a rate above 0 is left out, with a comment saying why. ``sparse`` and
``flips`` claims must also beat random circuits of their shape (:data:`NULL`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from circuit_tests.analysis.stats import Measured
from circuit_tests.spec.subject import STANDARD_SIZES, Subject

NULL = "{draws: 20, max_p: 0.05}"  # a new spec's circuit claims must beat random circuits of their shape
DEFAULT_CLAIMS = (
    "behaves: {min_accuracy: 0.9}",
    f"sparse: {{max_nodes: 100, min_faithfulness: 0.8, vs_random: {NULL}}}",
    "necessary: {nodes: 300, max_completeness: 0.2}",
    f"flips: {{nodes: 30, min_flip_rate: 0.9, vs_random: {NULL}}}",
    "stable: {min_overlap: 0.5, faithfulness_tolerance: 0.05, keep_top: 5}",
)
STABLE = DEFAULT_CLAIMS[-1] + "  # vs the baseline recorded with it"


def spec_text(name: str, model: str, dataset: str, claims: tuple[str, ...] = DEFAULT_CLAIMS, note: str = "") -> str:
    """The spec file: ``claims`` are the lines of its ``expect`` list (``kind: {...}  # comment``)."""
    return "\n".join([
        f"name: {name}",
        "description: >",
        "  What this circuit does, in a sentence.",
        f"models: [{json.dumps(model)}]",
        f"task: {{dataset: {json.dumps(dataset)}, test_fraction: 0.25, seed: 0}}",
        "trace: {method: relp, ablation: mean}",
        *([f"# {line}" for line in note.splitlines()] if note else []),
        "expect:",
        *[f"  {claim}" if claim.startswith("#") else f"  - {claim}" for claim in claims],
        "",
    ])


@dataclass(frozen=True)
class Threshold:
    """A measured figure and the threshold set from it: ``value`` is at the bound of ``measured`` less ``margin``."""

    measured: Measured
    value: float

    @property
    def usable(self) -> bool:
        return 0 < self.value <= 1

    def comment(self) -> str:
        return f"measured {self.measured}"


def lower(measured: Measured, margin: float) -> Threshold:
    """The lower bound less ``margin``, rounded down to two decimals."""
    return Threshold(measured, math.floor(round((measured.interval[0] - margin) * 100, 6)) / 100)


def upper(measured: Measured, margin: float) -> Threshold:
    """The upper bound plus ``margin``, rounded up to two decimals."""
    return Threshold(measured, math.ceil(round((measured.interval[1] + margin) * 100, 6)) / 100)


def measured_claims(subject: Subject, margin: float) -> tuple[tuple[str, ...], str]:
    """The claims a subject's measurements support, and a note on how they were set."""
    accuracy = subject.accuracy_measured()
    size = subject.nodes_for(0.8)
    note = (f"Thresholds measured on {subject.loaded.ref.name} ({subject.test.n_examples} held-out examples): the lower 95% "
            f"bound less {margin:g} (completeness: the upper bound plus {margin:g}).")
    stable = STABLE
    if size is None:  # stable's default size is the baseline's circuit reaching 0.8, and there is none: name one
        stable = STABLE.replace("stable: {", f"stable: {{nodes: {max(STANDARD_SIZES)}, ")
        size = max(STANDARD_SIZES)
        note += f"\nNo circuit of up to {size} nodes reached 0.8 faithfulness: the claims use {size} nodes."
    claims = [_claim("behaves", {"min_accuracy": lower(accuracy, margin)})]
    claims.append(_claim("sparse", {"max_nodes": size, "min_faithfulness": lower(subject.faithfulness(size), margin),
                                    "vs_random": NULL}))
    claims.append(_claim("necessary", {"nodes": size, "max_completeness": upper(subject.completeness(size), margin)}))
    claims.append(_claim("flips", {"nodes": size, "min_flip_rate": lower(subject.flip_rate(size), margin), "vs_random": NULL}))
    return (*claims, stable), note + "\nEdit any threshold to state what the circuit must keep."


def _claim(kind: str, fields: dict[str, int | str | Threshold]) -> str:
    """``kind: {field: value, ...}  # measured ...``, or a comment saying why the claim is left out."""
    thresholds = [value for value in fields.values() if isinstance(value, Threshold)]
    shown = ", ".join(f"{key}: {value.value if isinstance(value, Threshold) else value}" for key, value in fields.items())
    measured = "; ".join(threshold.comment() for threshold in thresholds)
    if not all(threshold.usable for threshold in thresholds):
        return f"# {kind}: left out, no threshold above 0 and at most 1 holds ({measured})"
    return f"{kind}: {{{shown}}}  # {measured}"
