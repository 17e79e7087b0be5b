"""One spec on one model, measured lazily and once: split, trace, circuit, curve, flips, steering.

A :class:`Subject` is what every expectation of a (spec, model) shares. Each measurement is made
on first use and kept, so a spec with ten expectations loads and traces once, and each is
recorded in the subject's :class:`~circuit_tests.spec.figures.Figures`, which reports and
baselines read: an expectation measures through the subject, never around it. Attribution sees
only the training split; every measurement uses the held-out test split. Traces and the
per-example results of measurements are cached on disk (:mod:`circuit_tests.spec.traces`), so an
unchanged re-run makes no forward pass; ``figures.timings`` says where the time went.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from fractions import Fraction
from functools import cached_property
from pathlib import Path

import torch

from circuit_tests.analysis.areas import FRACTIONS, area_tensors, areas, sizes_for
from circuit_tests.analysis.attribution import Scores, attribute, data_hash, trace
from circuit_tests.analysis.cards import Card
from circuit_tests.analysis.measures import (
    Curve,
    Means,
    curve_ends,
    faithfulness_curve,
    faithfulness_from,
    flip_rates,
    flips_of_each,
    kept_alone,
    mean_counterfactuals,
    multiplier_sweep,
    nodes_for,
    patch_success,
    preferences,
)
from circuit_tests.analysis.selection import matched_random, overlap, top_k
from circuit_tests.analysis.stats import Measured, above_chance, bootstrap, fraction_true, mean_measured, pearson
from circuit_tests.errors import SpecError
from circuit_tests.model.data import PairedExample, Tokenized, TokenLimit, in_chat, split, tokenize_pairs
from circuit_tests.model.loading import LoadedModel, context_length
from circuit_tests.model.nodes import Circuit, Node, format_node
from circuit_tests.model.sites import NeuronSites
from circuit_tests.spec.figures import CHANCE, AgreementFigures, AreaFigures, BehaviourFigures, CurveFigures, Figures, NullFigures
from circuit_tests.spec.reading import Corpus, describe, graph, tokens_at
from circuit_tests.spec.schema import Necessary, Sparse, Spec, Stable
from circuit_tests.spec.traces import TraceCache

STANDARD_SIZES = (10, 30, 100, 300, 1000)
MOVED_CARDS = 5  # nodes that entered or left a stored circuit described on a card, each way
UNREACHED = 100  # the size of the circuit the figures hold when no standard size reaches 0.8 faithfulness


class Subject:
    """A spec on a loaded model. Raises :class:`SpecError` at once if the data cannot be used."""

    def __init__(self, spec: Spec, loaded: LoadedModel, trace_cache: Path | None = None) -> None:
        self.spec = spec
        self.loaded = loaded
        self.sites = NeuronSites(loaded.model)
        self.traces = TraceCache(trace_cache)
        kept = tokenize_pairs(prompts(spec, loaded), loaded.tokenizer, token_limit(spec, loaded))  # one-token answers, lengths checked here
        if not all(example.paired for example in spec.examples):
            raise SpecError(f"{spec.path}: field 'task': every example needs a counterfactual (clean_prefix, "
                            "patch_prefix, clean_answer, patch_answer); unpaired prompts cannot be tested by a spec.")
        self.dropped, self.n_examples = kept.dropped, kept.n_examples + len(kept.dropped)
        self._refuse_too_many_drops()
        if kept.n_examples < 2:
            raise SpecError(
                f"{spec.path}: field 'task': {kept.n_examples} usable example(s) for {loaded.ref.name} "
                f"({len(kept.dropped)} dropped because their two prefixes tokenize to different lengths). "
                "A spec needs at least two: one to trace, one to test. Add examples of equal token length."
            )
        train, test = split(kept.examples, spec.task.test_fraction, spec.task.seed)
        if not train:
            raise SpecError(f"{spec.path}: field 'task.test_fraction': {spec.task.test_fraction} of {kept.n_examples} usable "
                            "examples leaves none to trace the circuit on. Lower it, or add examples.")
        self.train = train[: spec.task.max_train]
        self.test: Tokenized = tokenize_pairs(test, loaded.tokenizer)
        self._test_hash = data_hash(test)
        self.figures = Figures(model=loaded.ref.name, revision=loaded.revision, device=str(loaded.device),
                               dtype=str(loaded.model.dtype).removeprefix("torch."), n_train=len(self.train),
                               n_test=self.test.n_examples, n_dropped=len(self.dropped),
                               dropped=[str(drop) for drop in self.dropped], repeated=[str(r) for r in spec.repeated])
        self._flips: dict[tuple, torch.Tensor] = {}  # per example, 1 where the clean answer is not preferred when patched, by nodes
        self._steering: dict[tuple, torch.Tensor] = {}  # per example, 1 where the source's answer is the top one, by nodes
        self._sweeps: dict[tuple, torch.Tensor] = {}  # per-example probabilities, by (nodes, factors, token)
        self._faithful: dict[int, float] = {}  # faithfulness of the top-k circuit, by k
        self._curves: dict[int, Curve] = {}  # curves of single sizes the spec does not name, by size
        self._graphs: dict[int, dict] = {}  # circuit graphs (Graph.to_json), by size

    def _refuse_too_many_drops(self) -> None:
        """Fail the spec when more of its examples are dropped than ``task.max_dropped`` allows (compared exactly)."""
        allowed = self.spec.task.max_dropped
        if drops_allowed(len(self.dropped), self.n_examples, allowed):
            return
        raise SpecError(f"{self.spec.path}: field 'task.max_dropped': {self.drop_summary}, more than the {allowed:.0%} "
                        "allowed. Rewrite those pairs so that both prefixes tokenize to the same length "
                        "(`circuit-tests check` lists each one), or raise task.max_dropped.")

    @property
    def drop_summary(self) -> str:
        """"3 of 120 examples dropped for MODEL (FILE:LINE: why; ...)", the first three named; "" when none is."""
        if not self.dropped:
            return ""
        shown = "; ".join(str(drop) for drop in self.dropped[:3]) + ("; ..." if len(self.dropped) > 3 else "")
        return f"{len(self.dropped)} of {self.n_examples} examples dropped for {self.loaded.ref.name} ({shown})"

    # ------------------------------------------------------------------ trace and circuit

    @cached_property
    def scores(self) -> Scores:
        options, started = self.spec.trace.to_options(), time.perf_counter()
        scores = self.traces.scores(self.loaded, self.train, options, (self.sites.n_layers, self.sites.n_neurons),
                                    lambda: trace(self.loaded, self.train, options, self.batch_size)[0])
        self.figures.timings["trace"] = time.perf_counter() - started
        self.figures.top = [[*node, score] for node, score in scores.ranked(20, aggregate=self.by_neuron)]
        self.figures.tokens = self._tokens()
        self._record(describe(self.loaded, self.sites, [tuple(row[:3]) for row in self.figures.top], scores=scores,
                              aggregate=self.by_neuron, test=self.test))
        return scores

    def describe(self, nodes: Sequence[Node], stored: Sequence[Node] | None = None, read: Corpus | None = None) -> list[Card]:
        """Cards for ``nodes`` (:func:`~circuit_tests.spec.reading.describe`) with their score, rank and the tokens at
        their positions here, and their rank in ``stored``; the report shows them."""
        return self._record(describe(self.loaded, self.sites, nodes, scores=self.scores, aggregate=self.by_neuron,
                                     test=self.test, stored=stored, read=read))

    def describe_moved(self, entered: Sequence[Node], left: Sequence[Node], stored: Sequence[Node]) -> tuple[list[Card], list[Card]]:
        """Cards of the first :data:`MOVED_CARDS` nodes that entered and that left a stored circuit; the figures name all."""
        self.figures.moved = {"entered": [format_node(node) for node in entered], "left": [format_node(node) for node in left]}
        return self.describe(entered[:MOVED_CARDS], stored), self.describe(left[:MOVED_CARDS], stored)

    def graph(self, size: int) -> dict:
        """The top ``size`` nodes as a graph (:func:`~circuit_tests.spec.reading.graph`), made once per size; the
        figures keep the last one asked for, for the report."""
        if size not in self._graphs:
            self._graphs[size] = graph(self, size).to_json()
        self.figures.graph = self._graphs[size]
        return self.figures.graph

    def _record(self, cards: list[Card]) -> list[Card]:
        self.figures.cards.update({format_node(card.node): card.to_json() for card in cards})
        return cards

    def _tokens(self) -> dict[str, list[list]]:
        """Each position (as ``trace.align`` counts it) -> the most frequent tokens there in the held-out prompts, with
        their counts, as a node's card has them: prompts of several lengths put different words at one position."""
        positions = range(-self.longest_prompt, 0) if self.spec.trace.align == "end" else range(self.longest_prompt)
        return {str(position): [list(pair) for pair in tokens_at(self.loaded, self.test, position)] for position in positions}

    @property
    def by_neuron(self) -> bool:
        """Whether the spec's nodes are (layer, neuron) pairs summed over positions (``trace.nodes: neuron``)."""
        return self.spec.trace.nodes == "neuron"

    def circuit(self, size: int) -> Circuit:
        """The top ``size`` nodes, as the spec's ``trace.nodes`` defines a node."""
        return top_k(self.scores, size, aggregate=self.by_neuron)

    def ranked(self, size: int) -> list[tuple[Node, float]]:
        """The top ``size`` nodes with their signed scores (what a baseline stores)."""
        return self.scores.ranked(size, aggregate=self.by_neuron)

    def top_neurons(self, size: int) -> Circuit:
        """The top ``size`` (layer, neuron) pairs by their score summed over positions: what steering patches."""
        return top_k(self.scores, size, aggregate=True)

    @property
    def batch_size(self) -> int:
        return self.spec.task.batch_size

    @property
    def n_nodes(self) -> int:
        """How many nodes the model has, as the spec's ``trace.nodes`` counts them: a circuit of this size is everything."""
        return self.scores.by_neuron().numel() if self.by_neuron else self.scores.scores.numel()

    @property
    def shape(self) -> dict:
        return {"layers": self.sites.n_layers, "neurons": self.sites.n_neurons}

    @property
    def shortest_prompt(self) -> int:
        """Tokens in the shortest held-out prompt: a position must exist in every prompt."""
        return min(batch.n_positions for batch in self.test.batches)

    @property
    def longest_prompt(self) -> int:
        """Tokens in the longest held-out prompt: a stored node past it is measured on no prompt at all."""
        return max(batch.n_positions for batch in self.test.batches)

    # ------------------------------------------------------------------ measurements on the test split

    @cached_property
    def accuracy(self) -> float:
        self.figures.accuracy = fraction_true(self.right)
        return self.figures.accuracy

    def accuracy_measured(self) -> Measured:
        """The accuracy with its bootstrap interval over held-out examples."""
        return self._hit_rate(self.right.float())

    @cached_property
    def right(self) -> torch.Tensor:
        """Per held-out example, whether the model as it is prefers the clean answer: the examples a flip or a steer
        can change (an answer that was already wrong is not flipped by a patch)."""
        return self.preferences > 0

    @cached_property
    def behaviour(self) -> BehaviourFigures:
        """Whether the model does the task at all on the held-out split; a circuit claim is judged only where it does."""
        right, n = int(self.right.sum()), self.right.numel()
        logit = mean_measured(self.preferences, self.spec.task.seed)
        _ = self.accuracy
        self.figures.behaviour = BehaviourFigures(right, n, above_chance(right, n, CHANCE), logit.value, list(logit.interval))
        return self.figures.behaviour

    @cached_property
    def separated(self) -> bool:
        """Whether ``F(M) - F(empty)`` lies away from 0 with 95% confidence (its bootstrap interval over held-out examples
        excludes 0). Faithfulness and completeness are ratios over it: where it does not, they are undefined (NaN), noise
        that no claim may pass on and no report may plot."""
        gap = mean_measured(self.ends[0] - self.ends[1], self.spec.task.seed)
        self.figures.separation = [gap.value, *gap.interval]
        low, high = gap.interval
        return low > 0 or high < 0

    def _ratios(self, values: Sequence[float]) -> list[float]:
        """Faithfulness-like ratios as measured, or NaN for each where the model's two ends are not separated."""
        return list(values) if self.separated else [math.nan] * len(values)

    @cached_property
    def preferences(self) -> torch.Tensor:
        """Per held-out example, logit(clean answer) - logit(patch answer), the model as it is."""
        return self._measure("preferences", {}, {"preferences"}, lambda: {
            "preferences": preferences(self.sites, self.test, batch_size=self.batch_size)})["preferences"]

    @cached_property
    def curve(self) -> Curve:
        sizes = self._sizes()
        curve = self.faithfulness_curve(self.circuit(max(sizes)), sizes)
        self.figures.curve = CurveFigures(
            list(curve.sizes), self._ratios(curve.faithfulness), self._ratios(curve.completeness),
            [list(self._measured(curve, index).interval) for index in range(len(curve.sizes))],
            [list(self._measured(curve, index, complement=True).interval) for index in range(len(curve.sizes))])
        self._faithful.update(zip(curve.sizes, self._ratios(curve.faithfulness)))
        self.figures.nodes_for_08 = self.nodes_for(0.8)
        if not self.figures.circuit and not self._compares_with_baseline:  # stable's circuit is the one the figures hold
            self.figures.circuit = [[*node, score] for node, score in self.ranked(self.figures.nodes_for_08 or UNREACHED)]
        return curve

    @property
    def _compares_with_baseline(self) -> bool:
        """Whether the spec has a ``stable`` claim: its circuit, of the baseline's size, is the one the figures hold
        (whichever item measures first, so that the report's rows do not depend on the order items ran in)."""
        return any(isinstance(expectation.params, Stable) for expectation in self.spec.expectations)

    def nodes_for(self, target: float) -> int | None:
        """The smallest top-k circuit reaching ``target`` faithfulness, searched over sizes up to the
        largest standard size (:func:`~circuit_tests.analysis.measures.nodes_for`); ``None`` above it."""
        if not self._faithful:
            _ = self.curve  # measures the standard sizes first, which the search reuses
        return nodes_for(target, self._faithfulness_of, STANDARD_SIZES)

    def faithfulness_at(self, size: int) -> float:
        """Faithfulness of the top ``size`` nodes, any size (no interval: :meth:`faithfulness` gives one)."""
        return self._faithfulness_of([size])[0]

    def _faithfulness_of(self, sizes: Sequence[int]) -> list[float]:
        """Faithfulness of the top ``sizes`` nodes, each size measured once per subject."""
        missing = [size for size in sizes if size not in self._faithful]
        if missing:
            curve = self.faithfulness_curve(self.circuit(max(missing)), missing, complement=False)
            self._faithful.update(zip(missing, self._ratios(curve.faithfulness)))
        return [self._faithful[size] for size in sizes]

    def faithfulness_curve(self, circuit: Circuit, sizes: Sequence[int], complement: bool = True) -> Curve:
        """The curve of any circuit (a stored one, say) on the held-out split, with this spec's ablation."""
        ablation, seed = self.spec.trace.ablation, self.spec.task.seed

        def compute() -> dict[str, torch.Tensor]:
            curve = faithfulness_curve(self.sites, self.test, circuit, sizes, ablation, seed, batch_size=self.batch_size,
                                       complement=complement, ends=self.ends, means=self.means)
            return {"kept": curve.per_example[: len(sizes)]} | ({"complement": curve.complement} if complement else {})

        tensors = self._measure("faithfulness curve", {"circuit": _digest(circuit.nodes), "sizes": list(sizes),
                                "ablation": ablation, "seed": seed, "complement": complement},
                                {"kept", "complement"} if complement else {"kept"}, compute)
        return Curve(tuple(sizes), torch.cat([tensors["kept"], self.ends]), tensors.get("complement", torch.empty(0)))

    @cached_property
    def ends(self) -> torch.Tensor:
        """``[2, held-out examples]``: preferences with nothing ablated, then with every neuron ablated, under this
        spec's ablation (:func:`~circuit_tests.analysis.measures.curve_ends`): measured once, shared by every curve."""
        ablation, seed = self.spec.trace.ablation, self.spec.task.seed
        return self._measure("faithfulness curve", {"ends": ablation, "seed": seed}, {"ends"}, lambda: {
            "ends": curve_ends(self.sites, self.test, ablation, seed, batch_size=self.batch_size, means=self.means)})["ends"]

    @cached_property
    def means(self) -> Means | None:
        """Under mean ablation, the held-out split's mean counterfactual activations
        (:func:`~circuit_tests.analysis.measures.mean_counterfactuals`), one pass shared by every curve and
        search round that is not in the disk cache; ``None`` under other ablations."""
        if self.spec.trace.ablation != "mean":
            return None
        return mean_counterfactuals(self.sites, self.test, self.batch_size)

    def _sizes(self) -> tuple[int, ...]:
        asked = {e.params.max_nodes if isinstance(e.params, Sparse) else e.params.nodes
                 for e in self.spec.expectations if isinstance(e.params, (Sparse, Necessary, Stable))}
        return tuple(sorted(set(STANDARD_SIZES) | asked - {None}))

    def area(self, ranking: str = "absolute") -> AreaFigures:
        """MIB's curve: faithfulness at :data:`~circuit_tests.analysis.areas.FRACTIONS` of all nodes ranked by
        ``ranking``, under the spec's ablation, with CPR and CMD and their bootstrap intervals over held-out examples."""
        if ranking not in self.figures.areas:
            sizes = sizes_for(self.n_nodes)
            circuit = top_k(self.scores, sizes[-1], aggregate=self.by_neuron, signed=ranking == "signed")
            curve = self.faithfulness_curve(circuit, sizes, complement=False)
            samples, seed = [curve.per_example[:-2], curve.per_example[-2], curve.per_example[-1]], self.spec.task.seed
            cpr, cmd = self._ratios(areas(curve.faithfulness))
            self.figures.areas[ranking] = AreaFigures(
                ranking, self.spec.trace.ablation, list(FRACTIONS), sizes, self._ratios(curve.faithfulness),
                cpr, self._ratios(bootstrap(lambda *s: area_tensors(faithfulness_from(*s))[0], samples, seed=seed)),
                cmd, self._ratios(bootstrap(lambda *s: area_tensors(faithfulness_from(*s))[1], samples, seed=seed)))
        return self.figures.areas[ranking]

    def null(self, figure: str, size: int, draws: int) -> NullFigures:
        """``figure`` ("faithfulness" or "flip rate") of the top ``size`` nodes and of ``draws`` random circuits of the
        same shape (:func:`~circuit_tests.analysis.selection.matched_random`, seeded by the spec's seed)."""
        key = f"{figure}@{size}"
        if key not in self.figures.nulls or len(self.figures.nulls[key].draws) != draws:
            randoms = matched_random(self.circuit(size), self.sites.n_neurons, draws, self.spec.task.seed)
            if figure == "faithfulness":
                value, nulls = self.faithfulness(size).value, self.faithfulness_of_each(randoms)
            else:
                value, nulls = self.flip_rate(size).value, [self._among_right(wrong).value for wrong in self.flips_of_each(randoms)]
            self.figures.nulls[key] = NullFigures(figure, size, value, nulls)
        return self.figures.nulls[key]

    def agreement(self, n_nodes: int) -> AgreementFigures:
        """Pearson r between the trace's scores and exact activation patching of single nodes (the top ``n_nodes // 2``
        by score and random ones, seeded by the spec's seed) on the training split the trace saw."""
        if self.figures.agreement is None or self.figures.agreement.nodes != n_nodes:
            if self.by_neuron:
                raise SpecError(f"{self.spec.path}: field 'expect': agrees_with_patching patches single (layer, position, "
                                "neuron) nodes, and this spec's trace.nodes is 'neuron'. Remove the claim, or trace by position.")
            top = [node for node, _ in self.ranked(n_nodes // 2)]
            train = tokenize_pairs(self.train, self.loaded.tokenizer)
            shortest = min(batch.n_positions for batch in train.batches)
            pool = top + self._random_nodes(n_nodes - len(top), set(top), shortest)
            options = self.spec.trace.to_options()
            exact = attribute(self.sites, train.chunks(self.batch_size), replace(options, method="exact"), candidates=pool)
            traced, truth = self.scores.at(pool), exact.at(pool)
            half = len(top)
            self.figures.agreement = AgreementFigures(options.method, n_nodes, pearson(traced, truth),
                                                      pearson(traced[:half], truth[:half]), pearson(traced[half:], truth[half:]))
        return self.figures.agreement

    def _random_nodes(self, count: int, taken: set[Node], shortest: int) -> list[Node]:
        """``count`` distinct random nodes at the ``shortest`` positions every training prompt has, none of
        ``taken``, seeded."""
        first = -shortest if self.spec.trace.align == "end" else 0
        available = self.sites.n_layers * shortest * self.sites.n_neurons - len(taken)
        if count > available:
            raise SpecError(f"{self.spec.path}: field 'agrees_with_patching.nodes': {count} random nodes asked for, and "
                            f"{self.loaded.ref.name} has {available} more at positions every training prompt has. Ask for fewer.")
        generator, found = torch.Generator().manual_seed(self.spec.task.seed), []
        while len(found) < count:
            layer, position, neuron = (int(torch.randint(high, (1,), generator=generator))
                                       for high in (self.sites.n_layers, shortest, self.sites.n_neurons))
            node = (layer, first + position, neuron)
            if node not in taken:
                taken.add(node)
                found.append(node)
        return found

    def faithfulness_of(self, circuit: Circuit) -> Measured:
        """Faithfulness of any circuit (a pinned one, a random draw) alone, the rest ablated, with its bootstrap interval."""
        return self._measured(self.faithfulness_curve(circuit, [len(circuit)], complement=False), 0)

    def faithfulness_of_each(self, circuits: Sequence[Circuit]) -> list[float]:
        """Faithfulness of each circuit alone (random draws, say), measured together
        (:func:`~circuit_tests.analysis.measures.kept_alone`); no intervals."""
        ablation, seed = self.spec.trace.ablation, self.spec.task.seed
        kept = self._measure("null draws", {"circuits": [_digest(circuit.nodes) for circuit in circuits], "ablation": ablation,
                             "seed": seed}, {"kept"}, lambda: {"kept": kept_alone(
                                 self.sites, self.test, circuits, ablation, seed, batch_size=self.batch_size, means=self.means)})
        return self._ratios(faithfulness_from(kept["kept"], self.ends[0], self.ends[1]).tolist())

    def flips_of_each(self, circuits: Sequence[Circuit]) -> torch.Tensor:
        """``[len(circuits), held-out examples]``: 1 where the clean answer is not preferred with each circuit alone
        (random draws, say) patched, measured together (:func:`~circuit_tests.analysis.measures.flips_of_each`)."""
        return self._measure("null flips", {"circuits": [_digest(circuit.nodes) for circuit in circuits]}, {"flips"},
                             lambda: {"flips": flips_of_each(self.sites, self.test, circuits, batch_size=self.batch_size)})["flips"]

    def faithfulness(self, size: int) -> Measured:
        """Faithfulness of the top ``size`` nodes, with its bootstrap interval."""
        return self._measured(*self._curve_at(size))

    def completeness(self, size: int) -> Measured:
        """Completeness with the top ``size`` nodes ablated, with its bootstrap interval."""
        return self._measured(*self._curve_at(size), complement=True)

    def _curve_at(self, size: int) -> tuple[Curve, int]:
        """The curve holding ``size`` (the spec's, else one measured for that size alone) and its index there."""
        if size in self.curve.sizes:
            return self.curve, self.curve.sizes.index(size)
        if size not in self._curves:
            self._curves[size] = self.faithfulness_curve(self.circuit(size), [size])
        return self._curves[size], 0

    def _measured(self, curve: Curve, index: int, complement: bool = False) -> Measured:
        """Faithfulness (or completeness) of a curve's ``index``-th size, with its bootstrap interval."""
        kept = curve.complement if complement else curve.per_example
        samples = [kept[index], curve.per_example[-2], curve.per_example[-1]]
        value = (curve.completeness if complement else curve.faithfulness)[index]
        interval = bootstrap(faithfulness_from, samples, seed=self.spec.task.seed)
        value, *interval = self._ratios([value, *interval])
        return Measured(value, tuple(interval), samples[0].shape[-1])

    def flip_rate(self, size: int) -> Measured:
        """The flip rate of the top ``size`` nodes (:meth:`flip_rate_of`)."""
        measured = self.flip_rate_of(self.circuit(size))
        self.figures.flip_rate[size] = measured.value
        return measured

    def flip_rate_of(self, circuit: Circuit) -> Measured:
        """Of the held-out examples the model answers right, the share whose answer patching ``circuit`` from the
        counterfactual makes wrong (the clean answer no longer preferred), with its bootstrap interval; ``n`` is how many
        were answered right."""
        return self._among_right(self._patched(self._flips, "flips", flip_rates, circuit))

    def pinned(self, name: str, circuit: Circuit, figure: str) -> Measured:
        """``figure`` ("flip_rate" or "faithfulness") of a pinned circuit, recorded in the figures under ``name``."""
        measured = self.faithfulness_of(circuit) if figure == "faithfulness" else self.flip_rate_of(circuit)
        self.figures.pinned.setdefault(name, {})[figure] = measured.value
        return measured

    def steering(self, circuit: Circuit) -> Measured:
        """Of the held-out examples the model answers right, the share whose top answer becomes the source's when
        ``circuit`` is patched from the source prompt; ``n`` is how many were answered right."""
        measured = self._among_right(self._patched(self._steering, "steering", patch_success, circuit))
        self.figures.steering[len(circuit.nodes)] = measured.value
        return measured

    def sweep(self, circuit: Circuit, factors: tuple[float, ...], token: int | None) -> torch.Tensor:
        """``[len(factors), test examples]``: P(``token``, else each clean answer) with ``circuit`` scaled by each factor."""
        key = (circuit.nodes, factors, token)
        if key not in self._sweeps:
            def compute() -> dict[str, torch.Tensor]:
                rows = []
                for batch in self.test.chunks(self.batch_size):
                    tokens = [token] if token is not None else batch.clean_answer.tolist()
                    probabilities = multiplier_sweep(self.sites, batch.clean_ids, circuit, factors, tokens, batch_size=self.batch_size)
                    rows.append(probabilities[..., 0] if token is not None else probabilities.diagonal(dim1=1, dim2=2))
                return {"probabilities": torch.cat(rows, 1)}

            self._sweeps[key] = self._measure("sweep", {"circuit": _digest(circuit.nodes), "factors": list(factors),
                                                        "token": token}, {"probabilities"}, compute)["probabilities"]
            self.figures.sweep[f"{len(circuit.nodes)} neurons"] = {
                f"{factor:g}": p.mean().item() for factor, p in zip(factors, self._sweeps[key])}
        return self._sweeps[key]

    def stability(self, stored: Circuit, size: int, baseline: str) -> tuple[float, float, float]:
        """How the top ``size`` nodes compare with a stored circuit: the overlap weighted by attribution, the
        plain Jaccard overlap of the nodes, and the stored circuit's faithfulness now."""
        jaccard, weighted = overlap(self.circuit(size), stored)
        now = self._ratios(self.faithfulness_curve(stored, [len(stored)], complement=False).faithfulness)[0]
        self.figures.overlap, self.figures.baseline, self.figures.stored_circuit_faithfulness = weighted, baseline, now
        self.figures.circuit = [[*node, score] for node, score in self.ranked(size)]
        return weighted, jaccard, now

    def _measure(self, name: str, what: dict, names: set[str],
                 compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The per-example tensors ``names`` of one measurement on the held-out split, from the disk cache when an
        unchanged run made them (:class:`~circuit_tests.spec.traces.TraceCache`); the seconds it took add to
        ``figures.timings``."""
        started = time.perf_counter()
        key = {"measure": name, "test": self._test_hash, "batch_size": self.batch_size, "align": self.spec.trace.align, **what}
        tensors = self.traces.measured(self.loaded, key, names, compute, self.test.n_examples)
        self.figures.timings[name] = self.figures.timings.get(name, 0.0) + time.perf_counter() - started
        return tensors

    def _patched(self, memo: dict[tuple, torch.Tensor], name: str, measure: Callable[..., torch.Tensor],
                 circuit: Circuit) -> torch.Tensor:
        """Per held-out example, ``measure``'s outcome (:func:`~circuit_tests.analysis.measures.flip_rates` or
        :func:`~circuit_tests.analysis.measures.patch_success`) with ``circuit`` patched, kept in ``memo`` and cached
        as ``name``."""
        if circuit.nodes not in memo:
            memo[circuit.nodes] = self._measure(name, {"circuit": _digest(circuit.nodes)}, {name}, lambda: {
                name: measure(self.sites, self.test, circuit, [len(circuit)], batch_size=self.batch_size)[0]})[name]
        return memo[circuit.nodes]

    def _among_right(self, hits: torch.Tensor) -> Measured:
        """The rate of ``hits`` (per held-out example) over the examples the model answers right; NaN when there are none."""
        among = hits[..., self.right]
        return self._hit_rate(among) if among.numel() else Measured(math.nan, (math.nan, math.nan), 0)

    def _hit_rate(self, hits: torch.Tensor) -> Measured:
        return Measured(fraction_true(hits), bootstrap(lambda h: h.mean(-1), [hits], seed=self.spec.task.seed), hits.numel())


def _digest(nodes: Sequence[Node]) -> str:
    """A short hash of a circuit's nodes in order: what a cached measurement of it is keyed by."""
    return hashlib.sha256(json.dumps([list(node) for node in nodes]).encode()).hexdigest()[:16]


def drops_allowed(dropped: int, total: int, max_dropped: float) -> bool:
    """Whether ``dropped`` of ``total`` examples is within ``task.max_dropped``, compared exactly (1 of 10 is 0.1)."""
    return Fraction(dropped, total) <= Fraction(str(max_dropped))


def token_limit(spec: Spec, loaded: LoadedModel) -> TokenLimit:
    """``task.max_prompt_tokens``, or the model's context when that is shorter."""
    asked, context = spec.task.max_prompt_tokens, context_length(loaded.model)
    if context is not None and context < asked:
        return TokenLimit(context, f"the context of {loaded.ref.name}")
    return TokenLimit(asked, "task.max_prompt_tokens")


def prompts(spec: Spec, loaded: LoadedModel) -> list[PairedExample]:
    """The spec's examples, wrapped in the model's chat template when ``task.chat`` asks for it."""
    chat, tokenizer = spec.task.chat, loaded.tokenizer
    if chat is None:
        return list(spec.examples)
    if not tokenizer.chat_template:
        raise SpecError(f"{spec.path}: field 'task.chat': the tokenizer of {loaded.ref.name} has no chat "
                        "template. Remove 'task.chat' for a base model, or test an instruction-tuned checkpoint.")
    return [in_chat(example, tokenizer, chat.system, chat.assistant_prefix) for example in spec.examples]
