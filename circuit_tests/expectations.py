"""The claims a spec can make, each checked against one model into an :class:`Outcome`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from circuit_tests.circuits import accuracy, flip_rate
from circuit_tests.data import Tokenized, tokenize_pairs
from circuit_tests.errors import SpecError
from circuit_tests.interventions import NodeSet
from circuit_tests.models import LoadedModel
from circuit_tests.sites import NeuronSites
from circuit_tests.spec import Expectation, Spec


@dataclass(frozen=True)
class Outcome:
    """Whether an expectation held, and a sentence saying what was expected and measured."""

    passed: bool
    message: str


class Subject:
    """One spec on one loaded model: the neuron sites and the tokenised task, built once."""

    def __init__(self, spec: Spec, loaded: LoadedModel) -> None:
        self.spec = spec
        self.loaded = loaded
        self.sites = NeuronSites(loaded.model)
        self.data: Tokenized = tokenize_pairs(spec.examples, loaded.tokenizer)
        if not self.data.n_examples:
            raise SpecError(
                f"{spec.path}: all {len(self.data.dropped)} examples were dropped because their clean and "
                f"counterfactual prefixes tokenize to different lengths for {loaded.ref.name}."
            )


def check(subject: Subject, expectation: Expectation) -> Outcome:
    """Evaluate one expectation of the subject's spec."""
    return CHECKS[expectation.kind](subject, expectation.params)


def _behaves(subject: Subject, params: dict[str, Any]) -> Outcome:
    measured = accuracy(subject.sites, subject.data)
    floor = float(params["min_accuracy"])
    return Outcome(
        measured >= floor,
        f"accuracy {measured:.3f} on {subject.data.n_examples} examples; expected at least {floor:.3f}",
    )


def _pinned(subject: Subject, params: dict[str, Any]) -> Outcome:
    nodes = pinned_nodes(subject.sites, params)
    measured = flip_rate(subject.sites, subject.data, nodes)
    floor = float(params["min_flip_rate"])
    return Outcome(
        measured >= floor,
        f"patching {len(nodes)} pinned node group(s) from the counterfactual flips {measured:.3f} of "
        f"{subject.data.n_examples} examples; expected at least {floor:.3f}",
    )


def pinned_nodes(sites: NeuronSites, params: dict[str, Any]) -> NodeSet:
    """The nodes named by ``layers: [first, last]`` (every neuron) or ``neurons: [[layer, neuron], ...]``."""
    position = params.get("position")
    if "layers" in params:
        first, last = params["layers"]
        pairs = [(layer, None) for layer in range(first, last + 1)]
    else:
        pairs = [tuple(pair) for pair in params["neurons"]]
    for layer, neuron in pairs:
        if not 0 <= layer < sites.n_layers or (neuron is not None and not 0 <= neuron < sites.n_neurons):
            raise SpecError(
                f"pinned node (layer {layer}, neuron {neuron}) is outside this model's "
                f"{sites.n_layers} layers x {sites.n_neurons} neurons."
            )
    return NodeSet.of((layer, position, neuron) for layer, neuron in pairs)


CHECKS: dict[str, Callable[[Subject, dict[str, Any]], Outcome]] = {"behaves": _behaves, "pinned": _pinned}
