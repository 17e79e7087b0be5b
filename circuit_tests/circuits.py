"""Circuits: node sets chosen from attribution scores, and what they do when others are ablated.

A :class:`Circuit` is a set of (layer, position, neuron) nodes (``position`` may be ``None`` for
every position), usually the top of a :class:`~circuit_tests.attribution.Scores` ranking.
``shared/METHOD.md`` section 4 defines the measures, with ``F(X)`` the mean metric on held-out
examples when every neuron outside ``X`` is ablated:

- faithfulness ``(F(C) - F(empty)) / (F(M) - F(empty))``: the circuit alone reproduces the model;
- completeness ``(F(M \\ C) - F(empty)) / (F(M) - F(empty))``: near 0 when the circuit is necessary;
- flip rate: the share of examples whose preferred answer flips when the circuit's nodes take
  their counterfactual values.

Circuits of several sizes are evaluated together: each size is one copy of the batch, with its
own mask, in a single forward pass. Every measure runs chunks of at most ``batch_size`` examples
(times those copies) and makes ablation values chunk by chunk, so memory follows the batch size,
not the number of held-out examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from circuit_tests.attribution import Scores, neuron_values
from circuit_tests.data import PairedBatch, Tokenized
from circuit_tests.interventions import NodeSet
from circuit_tests.metrics import logit_diff, run
from circuit_tests.progress import bar
from circuit_tests.sites import NeuronSites, on_neurons

ABLATIONS = ("mean", "zero", "resample", "patch")
BATCH_SIZE = 32  # examples per forward pass, the default of a spec's task.batch_size


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Circuit:
    """Nodes with the |score| that selected them (weights for overlap), strongest first."""

    nodes: tuple[tuple[int, int | None, int | None], ...]
    weights: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.nodes)

    def node_set(self) -> NodeSet:
        return NodeSet(self.nodes)

    def neurons(self) -> set[tuple[int, int]]:
        """The (layer, neuron) pairs, positions dropped."""
        return {(layer, neuron) for layer, _, neuron in self.nodes}

    @classmethod
    def from_neurons(cls, neurons: Sequence[Sequence[int]], position: int | None = None) -> Circuit:
        """An explicit circuit of (layer, neuron) pairs at one position (``None``: every position)."""
        nodes = tuple((int(layer), position, int(neuron)) for layer, neuron in neurons)
        return cls(nodes, (1.0,) * len(nodes))


def ranked(scores: Scores, aggregate: bool = False, layers: range | None = None) -> list[tuple[tuple[int, int | None, int], float]]:
    """Every node (or every (layer, neuron) summed over positions) by decreasing |score|."""
    table = scores.by_neuron().unsqueeze(1) if aggregate else scores.scores
    if layers is not None:
        outside = torch.ones(table.shape[0], dtype=torch.bool)
        outside[list(layers)] = False
        table = table.masked_fill(outside.view(-1, 1, 1), 0.0)
    order = table.flatten().abs().argsort(descending=True, stable=True)
    order = order[table.flatten()[order] != 0]
    layer, position, neuron = torch.unravel_index(order, table.shape)
    return [
        ((int(l), None if aggregate else int(p), int(n)), float(table[l, p, n]))
        for l, p, n in zip(layer, position, neuron)
    ]


def _circuit(entries: list[tuple[tuple[int, int | None, int], float]]) -> Circuit:
    return Circuit(tuple(node for node, _ in entries), tuple(abs(score) for _, score in entries))


def top_k(scores: Scores, k: int, aggregate: bool = False, layers: range | None = None) -> Circuit:
    """The ``k`` nodes of largest |score|."""
    return _circuit(ranked(scores, aggregate, layers)[:k])


def above(scores: Scores, threshold: float, aggregate: bool = False, layers: range | None = None) -> Circuit:
    """Every node with |score| above ``threshold``."""
    return _circuit([entry for entry in ranked(scores, aggregate, layers) if abs(entry[1]) > threshold])


def share(scores: Scores, fraction: float, aggregate: bool = False, layers: range | None = None) -> Circuit:
    """The fewest top nodes whose |score| adds up to ``fraction`` of the total |score|."""
    entries = ranked(scores, aggregate, layers)
    cumulative = torch.tensor([abs(score) for _, score in entries]).cumsum(0)
    count = int((cumulative < fraction * cumulative[-1]).sum()) + 1 if entries else 0
    return _circuit(entries[:count])


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


def _neuron_weights(circuit: Circuit) -> dict[tuple[int, int], float]:
    weights: dict[tuple[int, int], float] = {}
    for (layer, _, neuron), weight in zip(circuit.nodes, circuit.weights):
        weights[(layer, neuron)] = weights.get((layer, neuron), 0.0) + weight
    return weights


# --------------------------------------------------------------------------- ablation values

Ablated = tuple[PairedBatch, list[torch.Tensor]]  # a chunk of examples and, per layer, the values that ablate it


def ablated_chunks(
    sites: NeuronSites, data: Tokenized, kind: str, seed: int = 0, batch_size: int = BATCH_SIZE
) -> Iterator[Ablated]:
    """Each chunk of at most ``batch_size`` examples of ``data``, in order, with its ablation values.

    The values are per layer ``[chunk, positions, neurons]``. ``mean``: the mean counterfactual
    activation per position over all examples of that length; ``zero``; ``resample``: the
    counterfactual activation of another example of the same length, drawn with ``seed``;
    ``patch``: the counterfactual activation of the same example. Values are made chunk by chunk
    (``mean`` after one pass over the counterfactuals), so memory follows ``batch_size``.
    """
    if kind not in ABLATIONS:
        raise ValueError(f"Unknown ablation {kind!r}; use one of {', '.join(ABLATIONS)}.")
    if kind == "zero":
        return ((chunk, _zeros(sites, chunk)) for chunk in data.chunks(batch_size))
    if kind == "mean":
        means = _mean_counterfactuals(sites, data, batch_size)
        return ((chunk, [m.expand(len(chunk), -1, -1) for m in means[chunk.n_positions]]) for chunk in data.chunks(batch_size))
    sources = _resampled_sources(data, seed) if kind == "resample" else [batch.patch_ids for batch in data.batches]
    return _counterfactual_chunks(sites, data, sources, batch_size)


def _zeros(sites: NeuronSites, chunk: PairedBatch) -> list[torch.Tensor]:
    shape = (len(chunk), chunk.n_positions, sites.n_neurons)
    return [torch.zeros(shape, dtype=sites.model.dtype, device=sites.layer_device(layer)) for layer in range(sites.n_layers)]


def _mean_counterfactuals(sites: NeuronSites, data: Tokenized, batch_size: int) -> dict[int, list[torch.Tensor]]:
    """Per token length, per layer, the ``[1, positions, neurons]`` mean counterfactual activation.

    One pass over the chunks, summing in float64 on each layer's device.
    """
    sums: dict[int, list[torch.Tensor]] = {}
    counts: dict[int, int] = {}
    for chunk in data.chunks(batch_size):
        length = chunk.n_positions
        totals = sums.setdefault(length, [
            torch.zeros(length, sites.n_neurons, dtype=torch.float64, device=sites.layer_device(layer))
            for layer in range(sites.n_layers)
        ])
        for total, values in zip(totals, neuron_values(sites, chunk.patch_ids.to(sites.device))):
            total += values.sum(0, dtype=torch.float64).to(total.device)
        counts[length] = counts.get(length, 0) + len(chunk)
    dtype = sites.model.dtype
    return {length: [(total / counts[length]).to(dtype).unsqueeze(0) for total in totals] for length, totals in sums.items()}


def _resampled_sources(data: Tokenized, seed: int) -> list[torch.Tensor]:
    """Per batch, the counterfactual token ids of examples of the same length, drawn with ``seed``."""
    pools: dict[int, list[torch.Tensor]] = {}
    for batch in data.batches:
        pools.setdefault(batch.n_positions, []).append(batch.patch_ids)
    pooled = {length: torch.cat(ids) for length, ids in pools.items()}
    generator = torch.Generator().manual_seed(seed)
    sources = []
    for batch in data.batches:
        pool = pooled[batch.n_positions]
        sources.append(pool[torch.randint(len(pool), (len(batch),), generator=generator)])
    return sources


def _counterfactual_chunks(
    sites: NeuronSites, data: Tokenized, sources: Sequence[torch.Tensor], batch_size: int
) -> Iterator[Ablated]:
    """Each chunk of ``data`` with the activations on the rows of ``sources`` (one ``[batch, positions]`` per batch)."""
    for batch, ids in zip(data.batches, sources):
        for start in range(0, len(batch), batch_size):
            rows = slice(start, start + batch_size)
            yield batch.rows(rows), neuron_values(sites, ids[rows].to(sites.device))


# --------------------------------------------------------------------------- masked runs


def node_ranks(sites: NeuronSites, circuit: Circuit, n_positions: int) -> torch.Tensor:
    """``[layers, positions, neurons]``: each node's rank in the circuit, ``len(circuit)`` outside it."""
    rank = torch.full((sites.n_layers, n_positions, sites.n_neurons), len(circuit), dtype=torch.long)
    # Strongest last, so that a node listed twice (or covered by a whole-layer entry) keeps its best rank.
    for index, (layer, position, neuron) in reversed(list(enumerate(circuit.nodes))):
        if position is None or -n_positions <= position < n_positions:
            rank[layer, _all_if_none(position), _all_if_none(neuron)] = index
    return rank


def node_ranks_by_length(sites: NeuronSites, circuit: Circuit, data: Tokenized) -> dict[int, torch.Tensor]:
    """Per token length in ``data``, the ``[1, layers, positions, neurons]`` :func:`node_ranks`."""
    lengths = {batch.n_positions for batch in data.batches}
    return {length: node_ranks(sites, circuit, length).unsqueeze(0) for length in lengths}


def _all_if_none(index: int | None) -> int | slice:
    return slice(None) if index is None else index


@torch.no_grad()
def masked_last_logits(
    sites: NeuronSites,
    batch: PairedBatch,
    chosen: torch.Tensor,
    inside: list[torch.Tensor] | None,
    outside: list[torch.Tensor] | None,
) -> torch.Tensor:
    """``[copies, batch, vocab]`` next-token logits on the clean prompts, one copy per mask in ``chosen``.

    ``chosen`` is ``[copies, layers, positions, neurons]`` (bool). In copy ``k``, chosen neurons
    take ``inside`` values and the others ``outside`` values; ``None`` keeps the model's own.
    """
    copies, b = chosen.shape[0], len(batch)

    def mix(layer: int, neurons: torch.Tensor) -> torch.Tensor:  # on the layer's device, which may be any shard
        neurons = neurons.view(copies, b, *neurons.shape[1:])
        mask = chosen[:, layer].unsqueeze(1).to(neurons.device)
        if inside is not None:
            neurons = torch.where(mask, inside[layer].to(neurons.device, neurons.dtype), neurons)
        if outside is not None:
            neurons = torch.where(mask, neurons, outside[layer].to(neurons.device, neurons.dtype))
        return neurons.reshape(copies * b, *neurons.shape[2:])

    with on_neurons(sites, mix):
        logits = run(sites.model, batch.clean_ids.to(sites.device).repeat(copies, 1))
    return logits.float().view(copies, b, -1)


def masked_logit_diffs(
    sites: NeuronSites,
    batch: PairedBatch,
    chosen: torch.Tensor,
    inside: list[torch.Tensor] | None,
    outside: list[torch.Tensor] | None,
) -> torch.Tensor:
    """``[copies, batch]`` clean logit differences under :func:`masked_last_logits`."""
    logits = masked_last_logits(sites, batch, chosen, inside, outside)
    copies = logits.shape[0]
    return logit_diff(logits.flatten(0, 1).unsqueeze(1), batch.repeat(copies)).view(copies, -1)


# --------------------------------------------------------------------------- measures


@dataclass(frozen=True)
class Curve:
    """Faithfulness and completeness of the top-``size`` circuits, with per-example values for bootstrapping."""

    sizes: tuple[int, ...]
    per_example: torch.Tensor  # [len(sizes) + 2, examples]: sizes..., then M (nothing ablated), then empty
    complement: torch.Tensor  # [len(sizes), examples]: only the circuit ablated

    @property
    def faithfulness(self) -> list[float]:
        return faithfulness_from(self.per_example[:-2], self.per_example[-2], self.per_example[-1]).tolist()

    @property
    def completeness(self) -> list[float]:
        return faithfulness_from(self.complement, self.per_example[-2], self.per_example[-1]).tolist()

    def nodes_for(self, target: float) -> float | None:
        """The smallest circuit size reaching ``target`` faithfulness, interpolated linearly in log size."""
        previous: tuple[int, float] | None = None
        for size, value in zip(self.sizes, self.faithfulness):
            if value >= target:
                if previous is None:
                    return float(size)
                small, below = previous
                t = (target - below) / (value - below)
                return math.exp(math.log(small) + t * (math.log(size) - math.log(small)))
            previous = (size, value)
        return None


def faithfulness_from(circuit: torch.Tensor, model: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """``(F(C) - F(empty)) / (F(M) - F(empty))`` from per-example metrics (means over the last dim)."""
    return (circuit.mean(-1) - empty.mean(-1)) / (model.mean(-1) - empty.mean(-1))


def faithfulness_curve(
    sites: NeuronSites,
    data: Tokenized,
    circuit: Circuit,
    sizes: Sequence[int],
    ablation: str = "mean",
    seed: int = 0,
    *,
    batch_size: int = BATCH_SIZE,
) -> Curve:
    """Faithfulness and completeness of the top ``sizes`` nodes of ``circuit`` on ``data``, batched over sizes."""
    ranks = node_ranks_by_length(sites, circuit, data)
    bounds = torch.tensor([*sizes, len(circuit) + 1, 0]).view(-1, 1, 1, 1)
    kept, removed = [], []
    chunks = ablated_chunks(sites, data, ablation, seed, batch_size)
    for batch, ablate in bar(chunks, "faithfulness curve", len(data.chunks(batch_size))):
        rank = ranks[batch.n_positions]
        kept.append(masked_logit_diffs(sites, batch, rank < bounds, None, ablate))
        removed.append(masked_logit_diffs(sites, batch, rank < bounds[: len(sizes)], ablate, None))
    return Curve(tuple(sizes), torch.cat(kept, 1).cpu(), torch.cat(removed, 1).cpu())


def flip_rates(
    sites: NeuronSites, data: Tokenized, circuit: Circuit, sizes: Sequence[int], *, batch_size: int = BATCH_SIZE
) -> torch.Tensor:
    """``[len(sizes), examples]``: whether each example flips when the top nodes take counterfactual values."""
    ranks = node_ranks_by_length(sites, circuit, data)
    bounds = torch.tensor(list(sizes)).view(-1, 1, 1, 1)
    flips = []
    chunks = ablated_chunks(sites, data, "patch", batch_size=batch_size)
    for batch, counterfactual in bar(chunks, "flip rates", len(data.chunks(batch_size))):
        flips.append(masked_logit_diffs(sites, batch, ranks[batch.n_positions] < bounds, counterfactual, None) < 0)
    return torch.cat(flips, 1).float().cpu()


@torch.no_grad()
def clean_logit_diffs(sites: NeuronSites, data: Tokenized, *, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """``logit(clean_answer) - logit(patch_answer)`` on every clean prompt."""
    device = sites.device
    return torch.cat([logit_diff(run(sites.model, chunk.clean_ids.to(device)), chunk) for chunk in data.chunks(batch_size)]).cpu()


def accuracy(sites: NeuronSites, data: Tokenized, *, batch_size: int = BATCH_SIZE) -> float:
    """Fraction of clean prompts on which the model prefers the clean answer."""
    return (clean_logit_diffs(sites, data, batch_size=batch_size) > 0).float().mean().item()


# --------------------------------------------------------------------------- uncertainty


def bootstrap(
    statistic: Callable[..., torch.Tensor | float],
    samples: Sequence[torch.Tensor], n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """A percentile confidence interval for ``statistic(*samples)``, resampling examples (the last dim) with ``seed``."""
    n = samples[0].shape[-1]
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(n, (n_resamples, n), generator=generator)
    values = torch.tensor([float(statistic(*(s[..., rows] for s in samples))) for rows in draws])
    tail = (1 - level) / 2
    return float(values.quantile(tail)), float(values.quantile(1 - tail))

