"""The claims a spec can make, each checked on a :class:`~circuit_tests.evaluation.Subject`.

A check returns an :class:`Outcome` that reads as a domain report: what was expected, what was
measured (with a 95% bootstrap interval over held-out examples), and details such as the
circuit size or, for ``stable``, the neurons that entered and left the circuit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from circuit_tests.baselines import BaselineStore, baseline_path
from circuit_tests.circuits import Circuit, bootstrap, faithfulness_curve, flip_rate, overlap
from circuit_tests.data import answer_token
from circuit_tests.errors import SpecError
from circuit_tests.evaluation import Interval, Subject
from circuit_tests.interventions import NodeSet
from circuit_tests.spec import Behaves, Expectation, Flips, Necessary, Pinned, Scales, Sparse, Stable, Steers


@dataclass(frozen=True)
class Outcome:
    """Whether an expectation held, and what was expected and measured."""

    passed: bool
    expected: str
    measured: str
    details: tuple[str, ...] = field(default=())
    figures: dict = field(default_factory=dict)  # extra numbers for the report, e.g. overlap with the baseline

    @property
    def message(self) -> str:
        lines = [f"expected: {self.expected}", f"measured: {self.measured}", *self.details]
        return "\n".join(lines)


def check(subject: Subject, expectation: Expectation, baselines: BaselineStore) -> Outcome:
    """Evaluate one expectation of the subject's spec."""
    params = expectation.params
    if isinstance(params, Stable):
        return _stable(subject, params, baselines)
    return CHECKS[type(params)](subject, params)


def _ci(value: float, interval: Interval) -> str:
    return f"{value:.3f} (95% CI {interval[0]:.3f} to {interval[1]:.3f})"


def _on_test(subject: Subject) -> str:
    return f"on {subject.test.n_examples} held-out examples"


def _behaves(subject: Subject, params: Behaves) -> Outcome:
    measured = subject.accuracy
    return Outcome(measured >= params.min_accuracy, f"accuracy >= {params.min_accuracy:.3f}",
                   f"accuracy {measured:.3f} {_on_test(subject)}")


def _sparse(subject: Subject, params: Sparse) -> Outcome:
    value, interval = subject.faithfulness(params.max_neurons)
    needed = subject.curve.nodes_for(params.min_faithfulness)
    return Outcome(
        value >= params.min_faithfulness,
        f"the top {params.max_neurons} nodes are >= {params.min_faithfulness:.2f} faithful ({subject.spec.trace.ablation} ablation)",
        f"faithfulness {_ci(value, interval)} {_on_test(subject)}",
        (f"faithfulness {params.min_faithfulness:.2f} needs " + (f"about {needed:.0f} nodes" if needed else
         f"more than {max(subject.curve.sizes)} nodes"),),
    )


def _necessary(subject: Subject, params: Necessary) -> Outcome:
    value, interval = subject.completeness(params.neurons)
    return Outcome(
        value <= params.max_completeness,
        f"with the top {params.neurons} nodes ablated, completeness <= {params.max_completeness:.2f}",
        f"completeness {_ci(value, interval)} {_on_test(subject)}",
    )


def _flips(subject: Subject, params: Flips) -> Outcome:
    value, interval = subject.flip_rate(params.neurons)
    return Outcome(
        value >= params.min_flip_rate,
        f"patching the top {params.neurons} nodes from the counterfactual flips >= {params.min_flip_rate:.2f} of answers",
        f"flip rate {_ci(value, interval)} {_on_test(subject)}",
    )


def _pinned(subject: Subject, params: Pinned) -> Outcome:
    nodes = pinned_nodes(subject, params)
    value = flip_rate(subject.sites, subject.test, nodes)
    what = f"layers {params.layers[0]}-{params.layers[1]}" if params.layers else f"{len(nodes)} pinned neurons"
    return Outcome(
        value >= params.min_flip_rate,
        f"patching {what} from the counterfactual flips >= {params.min_flip_rate:.2f} of answers",
        f"flip rate {value:.3f} {_on_test(subject)}",
    )


def pinned_nodes(subject: Subject, params: Pinned) -> NodeSet:
    """The nodes a ``pinned`` expectation names, checked against the model's shape."""
    if params.layers:
        pairs = [(layer, None) for layer in range(params.layers[0], params.layers[1] + 1)]
    else:
        pairs = list(params.neurons)
    _check_shape(subject, pairs)
    return NodeSet.of((layer, params.position, neuron) for layer, neuron in pairs)


def _check_shape(subject: Subject, pairs: list) -> None:
    sites = subject.sites
    for layer, neuron in pairs:
        if layer >= sites.n_layers or (neuron is not None and neuron >= sites.n_neurons):
            raise SpecError(
                f"{subject.spec.path}: neuron (layer {layer}, neuron {neuron}) is outside {subject.loaded.ref.name}'s "
                f"{sites.n_layers} layers x {sites.n_neurons} neurons. Fix the neuron list, or run this spec "
                "only on the model it was written for."
            )


def _steers(subject: Subject, params: Steers) -> Outcome:
    if isinstance(params.neurons, int):
        circuit = Circuit(subject.top_neurons.nodes[: params.neurons], subject.top_neurons.weights[: params.neurons])
        what = f"the top {params.neurons} neurons"
    else:
        _check_shape(subject, list(params.neurons))
        circuit = Circuit.from_neurons(params.neurons)
        what = f"{len(circuit)} listed neurons"
    value, interval = subject.steering(circuit)
    return Outcome(
        value >= params.min_success,
        f"patching {what} from the source prompt makes the source's answer the top token in >= {params.min_success:.2f} of prompts",
        f"success {_ci(value, interval)} {_on_test(subject)}",
    )


def _scales(subject: Subject, params: Scales) -> Outcome:
    _check_shape(subject, list(params.neurons))
    tokenizer, source = subject.loaded.tokenizer, f"{subject.spec.path}: scales"
    token = None if params.token is None else answer_token(tokenizer, params.token, source, "token")
    factors = tuple(params.factors)
    probabilities = subject.sweep(Circuit.from_neurons(params.neurons, params.position), factors, token)
    low = -math.inf if params.min_change is None else params.min_change
    high = math.inf if params.max_change is None else params.max_change
    steps = []
    for i, step in enumerate(probabilities[1:] - probabilities[:-1]):
        interval = bootstrap(lambda d: d.mean(), [step], seed=subject.spec.task.seed)
        steps.append((step.mean().item(), f"x{factors[i]:g} -> x{factors[i + 1]:g}: {_ci(step.mean().item(), interval)}"))
    bounds = [f"{word} {bound:+.3f}" for word, bound in (("at least", params.min_change), ("at most", params.max_change))
              if bound is not None]
    what = "P(clean answer)" if params.token is None else f"P({params.token!r})"
    at = "every position" if params.position is None else f"position {params.position}"
    return Outcome(
        all(low <= change <= high for change, _ in steps),
        f"scaling {len(params.neurons)} neurons at {at} by {', '.join(f'x{f:g}' for f in factors)} changes {what} "
        f"by {' and '.join(bounds)} at each step",
        "; ".join(text for _, text in steps) + f" {_on_test(subject)}",
        ("mean probability: " + ", ".join(f"x{f:g} {p.mean().item():.3f}" for f, p in zip(factors, probabilities)),),
    )


def _stable(subject: Subject, params: Stable, baselines: BaselineStore) -> Outcome:
    if baselines.update:
        return Outcome(True, "a baseline to compare with", f"recorded {subject.loaded.ref.name} (--circuit-update)")
    found = baselines.entry(subject.spec, subject.loaded.ref.name, params.model)
    if found is None:
        return Outcome(False, "a stored baseline", f"none for {subject.loaded.ref.name} in {baseline_path(subject.spec.path)}",
                       ("record one with `pytest --circuit-update` and commit the file",))
    name, entry = found
    if not _same_shape(subject, entry):
        return Outcome(False, f"a stored baseline for a model of {subject.loaded.ref.name}'s shape",
                       f"none for {subject.loaded.ref.name} in {baseline_path(subject.spec.path)}; {name}'s baseline is for "
                       "a model of another shape, so its circuit cannot be compared",
                       ("record one for this model with `pytest --circuit-update` (with `--circuit-model` if the spec does not list it)",))
    stored_nodes = [tuple(row[:3]) for row in entry["circuit"][: params.neurons]]
    stored = Circuit(tuple(stored_nodes), tuple(abs(row[3]) for row in entry["circuit"][: params.neurons]))
    current = subject.circuit(params.neurons)
    jaccard, _ = overlap(current, stored)
    then = entry["metrics"]["faithfulness"].get(str(params.neurons))
    now = faithfulness_curve(subject.sites, subject.test, stored, [len(stored)], subject.spec.trace.ablation,
                             subject.spec.task.seed).faithfulness[0]
    faithful_enough = then is None or now >= then - params.faithfulness_tolerance
    entered = sorted(set(current.nodes) - set(stored.nodes), key=current.nodes.index)
    left = sorted(set(stored.nodes) - set(current.nodes), key=stored.nodes.index)
    then_text = f"{then:.3f}" if then is not None else "not stored"
    return Outcome(
        jaccard >= params.min_overlap and faithful_enough,
        f"overlap with {name}'s baseline circuit ({params.neurons} nodes) >= {params.min_overlap:.2f}, and its "
        f"faithfulness within {params.faithfulness_tolerance:.2f} of the stored value",
        f"overlap {jaccard:.3f}; stored circuit's faithfulness now {now:.3f}, stored {then_text}",
        (f"entered ({len(entered)}): {_nodes(entered)}", f"left ({len(left)}): {_nodes(left)}"),
        {"overlap": jaccard, "baseline": name, "stored_circuit_faithfulness": now},
    )


def _same_shape(subject: Subject, entry: dict) -> bool:
    """Whether a stored circuit can be read on this model (entries written before shapes were stored: by range)."""
    if "shape" in entry:
        return entry["shape"] == subject.shape
    return all(layer < subject.sites.n_layers and neuron < subject.sites.n_neurons for layer, _, neuron, _ in entry["circuit"])


def _nodes(nodes: list, shown: int = 12) -> str:
    text = ", ".join(f"L{layer}/P{position}/N{neuron}" if position is not None else f"L{layer}/N{neuron}"
                     for layer, position, neuron in nodes[:shown])
    return text + (f", ... {len(nodes) - shown} more" if len(nodes) > shown else "") if nodes else "none"


CHECKS: dict[type, Callable] = {Behaves: _behaves, Sparse: _sparse, Necessary: _necessary, Flips: _flips,
                                Pinned: _pinned, Steers: _steers, Scales: _scales}
