"""The claims a spec can make, each checked on a :class:`~circuit_tests.spec.subject.Subject`.

A check returns an :class:`Outcome` that reads as a domain report: what was expected, what was
measured (with a 95% bootstrap interval over held-out examples), and details such as the
circuit size or, for ``stable``, the neurons that entered and left the circuit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from circuit_tests.analysis.cards import Card
from circuit_tests.analysis.stats import Interval, Measured, bootstrap
from circuit_tests.errors import SpecError
from circuit_tests.model.data import answer_token
from circuit_tests.model.nodes import Circuit, format_node, format_nodes, in_prompt, moved
from circuit_tests.spec.baselines import BaselineStore, baseline_path, model_key
from circuit_tests.spec.schema import (
    AgreesWithPatching,
    Area,
    Behaves,
    Expectation,
    Flips,
    Necessary,
    Null,
    Pinned,
    Scales,
    Sparse,
    Stable,
    Steers,
)
from circuit_tests.spec.figures import CHANCE
from circuit_tests.spec.subject import STANDARD_SIZES, Subject


@dataclass(frozen=True)
class Outcome:
    """Whether an expectation held, and what was expected and measured."""

    passed: bool
    expected: str
    measured: str
    details: tuple[str, ...] = field(default=())

    @property
    def message(self) -> str:
        lines = [f"expected: {self.expected}", f"measured: {self.measured}", *self.details]
        return "\n".join(lines)


def check(subject: Subject, expectation: Expectation, baselines: BaselineStore) -> Outcome:
    """Evaluate one expectation of the subject's spec; a circuit claim only where the model does the task at all."""
    params = expectation.params
    if about_the_behaviour(params) and not subject.behaviour.present:
        return _without_behaviour(subject, expectation.kind)
    if isinstance(params, Stable):
        return _stable(subject, params, baselines)
    outcome = CHECKS[type(params)](subject, params)
    if outcome.passed:
        return outcome
    edit = f"if the measured value is the new normal, edit the threshold at {expectation.where(subject.spec.path)}"
    return replace(outcome, details=(*outcome.details, edit))


def _ci(value: float, interval: Interval, threshold: float | None = None) -> str:
    return f"{_shown(value, threshold)} (95% CI {interval[0]:.3f} to {interval[1]:.3f})"


def _shown(value: float, threshold: float | None) -> str:
    """``value`` to three decimals, or as many more as it takes to show which side of ``threshold`` it is on:
    a figure is compared exactly as printed (0.79996 is not printed as 0.800 beside a threshold of 0.8)."""
    for digits in range(3, 10):
        text = f"{value:.{digits}f}"
        if threshold is None or (float(text) >= threshold, float(text) <= threshold) == (value >= threshold, value <= threshold):
            return text
    return repr(value)


def _bound(threshold: float) -> str:
    """A threshold as the spec wrote it: two decimals unless it has more."""
    return f"{threshold:.2f}" if float(f"{threshold:.2f}") == threshold else f"{threshold:g}"


def about_the_behaviour(params: object) -> bool:
    """Whether a claim is about the circuit of the spec's behaviour (the clean answer against the counterfactual one),
    so that the model must have that behaviour for it to be judged: every claim but ``behaves`` itself, and ``scales``
    that names its own token (it measures P(token), not a choice between the two answers)."""
    return not isinstance(params, Behaves) and not (isinstance(params, Scales) and params.token is not None)


def _on_test(subject: Subject) -> str:
    return f"on {subject.test.n_examples} held-out examples"


def _on_right(subject: Subject, measured: Measured) -> str:
    """Where a flip or a steer is counted: the held-out examples the model answers right."""
    return f"on the {measured.n} of {subject.test.n_examples} held-out examples answered right"


def _without_behaviour(subject: Subject, kind: str) -> Outcome:
    """A circuit claim on a model that does not do the task: it fails, whatever its circuit measures."""
    return Outcome(False, f"the behaviour that {kind} is about: accuracy above chance ({CHANCE:g}) with 95% confidence and a "
                   "mean logit difference above 0, before any circuit claim is judged",
                   f"{subject.behaviour} for {subject.loaded.ref.name}",
                   ("a circuit claim is not judged where the model does not do the task: its flips, faithfulness and "
                    "steering would measure noise. A checkpoint that lost the behaviour is a regression. If the model never "
                    "had it on this data, use more or better pairs, or another model.",))


def _error(subject: Subject, field: str, problem: str, fix: str) -> SpecError:
    return SpecError(f"{subject.spec.path}: field '{field}': {problem} for {subject.loaded.ref.name}. {fix}")


def _check_size(subject: Subject, size: int, field: str, total: int | None = None) -> None:
    """A circuit of every node (or more) cannot fail a claim about circuits: refuse it."""
    total = subject.n_nodes if total is None else total
    if size >= total:
        raise _error(subject, field, f"{size} is every node of the model ({total})",
                     "A claim about all of them could never fail; choose a smaller circuit.")


def _check_position(subject: Subject, position: int | None, field: str) -> None:
    shortest = subject.shortest_prompt
    if position is not None and not -shortest <= position < shortest:
        raise _error(subject, field, f"position {position} is outside the shortest held-out prompt ({shortest} tokens)",
                     f"Use a position from {-shortest} to {shortest - 1} (negative counts from the end).")


def _undefined(subject: Subject, what: str) -> str:
    """Why a faithfulness-like ratio is not a number: F(M) - F(empty), its denominator, is not away from 0
    (:attr:`Subject.separated`)."""
    _ = subject.separated
    gap, low, high = subject.figures.separation
    model, empty = subject.ends[0].mean().item(), subject.ends[1].mean().item()
    return (f"{what} undefined: the model no longer separates the answers from what is left with every node ablated. "
            f"The logit difference of the model ({model:.3f}) minus that with every node ablated ({empty:.3f}) is "
            f"{gap:.3f} (95% CI {low:.3f} to {high:.3f}), which includes 0, so a ratio over it is noise {_on_test(subject)}")


def _behaves(subject: Subject, params: Behaves) -> Outcome:
    measured, behaviour = subject.accuracy, subject.behaviour
    return Outcome(measured >= params.min_accuracy and behaviour.present,
                   f"accuracy >= {_bound(params.min_accuracy)}, above chance ({CHANCE:g}) with 95% confidence",
                   f"accuracy {_shown(measured, params.min_accuracy)} {_on_test(subject)}", (str(behaviour),))


def _sparse(subject: Subject, params: Sparse) -> Outcome:
    _check_size(subject, params.max_nodes, "sparse.max_nodes")
    measured = subject.faithfulness(params.max_nodes)
    value, interval = measured.value, measured.interval
    needed = subject.nodes_for(params.min_faithfulness)
    expected = f"the top {params.max_nodes} nodes are >= {_bound(params.min_faithfulness)} faithful ({subject.spec.trace.ablation} ablation)"
    if not math.isfinite(value):
        return Outcome(False, expected, _undefined(subject, "faithfulness"))
    return _against_null(subject, params.vs_random, "faithfulness", params.max_nodes, Outcome(
        value >= params.min_faithfulness, expected,
        f"faithfulness {_ci(value, interval, params.min_faithfulness)} {_on_test(subject)}",
        (f"faithfulness {_bound(params.min_faithfulness)} needs " + (f"{needed} nodes (the smallest top-k circuit reaching it)"
         if needed else f"more than {max(STANDARD_SIZES)} nodes"), *_fewer(subject, params.max_nodes)),
    ))


def _against_null(subject: Subject, params: Null | None, figure: str, size: int, outcome: Outcome) -> Outcome:
    """The outcome, also requiring (when the claim asks) that random circuits of the same shape rarely do as well."""
    if params is None:
        return outcome
    null = subject.null(figure, size, params.draws)
    draws = sorted(null.draws)
    line = (f"against {params.draws} random circuits of the same shape (as many nodes per layer and position): "
            f"{figure} {min(draws):.3f} to {max(draws):.3f} (median {draws[len(draws) // 2]:.3f}); margin "
            f"{null.margin:+.3f}, p = {null.p:.3f} (at most {params.max_p:g})")
    return replace(outcome, passed=outcome.passed and null.p <= params.max_p,
                   expected=f"{outcome.expected}, and beats random circuits of its shape (p <= {params.max_p:g})",
                   details=(line, *outcome.details))


def _area(subject: Subject, params: Area) -> Outcome:
    area = subject.area(params.ranking)
    signed, absolute = subject.area("signed"), subject.area("absolute")  # for the pair MIB's tables print
    bounds = ([f"CPR >= {_bound(params.min_cpr)}"] if params.min_cpr is not None else []) + (
        [f"CMD <= {_bound(params.max_cmd)}"] if params.max_cmd is not None else [])
    expected = (f"over the top 0.1% to 100% of nodes ({area.ranking} ranking, {area.ablation} ablation), "
                + " and ".join(bounds))
    if not all(map(math.isfinite, (area.cpr, area.cmd))):
        return Outcome(False, expected, _undefined(subject, "CPR and CMD"))
    held = (params.min_cpr is None or area.cpr >= params.min_cpr) and (params.max_cmd is None or area.cmd <= params.max_cmd)
    curve = ", ".join(f"{fraction:.1%} ({size}) {value:.3f}" for fraction, size, value in zip(area.fractions, area.sizes, area.faithfulness))
    return Outcome(held, expected, f"CPR {_ci(area.cpr, area.cpr_interval, params.min_cpr)}, CMD "
                   f"{_ci(area.cmd, area.cmd_interval, params.max_cmd)} {_on_test(subject)}",
                   (f"faithfulness at each share of nodes (nodes): {curve}",
                    f"as MIB pairs them in its published tables (not judged): CPR {_ci(signed.cpr, signed.cpr_interval)} "
                    f"from signed ranking, CMD {_ci(absolute.cmd, absolute.cmd_interval)} from absolute ranking"))


def _agrees_with_patching(subject: Subject, params: AgreesWithPatching) -> Outcome:
    found = subject.agreement(params.nodes)
    expected = (f"{found.method} scores track exact activation patching of {params.nodes} single nodes (half the top by "
                f"score, half random): Pearson r >= {_bound(params.min_pearson)}")
    measured = (f"r {_shown(found.pearson, params.min_pearson)} on the training split (top half {found.pearson_top:.3f}, "
                f"random half {found.pearson_random:.3f})")
    return Outcome(math.isfinite(found.pearson) and found.pearson >= params.min_pearson, expected, measured)


def _fewer(subject: Subject, size: int) -> tuple[str, ...]:
    """A line saying so when fewer nodes than asked have a non-zero score (the circuit measured is smaller)."""
    found = len(subject.circuit(size))
    return (f"only {found} nodes have a non-zero score, so the circuit measured has {found} nodes, not {size}",) if found < size else ()


def _necessary(subject: Subject, params: Necessary) -> Outcome:
    _check_size(subject, params.nodes, "necessary.nodes")
    measured = subject.completeness(params.nodes)
    value, interval = measured.value, measured.interval
    expected = f"with the top {params.nodes} nodes ablated, completeness <= {_bound(params.max_completeness)}"
    if not math.isfinite(value):
        return Outcome(False, expected, _undefined(subject, "completeness"))
    return Outcome(value <= params.max_completeness, expected, f"completeness {_ci(value, interval, params.max_completeness)} {_on_test(subject)}",
                   _fewer(subject, params.nodes))


def _flips(subject: Subject, params: Flips) -> Outcome:
    _check_size(subject, params.nodes, "flips.nodes")
    measured = subject.flip_rate(params.nodes)
    value, interval = measured.value, measured.interval
    return _against_null(subject, params.vs_random, "flip rate", params.nodes, Outcome(
        value >= params.min_flip_rate,
        f"patching the top {params.nodes} nodes from the counterfactual flips >= {_bound(params.min_flip_rate)} of the answers "
        "the model gets right",
        f"flip rate {_ci(value, interval, params.min_flip_rate)} {_on_right(subject, measured)}",
        _fewer(subject, params.nodes),
    ))


def _pinned(subject: Subject, params: Pinned) -> Outcome:
    circuit = pinned_nodes(subject, params)
    at = "" if params.position is None else f" at position {params.position}"
    what = (f"the top {len(circuit)} nodes of {params.circuit}" if params.circuit else
            f"layers {params.layers[0]}-{params.layers[1]}" if params.layers else f"{len(circuit)} pinned neurons") + at
    expected, measured, passed = [], [], True
    if params.min_flip_rate is not None:
        flips = subject.pinned(what, circuit, "flip_rate")
        passed = flips.value >= params.min_flip_rate
        expected.append(f"patching {what} from the counterfactual flips >= {_bound(params.min_flip_rate)} of right answers")
        measured.append(f"flip rate {_shown(flips.value, params.min_flip_rate)} {_on_right(subject, flips)}")
    if params.min_faithfulness is not None:
        found = subject.pinned(what, circuit, "faithfulness")
        expected.append(f"{what} alone are >= {_bound(params.min_faithfulness)} faithful ({subject.spec.trace.ablation} ablation)")
        if not math.isfinite(found.value):
            return Outcome(False, "; ".join(expected), _undefined(subject, "faithfulness"))
        passed = passed and found.value >= params.min_faithfulness
        measured.append(f"faithfulness {_ci(found.value, found.interval, params.min_faithfulness)} {_on_test(subject)}")
    return Outcome(passed, "; ".join(expected), ", ".join(measured))


def pinned_nodes(subject: Subject, params: Pinned) -> Circuit:
    """The nodes a ``pinned`` expectation names, checked against the model's shape and the prompts' length."""
    field = "pinned.circuit" if params.circuit else "pinned.position"
    if params._read is not None and params._read.shape.model_dump() != subject.shape:
        shape = params._read.shape
        raise SpecError(f"{subject.spec.path}: field '{field}': {params.circuit} was exported from a model of {shape.layers} "
                        f"layers x {shape.neurons} neurons, and {subject.loaded.ref.name} has {subject.sites.n_layers} x "
                        f"{subject.sites.n_neurons}. Export the circuit from a model of this shape, or run the spec only on "
                        "models of the file's shape.")
    circuit = params.circuit_nodes()
    _check_shape(subject, [(layer, neuron) for layer, _, neuron in circuit])
    longest = subject.longest_prompt  # a traced node may lie past shorter prompts' ends
    if params.circuit is None:
        _check_position(subject, params.position, field)
    else:
        beyond = sorted({position for _, position, _ in circuit if not in_prompt(position, longest)})
        if beyond:
            raise _error(subject, field, f"{params.circuit} has nodes at position {beyond[0]}, in none of the held-out "
                         f"prompts (at most {longest} tokens)", "Export the circuit from this spec's data, or pin it in a "
                         "spec whose prompts are as long.")
    sites = subject.sites
    if bool((circuit.ranks(sites.n_layers, longest, sites.n_neurons) < len(circuit)).all()):
        raise _error(subject, "pinned", f"the pinned nodes are every node of the model ({sites.n_layers} layers x {longest} "
                     f"positions x {sites.n_neurons} neurons)", "A claim about all of them could never fail; pin fewer.")
    return circuit


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
        _check_size(subject, params.neurons, "steers.neurons", subject.sites.n_layers * subject.sites.n_neurons)
        circuit = subject.top_neurons(params.neurons)
        what = f"the top {len(circuit)} neurons" + (f" (of {params.neurons} asked: only {len(circuit)} have a non-zero score)"
                                                     if len(circuit) < params.neurons else "")
    else:
        _check_shape(subject, list(params.neurons))
        circuit = Circuit.from_neurons(params.neurons)
        what = f"{len(circuit.neurons())} listed neurons"
    measured = subject.steering(circuit)
    value, interval = measured.value, measured.interval
    return Outcome(
        value >= params.min_success,
        f"patching {what} at every position from the source prompt makes the source's answer the top token in "
        f">= {_bound(params.min_success)} of the prompts the model answers right",
        f"success {_ci(value, interval, params.min_success)} {_on_right(subject, measured)}",
    )


def _scales(subject: Subject, params: Scales) -> Outcome:
    _check_shape(subject, list(params.neurons))
    _check_position(subject, params.position, "scales.position")
    tokenizer, source = subject.loaded.tokenizer, f"{subject.spec.path}: scales"
    token = None if params.token is None else answer_token(tokenizer, params.token, source, "token")
    factors = tuple(params.factors)
    probabilities = subject.sweep(Circuit.from_neurons(params.neurons, params.position), factors, token)
    low = -math.inf if params.min_change is None else params.min_change
    high = math.inf if params.max_change is None else params.max_change
    steps = []
    for i, step in enumerate(probabilities[1:] - probabilities[:-1]):
        interval = bootstrap(lambda d: d.mean(-1), [step], seed=subject.spec.task.seed)
        steps.append((step.mean().item(), f"x{factors[i]:g} -> x{factors[i + 1]:g}: {_ci(step.mean().item(), interval)}"))
    bounds = [f"{word} {bound:+.3f}" for word, bound in (("at least", params.min_change), ("at most", params.max_change))
              if bound is not None]
    what = "P(clean answer)" if params.token is None else f"P({params.token!r})"
    at = "every position" if params.position is None else f"position {params.position}"
    return Outcome(
        all(low <= change <= high for change, _ in steps),
        f"scaling {len(set(map(tuple, params.neurons)))} neurons at {at} by {', '.join(f'x{f:g}' for f in factors)} changes {what} "
        f"by {' and '.join(bounds)} at each step",
        "; ".join(text for _, text in steps) + f" {_on_test(subject)}",
        ("mean probability: " + ", ".join(f"x{f:g} {p.mean().item():.3f}" for f, p in zip(factors, probabilities)),),
    )


def _stable(subject: Subject, params: Stable, baselines: BaselineStore) -> Outcome:
    if baselines.update:
        return Outcome(True, "a baseline to compare with", f"recorded {subject.loaded.ref.name} (--circuit-update)")
    if params.nodes is not None:
        _check_size(subject, params.nodes, "stable.nodes")
    found = baselines.entry(subject.spec, model_key(subject), params.model)
    whose = params.model or model_key(subject)
    if found is None:
        return Outcome(False, f"a stored baseline of {whose}", f"none for {whose} in {baseline_path(subject.spec.path)}",
                       ("record one with `pytest --circuit-update` and commit the file",) if params.model is None else
                       (f"'stable.model' names {params.model}: record its baseline with `pytest --circuit-update "
                        f"--circuit-model={params.model}`, or fix the name",))
    name, entry = found
    if not _same_shape(subject, entry):
        return Outcome(False, f"a stored baseline for a model of {subject.loaded.ref.name}'s shape",
                       f"none for {subject.loaded.ref.name} in {baseline_path(subject.spec.path)}; {name}'s baseline is for "
                       "a model of another shape, so its circuit cannot be compared",
                       ("record one for this model with `pytest --circuit-update` (with `--circuit-model` if the spec does not list it)",))
    size = params.nodes or _faithful_size(subject, entry, name, params.keep_top)
    stored = _stored_circuit(subject, entry, size, name)
    current = subject.circuit(size)
    weighted, jaccard, now = subject.stability(stored, size, name)
    then = entry["metrics"]["faithfulness"].get(str(size))
    faithful_enough = math.isfinite(now) and (then is None or now >= then - params.faithfulness_tolerance)
    lost_top = [(rank, node) for rank, node in enumerate(stored.nodes[: params.keep_top], 1) if node not in current]
    entered, left = moved(stored.nodes, current.nodes)
    entered_cards, left_cards = subject.describe_moved(entered, left, stored.nodes)
    then_text = f"{then:.3f}" if then is not None else "not stored"
    now_text = f"{now:.3f}" if math.isfinite(now) else _undefined(subject, "(faithfulness)")
    sizes = f"{len(stored)} stored nodes" if len(stored) < size else f"{size} nodes"
    keep = f", its top {params.keep_top} nodes all still in the circuit" if params.keep_top else ""
    passed = weighted >= params.min_overlap and faithful_enough and not lost_top
    return Outcome(
        passed,
        f"overlap with {name}'s baseline circuit ({sizes}) >= {_bound(params.min_overlap)} weighted by attribution{keep}, "
        f"and its faithfulness not more than {_bound(params.faithfulness_tolerance)} below the stored value",
        f"overlap {_shown(weighted, params.min_overlap)} weighted ({jaccard:.3f} of nodes shared); stored circuit's faithfulness now {now_text}, "
        f"stored {then_text}",
        (*([f"lost from the baseline's top {params.keep_top}: " + ", ".join(
            f"{format_node(node)} (rank {rank}, score {entry['circuit'][rank - 1][3]:+.3g})" for rank, node in lost_top)]
           if lost_top else []),
         f"entered ({len(entered)}): {format_nodes(entered)}", f"left ({len(left)}): {format_nodes(left)}",
         *([] if passed else [*_what_moved(entered_cards, left_cards), _accept(subject, name)])),
    )


def _what_moved(entered: Sequence[Card], left: Sequence[Card]) -> list[str]:
    """A line per card of the strongest nodes that entered (+) and left (-): the token there and what it writes."""
    if not entered and not left:
        return []
    return ["what the strongest of them do (their output through the unembedding; `circuit-tests explain` says more):",
            *(f"  + {card.summary()}" for card in entered), *(f"  - {card.summary()}" for card in left)]


def _faithful_size(subject: Subject, entry: dict, name: str, keep_top: int) -> int:
    """The circuit size a ``stable`` without ``nodes`` compares: the baseline's nodes for 0.8 faithfulness."""
    recorded = entry["metrics"].get("nodes_for_0.8")
    if recorded is None:
        raise _error(subject, "stable.nodes", f"{name}'s baseline records no circuit reaching 0.8 faithfulness (none of "
                     f"up to {max(STANDARD_SIZES)} nodes does)", "Set 'stable.nodes' to the circuit size to compare.")
    return max(math.ceil(recorded), keep_top)


def _accept(subject: Subject, baseline: str) -> str:
    """How to accept the change: record the circuit measured now as the baseline."""
    where = baseline_path(subject.spec.path)
    if baseline == model_key(subject):
        return (f"if this change is intended, record the circuit measured now with `pytest {subject.spec.path} --circuit-update` "
                f"and commit {where}")
    return (f"if this change is intended, make {subject.loaded.ref.name}'s circuit the baseline: `circuit-tests promote "
            f"{subject.spec.path} --model {subject.loaded.ref.name}` (or `pytest --circuit-update --circuit-model=...` to give "
            f"it an entry of its own) and commit {where}")


def _stored_circuit(subject: Subject, entry: dict, size: int, name: str) -> Circuit:
    """The baseline's top ``size`` nodes, positions counted as the spec's ``trace.align`` counts them.

    An entry that counted the other way (entries before 0.2 counted from the first token and say
    nothing) is renamed when the held-out prompts have one length, the only case where both
    countings name the same tokens. A node no held-out prompt reaches would silently measure fewer
    nodes: it is an error.
    """
    rows, align, longest = entry["circuit"][:size], subject.spec.trace.align, subject.longest_prompt
    if entry.get("align", "start") != align:
        rows = _recounted(subject, rows, name)
    for layer, position, neuron, _ in rows:
        if position is not None and not (-longest <= position < 0 if align == "end" else 0 <= position < longest):
            raise SpecError(f"{baseline_path(subject.spec.path)}: {name}'s stored circuit has node {format_node((layer, position, neuron))}, "
                            f"but the longest held-out prompt has {longest} tokens: the baseline was recorded on "
                            "other data. Record it again with `pytest --circuit-update`.")
    return Circuit(tuple(tuple(row[:3]) for row in rows), tuple(abs(row[3]) for row in rows))


def _recounted(subject: Subject, rows: list, name: str) -> list:
    """Rows whose positions count from the other end, renamed (held-out prompts of one length only)."""
    length = subject.longest_prompt
    if subject.shortest_prompt != length:
        raise SpecError(f"{baseline_path(subject.spec.path)}: {name}'s entry counts positions from the "
                        f"{'first' if subject.spec.trace.align == 'end' else 'last'} token (trace.align, or an entry recorded "
                        f"before 0.2), and the held-out prompts have {subject.shortest_prompt} to {length} tokens, so its "
                        "nodes cannot be placed. Record it again with `pytest --circuit-update`.")
    shift = -length if subject.spec.trace.align == "end" else length
    return [[layer, None if position is None else position + shift, neuron, score] for layer, position, neuron, score in rows]


def _same_shape(subject: Subject, entry: dict) -> bool:
    """Whether a stored circuit can be read on this model (entries written before shapes were stored: by range)."""
    in_range = all(layer < subject.sites.n_layers and neuron < subject.sites.n_neurons for layer, _, neuron, _ in entry["circuit"])
    return in_range and entry.get("shape") in (None, subject.shape)


CHECKS: dict[type, Callable] = {Behaves: _behaves, Sparse: _sparse, Area: _area, AgreesWithPatching: _agrees_with_patching,
                                Necessary: _necessary, Flips: _flips, Pinned: _pinned, Steers: _steers, Scales: _scales}
