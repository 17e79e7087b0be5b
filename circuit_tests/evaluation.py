"""One spec on one model, measured lazily and once: split, trace, circuit, curve, flips, steering.

A :class:`Subject` is what every expectation of a (spec, model) shares. Each measurement is a
cached property computed on first use, so a spec with ten expectations loads and traces once.
Attribution sees only the training split; every measurement uses the held-out test split.
The trace is also cached on disk, keyed by everything that determines it (model revision,
dtype, device type, training data, method and options, library and torch versions), so a
re-run with nothing changed skips the backward passes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

import torch

import circuit_tests
from circuit_tests.attribution import AttributionOptions, Scores, attribute, data_hash
from circuit_tests.baselines import replace_atomically
from circuit_tests.circuits import Circuit, Curve, accuracy, bootstrap, faithfulness_curve, faithfulness_from, flip_rates, top_k
from circuit_tests.data import PairedExample, TokenLimit, Tokenized, in_chat, split, tokenize_pairs
from circuit_tests.errors import SpecError
from circuit_tests.models import LoadedModel, cache_dir, context_length
from circuit_tests.sites import NeuronSites
from circuit_tests.spec import Necessary, Sparse, Spec, Stable
from circuit_tests.steering import multiplier_sweep, patch_success

STANDARD_SIZES = (10, 30, 100, 300, 1000)
BASELINE_NODES = 100  # nodes of the circuit stored in a baseline, at least
Interval = tuple[float, float]


class Subject:
    """A spec on a loaded model. Raises :class:`SpecError` at once if the data cannot be used."""

    def __init__(self, spec: Spec, loaded: LoadedModel, trace_cache: Path | None = None) -> None:
        self.spec = spec
        self.loaded = loaded
        self.sites = NeuronSites(loaded.model)
        self.trace_cache = trace_cache
        kept = tokenize_pairs(self._prompts(), loaded.tokenizer, self._token_limit())  # one-token answers, lengths checked here
        if not all(example.paired for example in spec.examples):
            raise SpecError(f"{spec.path}: field 'task': every example needs a counterfactual (clean_prefix, "
                            "patch_prefix, clean_answer, patch_answer); unpaired prompts cannot be tested by a spec.")
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
        self.dropped = kept.dropped
        self.train = train[: spec.task.max_train]
        self.test: Tokenized = tokenize_pairs(test, loaded.tokenizer)
        self._flips: dict[int, torch.Tensor] = {}  # per-example hits, by circuit size
        self._steering: dict[tuple, torch.Tensor] = {}  # per-example hits, by patched nodes
        self._sweeps: dict[tuple, torch.Tensor] = {}  # per-example probabilities, by (nodes, factors, token)

    def _token_limit(self) -> TokenLimit:
        """``task.max_prompt_tokens``, or the model's context when that is shorter."""
        asked, context = self.spec.task.max_prompt_tokens, context_length(self.loaded.model)
        if context is not None and context < asked:
            return TokenLimit(context, f"the context of {self.loaded.ref.name}")
        return TokenLimit(asked, "task.max_prompt_tokens")

    def _prompts(self) -> list[PairedExample]:
        """The spec's examples, wrapped in the chat template when ``task.chat`` asks for it."""
        chat, tokenizer = self.spec.task.chat, self.loaded.tokenizer
        if chat is None:
            return list(self.spec.examples)
        if not tokenizer.chat_template:
            raise SpecError(f"{self.spec.path}: field 'task.chat': the tokenizer of {self.loaded.ref.name} has no chat "
                            "template. Remove 'task.chat' for a base model, or test an instruction-tuned checkpoint.")
        return [in_chat(example, tokenizer, chat.system, chat.assistant_prefix) for example in self.spec.examples]

    # ------------------------------------------------------------------ trace and circuit

    @property
    def options(self) -> AttributionOptions:
        trace = self.spec.trace
        return AttributionOptions(method=trace.method, steps=trace.steps, half_rule=trace.half_rule,
                                  detach_attention=trace.detach_attention)

    @cached_property
    def scores(self) -> Scores:
        path = self._cache_path()
        cached = self._cached_scores(path)
        if cached is not None:
            return cached
        batches = tokenize_pairs(self.train, self.loaded.tokenizer).chunks(self.spec.task.batch_size)
        scores = attribute(self.sites, batches, self.options)
        scores.metadata.update(model=self.loaded.ref.name, revision=self.loaded.revision, data_hash=data_hash(self.train))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, scores.save)
        return scores

    def _cached_scores(self, path: Path | None) -> Scores | None:
        """A cached trace, if there is a readable one of this model's shape (anything else is traced again)."""
        if path is None or not path.is_file() or path.is_symlink():
            return None
        try:
            scores = Scores.load(path)
        except Exception:  # noqa: BLE001 -- a damaged cache entry is a cache miss; tracing again overwrites it
            return None
        shape = scores.scores.shape
        usable = (len(shape) == 3 and (shape[0], shape[2]) == (self.sites.n_layers, self.sites.n_neurons)
                  and bool(torch.isfinite(scores.scores).all()))
        return scores if usable else None

    def _cache_path(self) -> Path | None:
        if self.trace_cache is None:
            return None
        key = {
            "model": self.loaded.ref.name, "revision": self.loaded.revision, "dtype": str(self.loaded.model.dtype),
            "device": self.loaded.device.type, "data": data_hash(self.train), "options": asdict(self.options),
            "library": circuit_tests.__version__, "torch": torch.__version__,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.trace_cache / f"{digest}.safetensors"

    def circuit(self, size: int) -> Circuit:
        """The top ``size`` nodes, as the spec's ``trace.nodes`` defines a node."""
        return top_k(self.scores, size, aggregate=self.spec.trace.nodes == "neuron")

    def top_neurons(self, size: int) -> Circuit:
        """The top ``size`` (layer, neuron) pairs by their score summed over positions: what steering patches."""
        return top_k(self.scores, size, aggregate=True)

    @property
    def batch_size(self) -> int:
        return self.spec.task.batch_size

    @property
    def n_nodes(self) -> int:
        """How many nodes the model has, as the spec's ``trace.nodes`` counts them: a circuit of this size is everything."""
        return self.scores.by_neuron().numel() if self.spec.trace.nodes == "neuron" else self.scores.scores.numel()

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
        return accuracy(self.sites, self.test, batch_size=self.batch_size)

    @cached_property
    def curve(self) -> Curve:
        sizes = self._sizes()
        return self.faithfulness_curve(self.circuit(max(sizes)), sizes)

    def faithfulness_curve(self, circuit: Circuit, sizes: Sequence[int]) -> Curve:
        """The curve of any circuit (a stored one, say) on the held-out split, with this spec's ablation."""
        return faithfulness_curve(self.sites, self.test, circuit, sizes, self.spec.trace.ablation, self.spec.task.seed,
                                  batch_size=self.batch_size)

    def _sizes(self) -> tuple[int, ...]:
        asked = {e.params.max_neurons if isinstance(e.params, Sparse) else e.params.neurons
                 for e in self.spec.expectations if isinstance(e.params, (Sparse, Necessary, Stable))}
        return tuple(sorted(set(STANDARD_SIZES) | asked))

    def faithfulness(self, size: int) -> tuple[float, Interval]:
        index = self.curve.sizes.index(size)
        samples = [self.curve.per_example[index], self.curve.per_example[-2], self.curve.per_example[-1]]
        return self.curve.faithfulness[index], bootstrap(faithfulness_from, samples, seed=self.spec.task.seed)

    def completeness(self, size: int) -> tuple[float, Interval]:
        index = self.curve.sizes.index(size)
        samples = [self.curve.complement[index], self.curve.per_example[-2], self.curve.per_example[-1]]
        return self.curve.completeness[index], bootstrap(faithfulness_from, samples, seed=self.spec.task.seed)

    def flip_rate(self, size: int) -> tuple[float, Interval]:
        return self._rate(self._flips, size, lambda: self.flips(self.circuit(size)))

    def flips(self, circuit: Circuit) -> torch.Tensor:
        """Per held-out example, 1 where patching ``circuit`` from the counterfactual flips the preferred answer."""
        return flip_rates(self.sites, self.test, circuit, [len(circuit)], batch_size=self.batch_size)[0]

    def steering(self, circuit: Circuit) -> tuple[float, Interval]:
        """How often patching ``circuit`` from the source prompt makes the source's answer the top one."""
        return self._rate(self._steering, circuit.nodes,
                          lambda: patch_success(self.sites, self.test, circuit, [len(circuit)], batch_size=self.batch_size)[0])

    def sweep(self, circuit: Circuit, factors: tuple[float, ...], token: int | None) -> torch.Tensor:
        """``[len(factors), test examples]``: P(``token``, else each clean answer) with ``circuit`` scaled by each factor."""
        key = (circuit.nodes, factors, token)
        if key not in self._sweeps:
            rows = []
            for batch in self.test.chunks(self.batch_size):
                tokens = [token] if token is not None else batch.clean_answer.tolist()
                probabilities = multiplier_sweep(self.sites, batch.clean_ids, circuit, factors, tokens, batch_size=self.batch_size)
                rows.append(probabilities[..., 0] if token is not None else probabilities.diagonal(dim1=1, dim2=2))
            self._sweeps[key] = torch.cat(rows, 1)
        return self._sweeps[key]

    def _rate(self, memo: dict, key: object, compute) -> tuple[float, Interval]:
        if key not in memo:
            memo[key] = compute()
        hits = memo[key]
        return hits.mean().item(), bootstrap(lambda h: h.mean(), [hits], seed=self.spec.task.seed)

    # ------------------------------------------------------------------ what reports and baselines keep

    def figures(self) -> dict:
        """The measurements made so far (nothing is computed here), as plain JSON-able values."""
        done = self.__dict__
        figures: dict = {
            "model": self.loaded.ref.name, "revision": self.loaded.revision, "device": str(self.loaded.device),
            "dtype": str(self.loaded.model.dtype).removeprefix("torch."),
            "n_train": len(self.train), "n_test": self.test.n_examples, "n_dropped": len(self.dropped),
        }
        if "accuracy" in done:
            figures["accuracy"] = self.accuracy
        if "curve" in done:
            figures["curve"] = {"sizes": list(self.curve.sizes), "faithfulness": self.curve.faithfulness,
                                "completeness": self.curve.completeness}
            figures["nodes_for_0.8"] = self.curve.nodes_for(0.8)
        if self._flips:
            figures["flip_rate"] = {str(size): hits.mean().item() for size, hits in sorted(self._flips.items())}
        if self._steering:
            figures["steering"] = {str(len(nodes)): hits.mean().item() for nodes, hits in self._steering.items()}
        if self._sweeps:
            figures["sweep"] = {f"{len(nodes)} neurons": {f"{factor:g}": p.mean().item() for factor, p in zip(factors, probs)}
                                for (nodes, factors, _), probs in self._sweeps.items()}
        if "scores" in done:
            figures["top"] = [[*node, score] for node, score in self.ranked(20)]
        return figures

    def ranked(self, size: int) -> list[tuple[tuple[int, int | None, int], float]]:
        circuit = self.circuit(size)
        signed = self.scores.by_neuron() if self.spec.trace.nodes == "neuron" else None
        return [
            (node, float(signed[node[0], node[2]] if signed is not None else self.scores.scores[node]))
            for node in circuit.nodes
        ]

    @property
    def shape(self) -> dict:
        return {"layers": self.sites.n_layers, "neurons": self.sites.n_neurons}

    def baseline_entry(self) -> dict:
        """What ``--circuit-update`` stores for this (spec, model): the circuit and the key metrics."""
        size = max([e.params.neurons for e in self.spec.expectations if isinstance(e.params, Stable)], default=0)
        _ = self.accuracy, self.curve, self.flip_rate(30), self.flip_rate(100)  # what a baseline records
        figures = _rounded(self.figures())
        metrics = {key: figures[key] for key in ("accuracy", "n_test", "nodes_for_0.8", "flip_rate")}
        return {
            "revision": figures["revision"],
            "shape": self.shape,
            "machine": {"device": figures["device"], "dtype": figures["dtype"], "torch": str(torch.__version__),
                        "circuit_tests": circuit_tests.__version__, "method": self.spec.trace.method},
            "metrics": metrics | {"faithfulness": dict(zip(map(str, figures["curve"]["sizes"]), figures["curve"]["faithfulness"]))},
            "circuit": [[*node, round(score, 8)] for node, score in self.ranked(max(size, BASELINE_NODES))],
        }


def _rounded(value: object, digits: int = 6) -> object:
    """Floats rounded so that stored baselines change only when a measurement does."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {key: _rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item, digits) for item in value]
    return value


def default_trace_cache() -> Path:
    return cache_dir() / "traces"
