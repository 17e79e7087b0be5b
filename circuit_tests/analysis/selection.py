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


def top_k(scores: Scores, k: int, aggregate: bool = False, layers: Iterable[int] | None = None,
          signed: bool = False) -> Circuit:
    """The ``k`` nodes of largest |score| (``signed``: of largest signed score)."""
    return _circuit(scores.ranked(k, aggregate, layers, signed))


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
    """Two circuits' overlap, plain and weighted: the Jaccard overlap of their nodes, and the sum over
    nodes of the smaller of the two |score| shares over the sum of the larger (each circuit's
    weights divided by their total, so a circuit whose scores all doubled overlaps fully). The
    weighted overlap falls with a node's share: losing the strongest node counts most."""
    shares_a, shares_b = _shares(a), _shares(b)
    union = shares_a.keys() | shares_b.keys()
    if not union:
        return 1.0, 1.0
    jaccard = len(shares_a.keys() & shares_b.keys()) / len(union)
    low = sum(min(shares_a.get(n, 0.0), shares_b.get(n, 0.0)) for n in union)
    high = sum(max(shares_a.get(n, 0.0), shares_b.get(n, 0.0)) for n in union)
    return jaccard, low / high


def _shares(circuit: Circuit) -> dict[Node, float]:
    """Each node's share of the circuit's total weight (equal shares when every weight is 0)."""
    total = sum(circuit.weights)
    return {node: weight / total if total else 1 / len(circuit) for node, weight in zip(circuit.nodes, circuit.weights)}


def matched_random(circuit: Circuit, n_neurons: int, draws: int, seed: int) -> list[Circuit]:
    """``draws`` random circuits shaped like ``circuit``: as many nodes at each (layer, position) as it has, the neurons
    drawn without replacement with ``seed``. The null a circuit claim is compared with: a claim random neurons of the
    same layers and positions also satisfy is not a claim about these neurons."""
    cells: dict[tuple[int, int | None], int] = {}
    for layer, position, _ in circuit.nodes:
        cells[(layer, position)] = cells.get((layer, position), 0) + 1
    generator = torch.Generator().manual_seed(seed)
    return [Circuit.of((layer, position, int(neuron)) for (layer, position), count in cells.items()
                       for neuron in torch.randperm(n_neurons, generator=generator)[:count]) for _ in range(draws)]
