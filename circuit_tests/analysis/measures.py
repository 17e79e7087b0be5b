"""What a circuit does: the model run with nodes ablated, patched from a counterfactual, or scaled.

docs/method.md section 4 defines the measures, with ``F(X)`` the mean metric on held-out
examples when every neuron outside ``X`` is ablated:

- faithfulness ``(F(C) - F(empty)) / (F(M) - F(empty))``: the circuit alone reproduces the model;
- completeness ``(F(M \\ C) - F(empty)) / (F(M) - F(empty))``: near 0 when the circuit is necessary;
- flip rate: of the examples the model answers right (the clean answer preferred), the share
  whose answer becomes wrong when the circuit's nodes take their counterfactual values; steering
  success: of the same examples, the share whose top answer becomes the counterfactual's
  (section 6). An answer that was already wrong is no flip: these functions return the outcome
  per example after the patch, and :class:`~circuit_tests.spec.subject.Subject` counts it over
  the examples answered right;
- a multiplier sweep: the probability of a token as chosen neurons are scaled.

Circuits of several sizes are evaluated together: each size is one copy of the batch, with its
own mask, in a single forward pass whose copies share the first positions they all treat alike
(:func:`~circuit_tests.model.interventions.per_copy_logits`). Every
measure runs chunks of at most ``batch_size`` examples (times those copies) and makes ablation
values chunk by chunk, so memory follows the batch size, not the number of held-out examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from circuit_tests.analysis.attribution import neuron_values
from circuit_tests.analysis.metrics import preference
from circuit_tests.analysis.stats import fraction_true
from circuit_tests.model.data import PairedBatch, Tokenized
from circuit_tests.model.interventions import intervene, per_copy_logits, scale
from circuit_tests.model.nodes import Circuit
from circuit_tests.model.sites import NeuronSites, next_token_logits
from circuit_tests.progress import bar

ABLATIONS = ("mean", "zero", "resample")  # the values nodes outside a circuit take: a spec's trace.ablation
PATCH = "patch"  # each example's own counterfactual values: what flips and steering patch in
BATCH_SIZE = 32  # examples per forward pass, the default of a spec's task.batch_size


# --------------------------------------------------------------------------- ablation values

Ablated = tuple[PairedBatch, list[torch.Tensor]]  # a chunk of examples and, per layer, the values that ablate it
Means = dict[int, list[torch.Tensor]]  # per token length, per layer, the [1, positions, neurons] mean counterfactual


def ablated_chunks(
    sites: NeuronSites, data: Tokenized, kind: str, seed: int = 0, batch_size: int = BATCH_SIZE, means: Means | None = None
) -> Iterator[Ablated]:
    """Each chunk of at most ``batch_size`` examples of ``data``, in order, with its ablation values.

    The values are per layer ``[chunk, positions, neurons]``. ``mean``: the mean counterfactual
    activation per position over all examples of that length; ``zero``; ``resample``: the
    counterfactual activation of another example of the same length, drawn with ``seed``;
    ``patch``: the counterfactual activation of the same example. Values are made chunk by chunk
    (``mean`` after one pass over the counterfactuals, unless ``means`` gives that pass's
    :func:`mean_counterfactuals`), so memory follows ``batch_size``.
    """
    if kind not in (*ABLATIONS, PATCH):
        raise ValueError(f"Unknown ablation {kind!r}; use one of {', '.join(ABLATIONS)} (or {PATCH!r}).")
    if kind == "zero":
        return ((chunk, _zeros(sites, chunk)) for chunk in data.chunks(batch_size))
    if kind == "mean":
        means = means if means is not None else mean_counterfactuals(sites, data, batch_size)
        return ((chunk, [m.expand(len(chunk), -1, -1) for m in means[chunk.n_positions]]) for chunk in data.chunks(batch_size))
    sources = _resampled_sources(data, seed) if kind == "resample" else [batch.patch_ids for batch in data.batches]
    return _counterfactual_chunks(sites, data, sources, batch_size)


def _zeros(sites: NeuronSites, chunk: PairedBatch) -> list[torch.Tensor]:
    """Per layer, zeros of ``[chunk, positions, neurons]``, one example's worth expanded (as mean values are)."""
    shape = (1, chunk.n_positions, sites.n_neurons)
    return [torch.zeros(shape, dtype=sites.model.dtype, device=sites.layer_device(layer)).expand(len(chunk), -1, -1)
            for layer in range(sites.n_layers)]


def mean_counterfactuals(sites: NeuronSites, data: Tokenized, batch_size: int = BATCH_SIZE) -> Means:
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


# --------------------------------------------------------------------------- runs with a circuit's nodes replaced


@torch.no_grad()
def masked_last_logits(
    sites: NeuronSites,
    batch: PairedBatch,
    chosen: torch.Tensor,
    inside: list[torch.Tensor] | None,
    outside: list[torch.Tensor] | None,
) -> torch.Tensor:
    """``[copies, batch, vocab]`` next-token logits on the clean prompts, one copy per mask in ``chosen``
    (:func:`~circuit_tests.model.interventions.per_copy_logits`)."""
    logits = per_copy_logits(sites, batch.clean_ids.to(sites.device), chosen, inside, outside)
    return logits.float().view(chosen.shape[0], len(batch), -1)


def masked_preferences(
    sites: NeuronSites,
    batch: PairedBatch,
    chosen: torch.Tensor,
    inside: list[torch.Tensor] | None,
    outside: list[torch.Tensor] | None,
) -> torch.Tensor:
    """``[copies, batch]`` preferences for the clean answer under :func:`masked_last_logits`."""
    return _preferences_per_copy(masked_last_logits(sites, batch, chosen, inside, outside), batch)


def _preferences_per_copy(logits: torch.Tensor, batch: PairedBatch) -> torch.Tensor:
    """``[copies, batch]`` preferences for the clean answer from ``[copies, batch, vocab]`` next-token logits."""
    copies = logits.shape[0]
    return preference(logits.flatten(0, 1).unsqueeze(1), batch.repeat(copies)).view(copies, -1)


def _patched(
    sites: NeuronSites, data: Tokenized, chosen: dict[int, torch.Tensor], batch_size: int, what: str
) -> Iterator[tuple[PairedBatch, torch.Tensor]]:
    """Each chunk with its ``[copies, chunk, vocab]`` logits when each copy's ``chosen`` nodes (``[copies, layers,
    positions, neurons]`` per token length) take counterfactual values."""
    chunks = ablated_chunks(sites, data, PATCH, batch_size=batch_size)
    for batch, counterfactual in bar(chunks, what, len(data.chunks(batch_size))):
        yield batch, masked_last_logits(sites, batch, chosen[batch.n_positions], counterfactual, None)


def _top(sites: NeuronSites, circuit: Circuit, sizes: Sequence[int], data: Tokenized) -> dict[int, torch.Tensor]:
    """Per token length in ``data``, which nodes the top ``sizes`` of ``circuit`` are: ``[len(sizes), layers, positions,
    neurons]``."""
    lengths, bounds = {batch.n_positions for batch in data.batches}, torch.tensor(list(sizes)).view(-1, 1, 1, 1)
    return {length: circuit.ranks(sites.n_layers, length, sites.n_neurons) < bounds for length in lengths}


COPIES = 20  # circuits of unrelated nodes (random draws) measured together, as copies of one pass


def _alone(sites: NeuronSites, circuits: Sequence[Circuit], data: Tokenized) -> Iterator[dict[int, torch.Tensor]]:
    """``circuits`` of unrelated nodes (random draws, say) in groups of ``COPIES``, each group run as copies of one pass:
    per token length in ``data``, which nodes each circuit of the group is, ``[group, layers, positions, neurons]``."""
    lengths = {batch.n_positions for batch in data.batches}
    for start in range(0, len(circuits), COPIES):
        group = circuits[start : start + COPIES]
        yield {length: torch.stack([circuit.ranks(sites.n_layers, length, sites.n_neurons) < len(circuit) for circuit in group])
               for length in lengths}


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
    complement: bool = True,
    ends: torch.Tensor | None = None,
    means: Means | None = None,
) -> Curve:
    """Faithfulness and completeness of the top ``sizes`` nodes of ``circuit`` on ``data``, batched over sizes.

    ``complement=False`` skips the runs with only the circuit ablated (``Curve.complement`` is then empty).
    The two ends that faithfulness is measured between do not depend on the circuit: they are measured
    in the same pass unless ``ends`` (:func:`curve_ends` of the same data and ablation) gives them, as a
    caller measuring many circuits on one split does; such a caller passes the split's ``means`` too, for
    mean ablation (:func:`ablated_chunks`).
    """
    chosen = _top(sites, circuit, [*sizes, *([len(circuit) + 1, 0] if ends is None else [])], data)
    kept, removed = _kept_and_removed(sites, data, chosen, len(sizes) if complement else 0, ablation, seed, batch_size, means,
                                      "faithfulness curve")
    if ends is not None:
        kept = torch.cat([kept, ends.to(kept.dtype)])
    return Curve(tuple(sizes), kept, removed)


def kept_alone(
    sites: NeuronSites,
    data: Tokenized,
    circuits: Sequence[Circuit],
    ablation: str = "mean",
    seed: int = 0,
    *,
    batch_size: int = BATCH_SIZE,
    means: Means | None = None,
) -> torch.Tensor:
    """``[len(circuits), examples]``: each example's preference with each circuit alone kept, the rest ablated (what
    :func:`faithfulness_from` takes, with :func:`curve_ends`). Circuits of unrelated nodes (random draws, say) run as
    copies of one pass, ``COPIES`` at a time."""
    return torch.cat([_kept_and_removed(sites, data, chosen, 0, ablation, seed, batch_size, means, "null draws")[0]
                      for chosen in _alone(sites, circuits, data)])


def _kept_and_removed(
    sites: NeuronSites, data: Tokenized, chosen: dict[int, torch.Tensor], removed_copies: int, ablation: str, seed: int,
    batch_size: int, means: Means | None, what: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[copies, examples]`` preferences with each copy's ``chosen`` nodes (per token length) kept and the rest
    ablated; and, for the first ``removed_copies``, with only those nodes ablated (empty when 0). ``what`` names the
    progress bar."""
    kept, removed = [], []
    for batch, ablate in bar(ablated_chunks(sites, data, ablation, seed, batch_size, means), what, len(data.chunks(batch_size))):
        mask = chosen[batch.n_positions]
        kept.append(masked_preferences(sites, batch, mask, None, ablate))
        if removed_copies:
            removed.append(masked_preferences(sites, batch, mask[:removed_copies], ablate, None))
    return torch.cat(kept, 1).cpu(), torch.cat(removed, 1).cpu() if removed else torch.empty(0)


def curve_ends(sites: NeuronSites, data: Tokenized, ablation: str = "mean", seed: int = 0, *,
               batch_size: int = BATCH_SIZE, means: Means | None = None) -> torch.Tensor:
    """``[2, examples]``: each example's preference with nothing ablated (the model), then with every neuron
    ablated (the empty circuit): the curve of the empty circuit at no size."""
    return faithfulness_curve(sites, data, Circuit((), ()), (), ablation, seed, batch_size=batch_size, complement=False,
                              means=means).per_example


SEARCH_PROBES = 3  # circuit sizes evaluated together in each round of nodes_for's search


def nodes_for(target: float, faithfulness: Callable[[Sequence[int]], Sequence[float]], grid: Sequence[int]) -> int | None:
    """The smallest top-k circuit size reaching ``target`` faithfulness; ``None`` when no size of ``grid`` does.

    ``faithfulness(sizes)`` measures the top-k circuits of those sizes. The first size of the fixed,
    increasing ``grid`` that reaches ``target`` brackets the answer with the grid size before it (or
    0, the empty circuit); rounds of :data:`SEARCH_PROBES` sizes, measured together, then narrow the
    bracket to one node. The answer ``n`` reaches ``target`` and ``n - 1`` does not; it depends on the
    data, the model and the grid, never on which other sizes were measured. Faithfulness need not
    grow with size: where it dips, this is the first crossing inside the first bracket.
    """
    reached = [size for size, value in zip(grid, faithfulness(grid)) if value >= target]
    if not reached:
        return None
    high = reached[0]
    low = max((size for size in grid if size < high), default=0)
    while high - low > 1:
        step = (high - low) / (SEARCH_PROBES + 1)
        probes = sorted({low + math.ceil(step * j) for j in range(1, SEARCH_PROBES + 1)} - {high})
        for size, value in zip(probes, faithfulness(probes)):
            if value >= target:
                high = size
                break
            low = size
    return high


def flip_rates(
    sites: NeuronSites, data: Tokenized, circuit: Circuit, sizes: Sequence[int], *, batch_size: int = BATCH_SIZE
) -> torch.Tensor:
    """``[len(sizes), examples]``: 1 where the clean answer is no longer preferred when the top nodes take
    counterfactual values (a flip where the model preferred it before)."""
    return _flips(sites, data, _top(sites, circuit, sizes, data), batch_size, "flip rates")


def flips_of_each(sites: NeuronSites, data: Tokenized, circuits: Sequence[Circuit], *, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """``[len(circuits), examples]``: 1 where the clean answer is no longer preferred when each circuit alone takes
    counterfactual values (:func:`flip_rates`). Circuits of unrelated nodes (random draws, say) run as copies of one pass, ``COPIES`` at a time."""
    return torch.cat([_flips(sites, data, chosen, batch_size, "null draws") for chosen in _alone(sites, circuits, data)])


def _flips(sites: NeuronSites, data: Tokenized, chosen: dict[int, torch.Tensor], batch_size: int, what: str) -> torch.Tensor:
    flips = [_preferences_per_copy(logits, batch) < 0 for batch, logits in _patched(sites, data, chosen, batch_size, what)]
    return torch.cat(flips, 1).float().cpu()


def patch_success(
    sites: NeuronSites, data: Tokenized, circuit: Circuit, sizes: Sequence[int], *, batch_size: int = BATCH_SIZE
) -> torch.Tensor:
    """``[len(sizes), examples]``: 1 where the top answer is ``patch_answer`` with the top nodes patched (a success
    where the model answered right before)."""
    hits = []
    for batch, logits in _patched(sites, data, _top(sites, circuit, sizes, data), batch_size, "steering"):
        top = logits.argmax(-1)
        hits.append(top == batch.patch_answer.to(top.device))
    return torch.cat(hits, 1).float().cpu()


@torch.no_grad()
def multiplier_sweep(
    sites: NeuronSites,
    ids: torch.Tensor,
    circuit: Circuit,
    factors: Sequence[float],
    tokens: Sequence[int],
    *,
    batch_size: int = BATCH_SIZE,
) -> torch.Tensor:
    """``[len(factors), batch, len(tokens)]``: next-token probabilities of ``tokens`` with the circuit scaled
    by each factor (0 ablates, 1 is the model as it is); the prompts run ``batch_size`` at a time."""
    chunks = [ids[start : start + batch_size] for start in range(0, len(ids), batch_size)]
    return torch.cat([_scaled_probabilities(sites, chunk, circuit, factors, tokens) for chunk in chunks], 1)


def _scaled_probabilities(
    sites: NeuronSites, ids: torch.Tensor, circuit: Circuit, factors: Sequence[float], tokens: Sequence[int]
) -> torch.Tensor:
    probabilities = []
    for factor in factors:
        with intervene(sites, [scale(circuit, factor)]):
            last = next_token_logits(sites.model, ids.to(sites.device))[:, -1].float().softmax(-1)
        probabilities.append(last[:, list(tokens)])
    return torch.stack(probabilities).cpu()


@torch.no_grad()
def preferences(sites: NeuronSites, data: Tokenized, *, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """``logit(clean_answer) - logit(patch_answer)`` on every clean prompt, the model as it is."""
    device = sites.device
    return torch.cat([preference(next_token_logits(sites.model, chunk.clean_ids.to(device)), chunk)
                      for chunk in data.chunks(batch_size)]).cpu()


def accuracy(sites: NeuronSites, data: Tokenized, *, batch_size: int = BATCH_SIZE) -> float:
    """Fraction of clean prompts on which the model prefers the clean answer."""
    return fraction_true(preferences(sites, data, batch_size=batch_size) > 0)
