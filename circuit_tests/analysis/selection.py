"""Choosing circuits from attribution scores, and comparing two circuits.

Every choice ranks nodes by |score| the one way :meth:`~circuit_tests.analysis.attribution.Scores.ranked`
does, and gives a :class:`~circuit_tests.model.nodes.Circuit` weighted by |score|
(docs/method.md section 4). ``aggregate`` ranks (layer, neuron) pairs by their score summed over
positions; ``layers`` keeps only some layers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from circuit_tests.analysis.attribution import Scores
from circuit_tests.model.nodes import Circuit, Node


def top_k(scores: Scores, k: int, aggregate: bool = False, layers: Iterable[int] | None = None) -> Circuit:
    """The ``k`` nodes of largest |score|."""
    return _circuit(scores.ranked(k, aggregate, layers))


def above(scores: Scores, threshold: float, aggregate: bool = False, layers: Iterable[int] | None = None) -> Circuit:
    """Every node with |score| above ``threshold``."""
    return _circuit([entry for entry in scores.ranked(None, aggregate, layers) if abs(entry[1]) > threshold])


def share(scores: Scores, fraction: float, aggregate: bool = False, layers: Iterable[int] | None = None) -> Circuit:
    """The fewest top nodes whose |score| adds up to ``fraction`` of the total |score|."""
    entries = scores.ranked(None, aggregate, layers)
    cumulative = torch.tensor([abs(score) for _, score in entries]).cumsum(0)
    count = int((cumulative < fraction * cumulative[-1]).sum()) + 1 if entries else 0
    return _circuit(entries[:count])


def _circuit(entries: list[tuple[Node, float]]) -> Circuit:
    return Circuit(tuple(node for node, _ in entries), tuple(abs(score) for _, score in entries))


def overlap(a: Circuit, b: Circuit) -> tuple[float, float]:
    """Jaccard overlap of two circuits' (layer, neuron) sets, plain and weighted by |score|."""
    weights_a, weights_b = _neuron_weights(a), _neuron_weights(b)
    union = weights_a.keys() | weights_b.keys()
    if not union:
        return 1.0, 1.0
    jaccard = len(weights_a.keys() & weights_b.keys()) / len(union)
    low = sum(min(weights_a.get(n, 0.0), weights_b.get(n, 0.0)) for n in union)
    high = sum(max(weights_a.get(n, 0.0), weights_b.get(n, 0.0)) for n in union)
    return jaccard, low / high if high else 1.0


def _neuron_weights(circuit: Circuit) -> dict[tuple[int, int | None], float]:
    weights: dict[tuple[int, int | None], float] = {}
    for (layer, _, neuron), weight in zip(circuit.nodes, circuit.weights):
        weights[(layer, neuron)] = weights.get((layer, neuron), 0.0) + weight
    return weights
