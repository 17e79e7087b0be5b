"""Edges between a circuit's nodes, and the circuit as a graph with clusters of nodes.

The edge from a node ``u`` to a node ``d`` of a later layer estimates how far ``d``'s activation moves
when ``u`` alone moves from its clean value to its baseline value (the counterfactual prompt's, by
default): ``grad_u a_d * (a'_u - a_u)``, with the rules of the trace's method in the backward pass
(RelP's for ``relp``, none for ``atp``), exactly as node scores estimate the metric's change.
:func:`edge_weights` takes one forward pass with gradients per batch and one backward pass per
downstream node; :func:`exact_edge_weights` patches each upstream node alone, the ground truth that
the estimate is tested against.

Nodes are grouped by their edge pattern (:func:`cluster`): each node's outgoing and incoming edges,
as one unit vector, and average-linkage merging by cosine similarity. A cluster is labelled by its
layers and the tokens its members' cards promote most often.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from circuit_tests.analysis.attribution import AttributionOptions, baseline_values, mean_baseline, neuron_values
from circuit_tests.analysis.cards import Card
from circuit_tests.analysis.relp import relp_rules
from circuit_tests.model.data import PairedBatch, Tokenized
from circuit_tests.model.interventions import intervene, patch
from circuit_tests.model.nodes import Circuit, Node, every_if_none, format_node, in_prompt
from circuit_tests.model.sites import NeuronSites, capture, next_token_logits
from circuit_tests.progress import bar
from circuit_tests.text import quoted

CLUSTERS = 4


@dataclass(frozen=True)
class Graph:
    """A circuit's nodes (as cards, in circuit order), the edges between them, and clusters of nodes."""

    cards: tuple[Card, ...]
    weights: torch.Tensor  # [nodes, nodes]: weights[i, j] is the edge from node i to node j (0: none)
    clusters: tuple[int, ...]  # per node, its cluster
    labels: tuple[str, ...]  # per cluster

    def edges(self, limit: int | None = None) -> list[tuple[int, int, float]]:
        """(source, target, weight) of the non-zero edges, strongest first."""
        found = [(i, j, float(w)) for (i, j), w in zip(self.weights.nonzero().tolist(), self.weights[self.weights != 0])]
        return sorted(found, key=lambda edge: (-abs(edge[2]), edge[0], edge[1]))[:limit]

    def to_json(self) -> dict:
        """Nodes with their cards and clusters, edges by node name, clusters with labels: what other tools read."""
        names = [format_node(card.node) for card in self.cards]
        return {
            "nodes": [card.to_json() | {"cluster": cluster} for card, cluster in zip(self.cards, self.clusters)],
            "edges": [{"source": names[i], "target": names[j], "weight": w} for i, j, w in self.edges()],
            "clusters": [{"id": c, "label": label, "members": [n for n, k in zip(names, self.clusters) if k == c]}
                         for c, label in enumerate(self.labels)],
        }


def _reaches(batch: PairedBatch, node: Node) -> bool:
    return in_prompt(node[1], batch.n_positions)


def edge_weights(sites: NeuronSites, data: Tokenized, nodes: Sequence[Node], options: AttributionOptions = AttributionOptions()
                 ) -> torch.Tensor:
    """``[nodes, nodes]`` mean gradient-times-delta edge estimates over ``data`` (see the module docstring)."""
    total = torch.zeros(len(nodes), len(nodes), dtype=torch.float64)
    mean = mean_baseline(sites, data.batches) if options.baseline == "mean" else None
    for batch in data.batches:
        batch = batch.to(sites.device)
        baseline = baseline_values(sites, batch, options.baseline, mean)
        with relp_rules(sites, options.rules()), capture(sites, grad=True) as acts:
            next_token_logits(sites.model, batch.clean_ids)
        for j, (layer, position, neuron) in enumerate(bar(nodes, "edges", unit="node")):
            sources = [i for i, node in enumerate(nodes) if node[0] < layer and _reaches(batch, node)]
            if not sources or not _reaches(batch, nodes[j]):
                continue
            layers = sorted({nodes[i][0] for i in sources})
            target = acts[layer][:, every_if_none(position), neuron].sum()
            grads = dict(zip(layers, torch.autograd.grad(target, [acts[k] for k in layers], retain_graph=True, allow_unused=True)))
            for i in sources:
                source_layer, source_position, source_neuron = nodes[i]
                grad = grads[source_layer]
                if grad is not None:
                    at = (slice(None), every_if_none(source_position), source_neuron)
                    delta = baseline[source_layer][at].to(grad.device) - acts[source_layer][at].detach()
                    total[i, j] += (grad[at] * delta).sum(dtype=torch.float64).cpu()
    return (total / data.n_examples).float()


@torch.no_grad()
def exact_edge_weights(sites: NeuronSites, data: Tokenized, nodes: Sequence[Node], baseline: str = "counterfactual") -> torch.Tensor:
    """``[nodes, nodes]``: the mean change of each later node's activation when each node alone takes its baseline value."""
    total = torch.zeros(len(nodes), len(nodes), dtype=torch.float64)
    mean = mean_baseline(sites, data.batches) if baseline == "mean" else None
    for batch in data.batches:
        batch = batch.to(sites.device)
        values, clean = baseline_values(sites, batch, baseline, mean), neuron_values(sites, batch.clean_ids)
        for i, source in enumerate(bar(nodes, "exact edges", unit="node")):
            if not _reaches(batch, source):
                continue
            with intervene(sites, [patch(Circuit.of([source]), values)]), capture(sites) as moved:
                next_token_logits(sites.model, batch.clean_ids)
            for j, (layer, position, neuron) in enumerate(nodes):
                if layer > source[0] and _reaches(batch, nodes[j]):
                    at = (slice(None), every_if_none(position), neuron)
                    total[i, j] += (moved[layer][at] - clean[layer][at]).sum(dtype=torch.float64).cpu()
    return (total / data.n_examples).float()


def cluster(weights: torch.Tensor, k: int = CLUSTERS) -> tuple[int, ...]:
    """Each node's cluster (0 first, numbered in order of first member), merging the most similar edge patterns first."""
    n = weights.shape[0]
    if n == 0:
        return ()
    pattern = torch.cat([weights, weights.T], 1).double()
    pattern = pattern / pattern.norm(dim=1, keepdim=True).clamp_min(1e-30)
    similarity = pattern @ pattern.T
    groups: list[list[int]] = [[i] for i in range(n)]
    while len(groups) > min(k, n):
        best = max(((a, b) for a in range(len(groups)) for b in range(a + 1, len(groups))),
                   key=lambda ab: (float(similarity[groups[ab[0]]][:, groups[ab[1]]].mean()), -ab[0], -ab[1]))
        groups[best[0]] += groups.pop(best[1])
    order = sorted(groups, key=min)
    found = [0] * n
    for index, members in enumerate(order):
        for member in members:
            found[member] = index
    return tuple(found)


def label(cards: Sequence[Card], shown: int = 2) -> str:
    """``L20-28: " are", " were"``: a cluster's layers and the tokens its members promote most often (their top 3)."""
    layers = sorted(card.node[0] for card in cards)
    span = f"L{layers[0]}" if layers[0] == layers[-1] else f"L{layers[0]}-{layers[-1]}"
    counts = Counter(token for card in cards for token, _ in card.promotes[:3])
    tokens = ", ".join(quoted(token) for token, _ in counts.most_common(shown))
    return f"{span}: {tokens}" if tokens else span


def circuit_graph(sites: NeuronSites, data: Tokenized, cards: Sequence[Card], options: AttributionOptions,
                  k: int = CLUSTERS) -> Graph:
    """The graph of the nodes ``cards`` describe: edges on ``data`` with ``options``' rules, then clusters and labels."""
    weights = edge_weights(sites, data, [card.node for card in cards], options)
    clusters = cluster(weights, k)
    labels = tuple(label([card for card, c in zip(cards, clusters) if c == index]) for index in range(max(clusters, default=-1) + 1))
    return Graph(tuple(cards), weights, clusters, labels)
