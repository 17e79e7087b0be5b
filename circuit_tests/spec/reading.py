"""Reading a circuit: neuron cards for a spec's nodes, and the circuit drawn as a graph.

:mod:`circuit_tests.analysis.cards` reads a neuron off the checkpoint alone; this module adds what a
spec knows about a node (the tokens at its position in the held-out prompts, its attribution score
and rank now, its rank in a stored baseline circuit) and caches the corpus pass like a trace: per
checkpoint content, dtype, device type, corpus text and library versions (:class:`~circuit_tests.spec.traces.TraceCache`).
What ``stable`` names as entered and left, the report's top nodes, ``circuit-tests explain`` and
``circuit-tests graph`` all come from :func:`describe`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from circuit_tests.analysis.attribution import Scores
from circuit_tests.analysis.cards import (
    CONTEXTS,
    STRIDE,
    Card,
    Context,
    Extremes,
    contexts,
    corpus_extremes,
    lens_tokens,
    output_lens,
    read_corpus,
    tokenize_corpus,
)
from circuit_tests.analysis.edges import CLUSTERS, Graph, circuit_graph
from circuit_tests.model.data import Tokenized
from circuit_tests.model.loading import LoadedModel
from circuit_tests.model.nodes import Node, in_prompt
from circuit_tests.model.sites import NeuronSites
from circuit_tests.spec.traces import TraceCache

AT_POSITION = 3  # the most frequent tokens shown at a node's position


@dataclass(frozen=True)
class Corpus:
    """A corpus as the model reads it, with the extremes of every neuron over it."""

    ids: list[list[int]]
    extremes: Extremes


def corpus(loaded: LoadedModel, sites: NeuronSites, traces: TraceCache, path: Path, batch_size: int = 32) -> Corpus:
    """The corpus at ``path`` tokenized, and its pass over every neuron, from the cache when an unchanged run made it."""
    ids = tokenize_corpus(loaded.tokenizer, read_corpus(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:24]
    what = {"measure": "corpus extremes", "corpus": digest, "k": CONTEXTS}
    tensors = traces.measured(loaded, what, {"top", "top_at", "bottom", "bottom_at"},
                              lambda: corpus_extremes(sites, ids, CONTEXTS, batch_size).tensors(), CONTEXTS,
                              lambda found: _fits(found, sites, ids))
    return Corpus(ids, Extremes(**tensors))


def _fits(found: dict, sites: NeuronSites, ids: Sequence[list[int]]) -> bool:
    """Whether cached extremes are this model's and point into this corpus (the cache may sit where others write)."""
    shape = (sites.n_layers, sites.n_neurons, CONTEXTS)
    if any(tensor.shape != shape for tensor in found.values()):
        return False
    if not (found["top"].isfinite().all() and found["bottom"].isfinite().all()):
        return False
    for places in (found["top_at"], found["bottom_at"]):
        sentence, token = places.div(STRIDE, rounding_mode="floor"), places.remainder(STRIDE)
        if not ((0 <= sentence) & (sentence < len(ids))).all():
            return False
        lengths = torch.tensor([len(sentence_ids) for sentence_ids in ids])[sentence]
        if not (token < lengths).all():
            return False
    return True


def names_a_neuron(sites: NeuronSites, node: Node) -> bool:
    """Whether ``node`` names one neuron of the model (not a whole layer, not outside its layers and neurons)."""
    layer, _, neuron = node
    return neuron is not None and 0 <= layer < sites.n_layers and 0 <= neuron < sites.n_neurons


def describe(loaded: LoadedModel, sites: NeuronSites, nodes: Sequence[Node], *, scores: Scores | None = None,
             aggregate: bool = False, test: Tokenized | None = None, stored: Sequence[Node] | None = None,
             read: Corpus | None = None) -> list[Card]:
    """A card per node that names one neuron (whole-layer nodes have none), in order.

    ``scores`` (``aggregate``: summed over positions, as a spec's ``trace.nodes: neuron``) adds each node's score and
    rank; ``test``, the tokens at its position in those prompts; ``stored`` (a baseline circuit, strongest first), its
    rank there; ``read``, its top-activating contexts.
    """
    named = [node for node in nodes if names_a_neuron(sites, node)]
    if not named:
        return []
    lens = output_lens(sites, [(layer, neuron) for layer, _, neuron in named])
    baseline = {node: rank for rank, node in reversed(list(enumerate(stored or (), 1)))}
    cards = []
    for node, row in zip(named, lens):
        promotes, suppresses = lens_tokens(loaded.tokenizer, row)
        rank, score = (scores.standing(node, aggregate) if scores is not None else None) or (None, None)
        cards.append(Card(
            node, promotes, suppresses, *_contexts(loaded, read, node),
            at_position=tokens_at(loaded, test, node[1]) if test is not None else (),
            score=score, rank=rank, baseline_rank=baseline.get(node),
            notes=("not in the stored baseline circuit",) if stored is not None and node not in baseline else ()))
    return cards


def _contexts(loaded: LoadedModel, read: Corpus | None, node: Node) -> tuple[tuple[Context, ...], tuple[Context, ...]]:
    if read is None:
        return (), ()
    layer, _, neuron = node
    found = read.extremes
    return (contexts(loaded.tokenizer, read.ids, found.top[layer, neuron], found.top_at[layer, neuron]),
            contexts(loaded.tokenizer, read.ids, found.bottom[layer, neuron], found.bottom_at[layer, neuron]))


def tokens_at(loaded: LoadedModel, test: Tokenized, position: int | None, shown: int = AT_POSITION) -> tuple[tuple[str, int], ...]:
    """The most frequent tokens at ``position`` (counted as the prompts' positions are named) over the clean prompts."""
    if position is None:
        return ()
    counts: Counter[str] = Counter()
    for batch in test.batches:
        if in_prompt(position, batch.n_positions):
            counts.update(loaded.tokenizer.decode([int(token)]) for token in batch.clean_ids[:, position])
    return tuple(counts.most_common(shown))


def graph(subject, size: int, read: Corpus | None = None, clusters: int = CLUSTERS) -> Graph:
    """The top ``size`` nodes of a spec's circuit (a :class:`~circuit_tests.spec.subject.Subject`) as a graph: each node's
    card, the edges between nodes on the held-out split with the spec's trace rules, and clusters of nodes."""
    cards = subject.describe(subject.circuit(size).nodes, read=read)
    return circuit_graph(subject.sites, subject.test, cards, subject.spec.trace.to_options(), clusters)
