"""A first spec for a dataset: its claims, with thresholds copied from the SVA specs or measured.

``circuit-tests new`` writes :func:`spec_text`. With ``--measure`` the thresholds come from the
data on the chosen model (:func:`measured_claims`): each sits at the measured value's lower 95%
bootstrap bound less a margin (upper bound plus the margin for completeness), rounded away from
the measurement to two decimals, so the spec holds on that model and fails when the figure drops
below what the data could show by chance. Each line is commented with what was measured. A claim
whose threshold would not be a rate above 0 (for ``behaves``: above chance) is left out, with a
comment saying why, and so is a ``sparse`` or ``flips`` claim that random circuits of its shape
match (:data:`NULL`: those written must beat them). Data the model does at chance is refused
(:func:`refusal`): no claim about its circuit could mean anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from circuit_tests.analysis.stats import Measured
from circuit_tests.spec.figures import CHANCE
from circuit_tests.spec.subject import STANDARD_SIZES, Subject

DRAWS, MAX_P = 20, 0.05
NULL = f"{{draws: {DRAWS}, max_p: {MAX_P:g}}}"  # a new spec's circuit claims must beat random circuits of their shape
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
    floor: float = 0.0  # the threshold must lie above it: 0 for a rate, chance for an accuracy

    @property
    def usable(self) -> bool:
        return self.floor < self.value <= 1

    def comment(self) -> str:
        return f"measured {self.measured}"


def lower(measured: Measured, margin: float, floor: float = 0.0) -> Threshold:
    """The lower bound less ``margin``, rounded down to two decimals; usable above ``floor`` (never when undefined)."""
    return Threshold(measured, _rounded(measured.interval[0] - margin, math.floor), floor)


def upper(measured: Measured, margin: float) -> Threshold:
    """The upper bound plus ``margin``, rounded up to two decimals (never usable when undefined)."""
    return Threshold(measured, _rounded(measured.interval[1] + margin, math.ceil))


def _rounded(bound: float, direction) -> float:
    """``bound`` rounded to two decimals by ``direction`` (math.floor or math.ceil); NaN stays NaN (an undefined ratio)."""
    return direction(round(bound * 100, 6)) / 100 if math.isfinite(bound) else math.nan


def refusal(subject: Subject) -> str | None:
    """Why no spec can be written for this data on this model (it does not do the task), or None."""
    behaviour = subject.behaviour
    if behaviour.present:
        return None
    return (f"{subject.spec.task.dataset or 'the data'}: {subject.loaded.ref.name} does not do this task above chance on the "
            f"held-out split: {behaviour}. A spec on it would judge circuits of a behaviour the model does not have, so "
            "none is written. Give more or better pairs (each a choice the model makes reliably), or another model.")


def measured_claims(subject: Subject, margin: float) -> tuple[tuple[str, ...], str]:
    """The claims a subject's measurements support, and a note on how they were set (the behaviour must exist:
    :func:`refusal`)."""
    accuracy = subject.accuracy_measured()
    size = subject.nodes_for(0.8)
    note = (f"Thresholds measured on {subject.loaded.ref.name} ({subject.test.n_examples} held-out examples): the lower 95% "
            f"bound less {margin:g} (completeness: the upper bound plus {margin:g}).")
    stable = STABLE
    if size is None:  # stable's default size is the baseline's circuit reaching 0.8, and there is none: name one
        stable = STABLE.replace("stable: {", f"stable: {{nodes: {max(STANDARD_SIZES)}, ")
        size = max(STANDARD_SIZES)
        note += f"\nNo circuit of up to {size} nodes reached 0.8 faithfulness: the claims use {size} nodes."
    claims = [_claim("behaves", {"min_accuracy": lower(accuracy, margin, CHANCE)})]
    claims.append(_beating_random(subject, "faithfulness", size, _claim(
        "sparse", {"max_nodes": size, "min_faithfulness": lower(subject.faithfulness(size), margin), "vs_random": NULL})))
    claims.append(_claim("necessary", {"nodes": size, "max_completeness": upper(subject.completeness(size), margin)}))
    claims.append(_beating_random(subject, "flip rate", size, _claim(
        "flips", {"nodes": size, "min_flip_rate": lower(subject.flip_rate(size), margin), "vs_random": NULL})))
    return (*claims, stable), note + "\nEdit any threshold to state what the circuit must keep."


def _beating_random(subject: Subject, figure: str, size: int, claim: str) -> str:
    """``claim``, or a comment leaving it out when random circuits of its shape do as well (it would test nothing)."""
    if claim.startswith("#"):
        return claim
    null = subject.null(figure, size, DRAWS)
    if null.p <= MAX_P:
        return claim
    kind = claim.split(":", 1)[0]
    return (f"# {kind}: left out, {DRAWS} random circuits of its shape match its {figure} ({null.circuit:.3f}; random median "
            f"{sorted(null.draws)[DRAWS // 2]:.3f}, p = {null.p:.3f} > {MAX_P:g})")


def _claim(kind: str, fields: dict[str, int | str | Threshold]) -> str:
    """``kind: {field: value, ...}  # measured ...``, or a comment saying why the claim is left out."""
    thresholds = [value for value in fields.values() if isinstance(value, Threshold)]
    shown = ", ".join(f"{key}: {value.value if isinstance(value, Threshold) else value}" for key, value in fields.items())
    measured = "; ".join(threshold.comment() for threshold in thresholds)
    if any(math.isnan(threshold.value) for threshold in thresholds):
        return f"# {kind}: left out, its figure is undefined on this model ({measured}; docs/method.md)"
    if not all(threshold.usable for threshold in thresholds):
        floor = max(threshold.floor for threshold in thresholds)
        above = f"above chance ({floor:g})" if floor else "above 0"
        return f"# {kind}: left out, no threshold {above} and at most 1 holds ({measured})"
    return f"{kind}: {{{shown}}}  # {measured}"
