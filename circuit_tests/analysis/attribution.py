"""Attribution: score every MLP neuron node by its effect on a metric when patched.

A node is (layer, position, neuron). Its score estimates ``m(a -> a') - m(a)``, the change in
the metric ``m`` when the node moves from its clean value ``a`` to a baseline value ``a'``
(the counterfactual prompt's value, zero, or a mean). Methods:

- ``atp``: attribution patching, ``grad_a m * (a' - a)``;
- ``relp`` (default): the same with the LRP rules of :mod:`circuit_tests.analysis.relp` in the backward;
- ``ig``: integrated gradients, a left Riemann sum over ``steps`` points between ``a`` and ``a'``,
  one layer interpolated at a time as in Marks et al. (one pass per layer over ``steps`` copies);
- ``exact``: real activation patching of each candidate node, the ground truth.

``atp`` and ``relp`` take two forward passes and one backward pass per batch for every node of
every layer at once. Scores are summed over examples as batches go, so memory holds one
``[layers, positions, neurons]`` accumulator, never per-example copies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import circuit_tests
from circuit_tests.analysis.metrics import METRICS, Metric
from circuit_tests.analysis.relp import RelPRules, relp_rules
from circuit_tests.errors import SpecError
from circuit_tests.model.data import PairedBatch, PairedExample, Tokenized, tokenize_pairs
from circuit_tests.model.loading import LoadedModel
from circuit_tests.model.nodes import Node, in_prompt
from circuit_tests.model.sites import NeuronSites, capture, copies_from, next_token_logits, on_neurons
from circuit_tests.progress import bar

METHODS = ("relp", "atp", "ig", "exact")
TRACE_METHODS = ("relp", "atp", "ig")  # the methods that score every node; "exact" scores given candidates
BASELINES = ("counterfactual", "zero", "mean")
ALIGNMENTS = ("end", "start")  # positions named from the end (-1: the last token) or from the start (0: the first)


@dataclass(frozen=True)
class AttributionOptions:
    """How to attribute: method, RelP rule variants, IG steps, baseline and metric."""

    method: str = "relp"
    steps: int = 10  # ig only
    half_rule: bool = True  # relp only: the rules below are RelP's, named so a deviation says so
    norm_rule: bool = True  # relp only
    activation_rule: bool = True  # relp only
    detach_attention: bool = False  # relp only
    baseline: str = "counterfactual"
    metric: str = "logit_diff"
    align: str = "end"  # how prompts of several lengths line up: at their last tokens, or their first (ALIGNMENTS)

    def __post_init__(self) -> None:
        for name, value, allowed in (("method", self.method, METHODS), ("baseline", self.baseline, BASELINES),
                                     ("align", self.align, ALIGNMENTS)):
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}; use one of {', '.join(allowed)}.")
        if self.metric not in METRICS:
            raise ValueError(f"Unknown metric {self.metric!r}; use one of {', '.join(METRICS)}.")
        if self.steps < 1:
            raise ValueError("steps must be at least 1.")

    def rules(self) -> RelPRules:
        if self.method != "relp":
            return RelPRules.none()
        return RelPRules(self.norm_rule, self.activation_rule, self.half_rule, self.detach_attention)


@dataclass
class Scores:
    """Signed mean attribution scores, ``[layers, positions, neurons]``, and where they came from.

    Prompts of several lengths line up as ``metadata["align"]`` says (docs/method.md section 1):
    ``end`` (the default) adds up their last tokens, and :meth:`ranked` names positions from the
    end (-1: the last token); ``start`` adds up their first tokens and names positions from 0. The
    tensor is as long as the longest prompt.
    """

    scores: torch.Tensor
    n_examples: int
    metadata: dict = field(default_factory=dict)

    def by_neuron(self) -> torch.Tensor:
        """Scores summed over positions: ``[layers, neurons]``."""
        return self.scores.sum(dim=1)

    @property
    def align(self) -> str:
        """How prompts of several lengths lined up (ALIGNMENTS)."""
        return self.metadata.get("align", "end")

    def ranked(self, limit: int | None = None, aggregate: bool = False,
               layers: Iterable[int] | None = None, signed: bool = False) -> list[tuple[Node, float]]:
        """Nodes by decreasing |score| (ties in index order), each with its signed score; zero scores left out.

        ``aggregate``: (layer, neuron) pairs scored by their sum over positions (position ``None``);
        ``layers``: only these layers; ``limit``: at most this many; ``signed``: by decreasing signed score
        instead, the nodes whose counterfactual values move the model most towards the counterfactual answer first.
        """
        table = self.by_neuron().unsqueeze(1) if aggregate else self.scores
        if layers is not None:
            outside = torch.ones(table.shape[0], dtype=torch.bool)
            outside[list(layers)] = False
            table = table.masked_fill(outside.view(-1, 1, 1), 0.0)
        flat = table.flatten()
        order = _strongest(flat if signed else flat.abs(), limit)
        order = order[flat[order] != 0][:limit]
        layer, position, neuron = (index.tolist() for index in torch.unravel_index(order, table.shape))
        offset = table.shape[1] if self.align == "end" else 0
        return [((l, None if aggregate else p - offset, n), score)
                for l, p, n, score in zip(layer, position, neuron, flat[order].tolist())]

    def at(self, nodes: Sequence[Node]) -> torch.Tensor:
        """The signed scores of single (layer, position, neuron) nodes, positions named as :meth:`ranked` names them."""
        index = torch.tensor(nodes)
        offset = self.scores.shape[1] if self.align == "end" else 0
        return self.scores[index[:, 0], index[:, 1] + offset, index[:, 2]]

    def standing(self, node: Node, aggregate: bool = False) -> tuple[int, float] | None:
        """A node's place in :meth:`ranked` (1: the strongest) and its signed score; ``None`` for a zero score or a node
        this table does not hold (``aggregate``: a (layer, None, neuron) pair summed over positions)."""
        table = self.by_neuron().unsqueeze(1) if aggregate else self.scores
        layer, position, neuron = node
        if neuron is None or (position is None) != aggregate:
            return None
        index = 0 if aggregate else position + (table.shape[1] if self.align == "end" else 0)
        if not (0 <= layer < table.shape[0] and 0 <= index < table.shape[1] and 0 <= neuron < table.shape[2]):
            return None
        flat = table.flatten()
        where = (layer * table.shape[1] + index) * table.shape[2] + neuron
        magnitude, mine = flat.abs(), flat[where].abs()
        if mine == 0:
            return None
        return int((magnitude > mine).sum()) + int((magnitude[:where] == mine).sum()) + 1, float(flat[where])

    def save(self, path: Path) -> None:
        """Write one safetensors file; the metadata travels as JSON in its header."""
        header = {"n_examples": self.n_examples, **self.metadata}
        save_file({"scores": self.scores.contiguous()}, str(path), metadata={"circuit_tests": json.dumps(header)})

    @classmethod
    def load(cls, path: Path) -> Scores:
        with safe_open(str(path), "pt") as handle:
            header = json.loads(handle.metadata()["circuit_tests"])
        n_examples = header.pop("n_examples")
        if "library_version" in header:  # written by circuit-tests: before 0.2 it lined prompts up at their start
            header.setdefault("align", "start")
        return cls(load_file(str(path))["scores"], n_examples, header)


def _strongest(key: torch.Tensor, limit: int | None) -> torch.Tensor:
    """Indices of ``key`` by decreasing value, ties in index order: all of them, or the first ``limit`` and any
    tied with the last. A full sort of a Llama-3.1-8B-sized table (millions of nodes) takes a third of a second
    on a CPU; only the entries at or above the ``limit``-th value are sorted here."""
    if limit is not None and limit < key.numel():
        floor = key.topk(limit).values[-1]
        kept = ((key >= floor) | key.isnan()).nonzero().squeeze(1)  # index order: ties stay in it
        return kept[key[kept].argsort(descending=True, stable=True)]
    return key.argsort(descending=True, stable=True)


def data_hash(examples: Iterable[PairedExample]) -> str:
    """A short content hash of a dataset, independent of where its examples were read from."""
    digest = hashlib.sha256()
    for example in examples:
        record = [example.clean_prefix, example.patch_prefix, example.clean_answer, example.patch_answer]
        digest.update(json.dumps(record).encode())
    return digest.hexdigest()[:16]


def attribute(
    sites: NeuronSites,
    batches: Sequence[PairedBatch],
    options: AttributionOptions = AttributionOptions(),
    candidates: Sequence[Node] | None = None,
) -> Scores:
    """Score every node over all batches (``exact`` scores only the ``candidates``)."""
    if not batches:
        raise ValueError("No examples to attribute.")
    device = sites.device
    batches = [batch.to(device) for batch in batches]
    n_positions = max(batch.n_positions for batch in batches)
    total = torch.zeros(sites.n_layers, n_positions, sites.n_neurons, dtype=torch.float64, device=device)
    mean = mean_baseline(sites, batches) if options.baseline == "mean" else None
    metric = METRICS[options.metric]
    for batch in bar(batches, f"{options.method} attribution"):
        baseline = baseline_values(sites, batch, options.baseline, mean)
        if options.method == "exact":
            if candidates is None:
                raise ValueError("method 'exact' needs candidate nodes: patching every node one by one is too slow.")
            if any(position is None or (position >= 0) == (options.align == "end") for _, position, _ in candidates):
                raise ValueError(f"exact patching with align={options.align!r} takes nodes at one position each, counted "
                                 "from that end (-1 the last token; 0 the first), as Scores.ranked names them.")
            _add_exact(total, sites, batch, baseline, metric, candidates)
        elif options.method == "ig":
            _add_integrated_gradients(total[:, _aligned(batch, options.align)], sites, batch, baseline, metric, options.steps)
        else:
            _add_gradient_times_delta(total[:, _aligned(batch, options.align)], sites, batch, baseline, metric, options.rules())
    n_examples = sum(len(batch) for batch in batches)
    metadata = {"library_version": circuit_tests.__version__, **asdict(options)}
    return Scores((total / n_examples).float().cpu(), n_examples, metadata)


# --------------------------------------------------------------------------- baselines


@torch.no_grad()
def neuron_values(sites: NeuronSites, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's neurons on ``ids``: a list of ``[batch, positions, neurons]`` tensors."""
    with capture(sites) as acts:
        next_token_logits(sites.model, ids)
    return acts


def mean_baseline(sites: NeuronSites, batches: Sequence[PairedBatch]) -> list[torch.Tensor]:
    """Per layer and position, the mean counterfactual activation over all examples."""
    lengths = {batch.n_positions for batch in batches}
    if len(lengths) != 1:
        raise ValueError(f"The mean baseline needs prompts of one token length; got lengths {sorted(lengths)}.")
    sums = None
    for batch in batches:
        acts = [a.sum(0, dtype=torch.float64) for a in neuron_values(sites, batch.patch_ids)]
        sums = acts if sums is None else [s + a for s, a in zip(sums, acts)]
    n = sum(len(batch) for batch in batches)
    return [s / n for s in sums]


def baseline_values(sites: NeuronSites, batch: PairedBatch, kind: str, mean: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Per layer, the ``[batch, positions, neurons]`` values a node moves to: the counterfactual prompt's, zero, or ``mean``."""
    if kind == "counterfactual":
        return neuron_values(sites, batch.patch_ids)
    shape = (len(batch), batch.n_positions, sites.n_neurons)
    dtype = sites.model.dtype
    if kind == "zero":
        return [torch.zeros(shape, dtype=dtype, device=sites.layer_device(layer)) for layer in range(sites.n_layers)]
    return [m.to(dtype).expand(shape) for m in mean]


# --------------------------------------------------------------------------- methods


def _aligned(batch: PairedBatch, align: str) -> slice:
    """Where a batch's positions sit in the scores of all prompts: its last ones (``end``) or its first ones (``start``)."""
    return slice(-batch.n_positions, None) if align == "end" else slice(0, batch.n_positions)


def _add_gradient_times_delta(
    total: torch.Tensor,
    sites: NeuronSites,
    batch: PairedBatch,
    baseline: list[torch.Tensor],
    metric: Metric,
    rules: RelPRules,
) -> None:
    """AtP / RelP: one forward with gradients and one backward for every layer at once (``total``: this batch's positions)."""
    with relp_rules(sites, rules), capture(sites, grad=True) as acts:
        value = metric(next_token_logits(sites.model, batch.clean_ids), batch).sum()
    grads = torch.autograd.grad(value, acts)
    for layer, (act, grad) in enumerate(zip(acts, grads)):  # products in float32 at least, whatever the model's dtype
        delta = baseline[layer].float() - act.detach().float()
        total[layer] += (delta * grad.float()).sum(0, dtype=torch.float64).to(total.device)


def _add_integrated_gradients(
    total: torch.Tensor,
    sites: NeuronSites,
    batch: PairedBatch,
    baseline: list[torch.Tensor],
    metric: Metric,
    steps: int,
) -> None:
    """IG: per layer, the mean gradient at ``a + alpha (a' - a)``, ``alpha = 0, 1/steps, ...``, times ``a' - a``.

    The ``steps`` points of one layer run as one batch of ``steps x batch`` rows from that layer on
    (the layers below run once): one forward and one backward per layer.
    """
    clean = neuron_values(sites, batch.clean_ids)
    repeated = batch.repeat(steps)
    for layer in range(sites.n_layers):
        delta = baseline[layer] - clean[layer]
        alphas = torch.arange(steps, device=delta.device, dtype=delta.dtype).view(-1, 1, 1, 1) / steps
        points = (clean[layer] + alphas * delta).requires_grad_(True)  # [steps, batch, positions, neurons]
        with torch.enable_grad(), copies_from(sites, layer, steps), on_neurons(sites, lambda _, __: points.flatten(0, 1), [layer]):
            value = metric(next_token_logits(sites.model, batch.clean_ids), repeated).sum()
        grad = torch.autograd.grad(value, points)[0]
        total[layer] += (grad.mean(0, dtype=torch.float64) * delta).sum(0).to(total.device)


@torch.no_grad()
def _add_exact(
    total: torch.Tensor,
    sites: NeuronSites,
    batch: PairedBatch,
    baseline: list[torch.Tensor],
    metric: Metric,
    candidates: Sequence[Node],
    max_rows: int = 512,
) -> None:
    """Exact patching: move each candidate node alone to its baseline value and measure the metric."""
    clean_value = metric(next_token_logits(sites.model, batch.clean_ids), batch)
    chunk = max(1, max_rows // len(batch))
    ordered = sorted(candidates)  # by layer, so that a chunk's copies share the layers below it
    for start in range(0, len(ordered), chunk):
        nodes = ordered[start : start + chunk]
        effects = _patched_metric(sites, batch, baseline, metric, nodes) - clean_value.repeat(len(nodes))
        for node, effect in zip(nodes, effects.view(len(nodes), len(batch)).sum(1, dtype=torch.float64)):
            total[node] += effect


def _patched_metric(
    sites: NeuronSites, batch: PairedBatch, baseline: list[torch.Tensor], metric: Metric, nodes: list[Node]
) -> torch.Tensor:
    """The metric on copies of the batch, copy ``i`` with node ``i`` patched: ``[len(nodes) * batch]``.

    The copies share the layers below the lowest patched one, so patching a late layer costs little.
    """
    n, b = len(nodes), len(batch)

    def patch_one_node_per_copy(layer: int, neurons: torch.Tensor) -> torch.Tensor:
        neurons = neurons.clone().view(n, b, *neurons.shape[1:])
        for copy, (node_layer, position, neuron) in enumerate(nodes):
            if node_layer == layer and in_prompt(position, batch.n_positions):  # a shorter prompt lacks it
                neurons[copy, :, position, neuron] = baseline[layer][:, position, neuron]
        return neurons.view(n * b, *neurons.shape[2:])

    layers = sorted({node[0] for node in nodes})
    with copies_from(sites, layers[0], n), on_neurons(sites, patch_one_node_per_copy, layers):
        logits = next_token_logits(sites.model, batch.clean_ids)
    return metric(logits, batch.repeat(n))


def trace(
    loaded: LoadedModel,
    examples: Sequence[PairedExample],
    options: AttributionOptions = AttributionOptions(),
    batch_size: int = 32,
) -> tuple[Scores, Tokenized]:
    """Tokenise paired examples for a loaded model and attribute them; scores carry full provenance."""
    if options.baseline == "counterfactual" and not all(example.paired for example in examples):
        unpaired = next(example for example in examples if not example.paired)
        raise SpecError(
            f"{unpaired.source}: an unpaired prompt has no counterfactual to patch from. "
            "Use baseline 'zero' or 'mean' (--baseline zero), or give clean and patch prefixes."
        )
    data = tokenize_pairs(examples, loaded.tokenizer)
    if not data.n_examples:
        raise SpecError(
            f"All {len(data.dropped)} examples were dropped: their clean and counterfactual prefixes "
            f"tokenize to different lengths for {loaded.ref.name}."
        )
    scores = attribute(NeuronSites(loaded.model), data.chunks(batch_size), options)
    scores.metadata.update(
        model=loaded.ref.name,
        revision=loaded.revision,
        data_hash=data_hash(data.examples),
        n_dropped=len(data.dropped),
        dtype=str(loaded.model.dtype).removeprefix("torch."),
        device=str(loaded.device),
    )
    return scores, data
