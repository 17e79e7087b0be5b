"""YAML circuit specs: what to test, on which models, with which data, and what must hold.

A spec is read with ``yaml.safe_load`` and validated by the pydantic models below, which are
also the published JSON Schema (``circuit-tests schema``). Every problem is one
:class:`~circuit_tests.errors.SpecError` paragraph naming the file, the field and the fix::

    name: sva-simple
    description: Subject-verb agreement after a bare noun is carried by about 100 MLP neurons.
    models: [smollm2-135m-instruct]
    task: {dataset: ../fixtures/sva/simple.jsonl, test_fraction: 0.25, seed: 0}
    trace: {method: relp, ablation: mean}
    expect:
      - behaves: {min_accuracy: 0.9}
      - sparse: {max_neurons: 100, min_faithfulness: 0.8}
      - necessary: {neurons: 300, max_completeness: 0.2}
      - flips: {neurons: 30, min_flip_rate: 0.9}
      - pinned: {neurons: [[17, 1203], [22, 88]], min_flip_rate: 0.5}
      - steers: {neurons: 30, min_success: 0.5}
      - scales: {neurons: [[28, 678], [9, 200]], factors: [0, 1, 2], min_change: 0.2}
      - stable: {min_overlap: 0.5, faithfulness_tolerance: 0.05, keep_top: 5}
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from annotated_types import MinLen
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic import Strict as PydanticStrict

from circuit_tests.analysis.areas import CMD_OF_NOTHING, CPR_OF_NOTHING
from circuit_tests.analysis.attribution import ALIGNMENTS, TRACE_METHODS, AttributionOptions
from circuit_tests.analysis.measures import ABLATIONS
from circuit_tests.errors import SpecError
from circuit_tests.files import SPEC_LIMIT, UnreadableInput, inside, read_text, resolved
from circuit_tests.model.data import PairedExample, Repeat, parse_example, read_jsonl, repeats
from circuit_tests.model.nodes import Circuit
from circuit_tests.spec.circuit_file import CircuitFile, read_circuit
from circuit_tests.text import SURROGATE_FIX, has_control, has_surrogate, quoted, shown

# A threshold a claim could meet on any model (a rate of at least 0, completeness of at most 1) is an
# error: a green run must mean something was measured that could have failed.
Rate = Annotated[float, Field(gt=0.0, le=1.0)]
Count = Annotated[int, Field(ge=1)]
Index = Annotated[int, Field(ge=0)]
Pair = Annotated[tuple[Index, Index], PydanticStrict(False)]  # a YAML list of two whole numbers (each still strict)


def _each_once(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    twice = next((pair for i, pair in enumerate(pairs) if pair in pairs[:i]), None)
    if twice is not None:
        raise ValueError(f"lists the neuron {list(twice)} twice: list each neuron once (a repeat would make the claim "
                         "about fewer neurons than it reads)")
    return pairs


# annotated_types' bound: pydantic ignores Field() inside a union
Neurons = Annotated[list[Pair], MinLen(1), AfterValidator(_each_once)]
NAME_PATTERN = r"^[A-Za-z0-9][\w.\-]*$"
MAX_DEPTH = 12  # nesting of a spec's YAML: a spec needs 6


def _no_control(text: str) -> str:
    if has_control(text):
        raise ValueError("must not contain control characters or line breaks")
    return text


ModelName = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_no_control)]
FileName = Annotated[str, AfterValidator(_no_control)]  # a file relative to the spec: printed in messages, one line


class Strict(BaseModel):
    """Unknown keys are errors (a typo must never be silently ignored); values are immutable, finite and of their type:
    ``true`` or ``"0.5"`` where a number is meant is an error, never read as 1 or 0.5 (a whole number is a number).

    A field renamed in this release still reads under its old name (``RENAMED``), for one release:
    loading such a spec warns with :class:`SpecFieldRenamed`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)
    RENAMED: ClassVar[dict[str, str]] = {}  # old name -> new name

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or not any(old in data for old in cls.RENAMED):
            return data
        data = dict(data)
        for old, new in cls.RENAMED.items():
            if old in data:
                if new in data:
                    raise ValueError(f"give '{new}' only: '{old}' is its old name")
                data[new] = data.pop(old)
                if info.context is not None:
                    info.context.setdefault("renamed", []).append((cls, old, new))
        return data


class SpecFieldRenamed(FutureWarning):
    """A spec uses a field's old name; it still works in this release."""


# --------------------------------------------------------------------------- task and trace


class Chat(Strict):
    """Each prefix becomes the user turn of the tokenizer's chat template, as instruction-tuned models are prompted."""

    system: str | None = Field("", description="system message ('' for an empty one, null for the template's own default)")
    assistant_prefix: str = Field("", description="text the assistant's turn starts with, e.g. 'Answer:'")


class Task(Strict):
    """The paired prompts, and how they are split into attribution (train) and evaluation (test)."""

    dataset: FileName | None = Field(None, description="JSON-lines file of paired examples, relative to the spec")
    examples: list[dict[str, str]] | None = Field(None, description="inline examples, same fields as a dataset line")
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="held-out share, never seen by attribution")
    seed: int = Field(0, ge=0, lt=2**63, description="seed of the train/test split, resampling and bootstraps (0 to 2**63 - 1)")
    max_train: Count = Field(128, description="attribute on at most this many training examples")
    batch_size: Count = Field(32, description="examples per forward/backward pass, in attribution and evaluation")
    max_prompt_tokens: Count = Field(512, description="longest prompt allowed, in tokens (never more than the model's context)")
    max_dropped: float = Field(0.1, ge=0.0, le=1.0, description="largest share of examples that may be dropped because "
                               "their two prefixes tokenize to different lengths; above it every expectation fails")
    chat: Chat | None = Field(None, description="wrap prefixes in the model's chat template (default: plain text)")

    @model_validator(mode="after")
    def _one_source(self) -> Task:
        if (self.dataset is None) == (self.examples is None):
            raise ValueError("give exactly one of 'dataset' (a JSON-lines file) or 'examples' (a list)")
        return self


class Trace(Strict):
    """How the circuit is found and how nodes outside it are ablated."""

    method: Literal[TRACE_METHODS] = Field("relp", description="attribution method (see README, Attribution)")
    steps: Count = Field(10, description="integrated-gradients steps")
    half_rule: bool = Field(True, description="relp: halve the gradient through gate * up")
    detach_attention: bool = Field(False, description="relp: treat attention patterns as constants")
    ablation: Literal[ABLATIONS] = Field("mean", description="value of ablated nodes (mean over the test split)")
    nodes: Literal["position", "neuron"] = Field(
        "position", description="'position': nodes are (layer, position, neuron); 'neuron': summed over positions"
    )
    align: Literal[ALIGNMENTS] = Field("end", description="how prompts of several lengths line up, so that one position "
                                       "is one role: 'end' (positions from the last token, -1) or 'start' (from the first, 0)")

    def to_options(self) -> AttributionOptions:
        """The attribution these fields ask for (the one place a spec's trace becomes attribution options)."""
        return AttributionOptions(method=self.method, steps=self.steps, half_rule=self.half_rule,
                                  detach_attention=self.detach_attention, align=self.align)


# --------------------------------------------------------------------------- expectations


class Claim(Strict):
    """What every kind of expectation has: an optional ``id``, and which of its fields are thresholds.

    An item's name is its ``id``, else its kind, else (several claims of one kind) the kind and a
    digest of what the claim is about, its fields other than thresholds: ``flips-3fa2c1``. Adding,
    moving or re-thresholding a claim renames no other item.
    """

    THRESHOLDS: ClassVar[tuple[str, ...]] = ()
    id: str | None = Field(None, pattern=NAME_PATTERN, max_length=100, description="the item's name in test ids and "
                           "reports (default: the kind; with several of a kind, the kind and a digest of the claim's fields "
                           "other than its thresholds)")

    def digest(self) -> str:
        about = self.model_dump(mode="json", exclude={"id", *self.THRESHOLDS})
        return hashlib.sha256(json.dumps(about, sort_keys=True).encode()).hexdigest()[:6]


class Behaves(Claim):
    """The model does the task at all: it prefers the clean answer on held-out prompts."""

    THRESHOLDS = ('min_accuracy',)

    min_accuracy: Rate = Field(gt=0.5, description="fraction of test prompts whose clean answer is preferred (above 0.5: "
                               "at or below it, guessing between the two answers passes)")


class Null(Strict):
    """The circuit against random circuits of its shape: as many nodes at each layer and position, random neurons."""

    draws: int = Field(20, ge=1, le=1000, description="random circuits measured (the smallest p-value is 1 / (draws + 1))")
    max_p: float = Field(0.05, gt=0.0, lt=1.0, description="the share of draws (counted as (1 + at least as good) / "
                         "(1 + draws)) that may do as well as the circuit: at most")

    @model_validator(mode="after")
    def _can_pass(self) -> Null:
        if 1 / (self.draws + 1) > self.max_p:
            raise ValueError(f"with {self.draws} draws the p-value is at least {1 / (self.draws + 1):.3f}, above max_p "
                             f"{self.max_p:g}: no circuit could pass; draw at least {math.ceil(1 / self.max_p) - 1}")
        return self


class Sparse(Claim):
    """A small circuit suffices: the top ``max_nodes`` nodes are at least this faithful."""

    THRESHOLDS = ('min_faithfulness', 'vs_random')

    RENAMED = {"max_neurons": "max_nodes"}
    max_nodes: Count = Field(description="circuit size, in (layer, position, neuron) nodes (was max_neurons)")
    min_faithfulness: float = Field(gt=0.0, description="(F(C) - F(empty)) / (F(M) - F(empty)), ablation per trace.ablation (above 0)")
    vs_random: Null | None = Field(None, description="also beat random circuits of the same shape (matched per layer and position)")


class Area(Claim):
    """The whole faithfulness curve, as MIB summarises it: the top 0.1% to 100% of nodes, and the area under the
    curve (CPR, higher is better) and between it and 1 (CMD, lower is better)."""

    THRESHOLDS = ('min_cpr', 'max_cmd')

    ranking: Literal["absolute", "signed"] = Field("absolute", description="how nodes are ranked: by |score|, or by signed "
                                                   "score, the nodes that carry the behaviour first (both change the result)")
    min_cpr: float | None = Field(None, description="area under the faithfulness curve over fractions 0.001 to 1: at least "
                                  f"(above {CPR_OF_NOTHING:g}, the CPR of a circuit that recovers nothing short of the whole "
                                  "model; about 1 is a circuit faithful at every size)")
    max_cmd: float | None = Field(None, ge=0.0, description="area between the curve and 1, |1 - f|: at most (below "
                                  f"{CMD_OF_NOTHING:.3f}, the CMD of a circuit that recovers nothing short of the whole model; "
                                  "0 is a perfect circuit)")

    @field_validator("min_cpr", "max_cmd")
    @classmethod
    def _can_fail(cls, value: float | None, info: ValidationInfo) -> float | None:
        cpr = info.field_name == "min_cpr"
        if value is None or (value > CPR_OF_NOTHING if cpr else value < CMD_OF_NOTHING):
            return value
        bound, side = (f"{CPR_OF_NOTHING:g}", "more") if cpr else (f"{CMD_OF_NOTHING:.3f}", "less")
        raise ValueError(f"{value:g} would hold for a circuit that recovers nothing short of the whole model (faithfulness 0 "
                         f"at every size but all nodes, {'CPR' if cpr else 'CMD'} {bound}): give {side} than {bound}")

    @model_validator(mode="after")
    def _a_bound(self) -> Area:
        if self.min_cpr is None and self.max_cmd is None:
            raise ValueError("give 'min_cpr', 'max_cmd' or both: what the curve's areas must reach")
        return self


class AgreesWithPatching(Claim):
    """The attribution still tracks real effects: the trace's scores against exact activation patching of each node
    alone, on half top nodes and half random nodes (seeded), over the training split the trace saw."""

    THRESHOLDS = ('min_pearson',)

    nodes: int = Field(200, ge=4, le=2000, description="nodes patched one by one: the top half by score, the rest random")
    min_pearson: float = Field(gt=-1.0, lt=1.0, description="Pearson r between scores and exact effects over those nodes: at least")


class Necessary(Claim):
    """Ablating the top ``nodes`` nodes (and keeping the rest) destroys the behaviour."""

    THRESHOLDS = ('max_completeness',)

    RENAMED = {"neurons": "nodes"}
    nodes: Count = Field(description="circuit size, in (layer, position, neuron) nodes (was neurons)")
    max_completeness: float = Field(lt=1.0, description="faithfulness of the model without the circuit (below 1)")


class Flips(Claim):
    """Patching the top ``nodes`` nodes from the counterfactual flips the preferred answer."""

    THRESHOLDS = ('min_flip_rate', 'vs_random')

    RENAMED = {"neurons": "nodes"}
    nodes: Count = Field(description="circuit size, in (layer, position, neuron) nodes (was neurons)")
    min_flip_rate: Rate = Field(description="fraction of test examples whose preferred answer flips (above 0)")
    vs_random: Null | None = Field(None, description="also beat random circuits of the same shape (matched per layer and position)")


class Pinned(Claim):
    """Explicit neurons, whole layers, or an exported circuit file (``circuit-tests export``) keep what they do:
    patched from the counterfactual they flip the answer, and kept alone they recover the behaviour."""

    THRESHOLDS = ('min_flip_rate', 'min_faithfulness')

    neurons: Neurons | None = Field(None, description="[[layer, neuron], ...], each neuron once")
    layers: Pair | None = Field(None, description="[first, last]: every neuron of these layers")
    circuit: FileName | None = Field(None, min_length=1, description="a circuit file written by `circuit-tests export`, relative "
                                "to the spec (docs/circuit-format.md): its nodes, positions included")
    nodes: Count | None = Field(None, description="with circuit: its strongest nodes pinned (default: all of them)")
    position: int | None = Field(None, description="one position (negative counts from the end); default every position")
    min_flip_rate: Rate | None = Field(None, description="fraction of test examples whose preferred answer flips (above 0)")
    min_faithfulness: float | None = Field(None, gt=0.0, description="faithfulness of these nodes alone, the rest ablated "
                                           "per trace.ablation (above 0)")
    _read: CircuitFile | None = PrivateAttr(None)  # the circuit file, read when the spec is loaded

    @model_validator(mode="after")
    def _one_selection(self) -> Pinned:
        if sum(given is not None for given in (self.neurons, self.layers, self.circuit)) != 1:
            raise ValueError("give exactly one of 'neurons' ([[layer, neuron], ...]), 'layers' ([first, last]) or "
                             "'circuit' (a file from `circuit-tests export`)")
        if self.layers is not None and self.layers[0] > self.layers[1]:
            raise ValueError(f"'layers' is [first, last] with first <= last, got {list(self.layers)}: "
                             f"write [{self.layers[1]}, {self.layers[0]}]")
        if self.circuit is None and self.nodes is not None:
            raise ValueError("'nodes' counts a circuit file's nodes: give 'circuit' too, or remove 'nodes'")
        if self.circuit is not None and self.position is not None:
            raise ValueError("a circuit file names each node's position: remove 'position'")
        if self.min_flip_rate is None and self.min_faithfulness is None:
            raise ValueError("give a threshold: 'min_flip_rate', 'min_faithfulness', or both")
        return self

    def circuit_nodes(self) -> Circuit:
        """The nodes pinned: the listed neurons or layers at ``position``, or the circuit file's top ``nodes``."""
        if self.circuit is not None:
            if self._read is None:
                raise SpecError(f"pinned.circuit {self.circuit} was not read: load the spec with load_spec or spec_from_mapping")
            return self._read.circuit(self.nodes)
        if self.layers is not None:
            return Circuit.of((layer, self.position, None) for layer in range(self.layers[0], self.layers[1] + 1))
        return Circuit.from_neurons(self.neurons, self.position)


class Steers(Claim):
    """Patching neurons with their values from the source (counterfactual) prompt makes the
    model answer the source's answer, e.g. another landmark's capital."""

    THRESHOLDS = ('min_success',)

    neurons: Count | Neurons = Field(description="the top N (layer, neuron) pairs, or an explicit list (each neuron once)")
    min_success: Rate = Field(description="fraction of test prompts whose top token becomes the source's answer (above 0)")


class Scales(Claim):
    """Multiplying explicit neurons by each factor in turn (0 ablates, 1 is the model as is) moves the
    probability of a token, e.g. "say a capital" neurons and the capital's probability."""

    THRESHOLDS = ('min_change', 'max_change')

    neurons: Neurons = Field(description="[[layer, neuron], ...], each neuron once")
    position: int | None = Field(-1, description="the position scaled (negative counts from the end); null for every position")
    factors: list[float] = Field([0.0, 1.0, 2.0], min_length=2, description="multipliers, swept in this order, each "
                                 "once (a step between equal factors measures no change, and a bound on it would always hold)")
    token: str | None = Field(None, description="one-token string whose probability is read (default: each prompt's clean answer)")
    min_change: float | None = Field(None, gt=-1.0, le=1.0,
                                     description="P(token) at each factor minus at the one before, mean over test prompts: at least (above -1)")
    max_change: float | None = Field(None, ge=-1.0, lt=1.0,
                                     description="the same change at each step: at most, e.g. 0 for a sweep that must not raise it (below 1)")

    @field_validator("factors")
    @classmethod
    def _factors_differ(cls, factors: list[float]) -> list[float]:
        twice = next((factor for i, factor in enumerate(factors) if factor in factors[:i]), None)
        if twice is not None:
            raise ValueError(f"lists the factor {twice:g} twice: list each factor once (a step between equal factors "
                             "measures no change, so a bound on it would hold on any model)")
        return factors

    @model_validator(mode="after")
    def _a_bound(self) -> Scales:
        if self.min_change is None and self.max_change is None:
            raise ValueError("give 'min_change', 'max_change' or both: the allowed change of probability")
        if self.min_change is not None and self.max_change is not None and self.min_change > self.max_change:
            raise ValueError(f"'min_change' ({self.min_change}) is above 'max_change' ({self.max_change}): no sweep could pass")
        return self


class Stable(Claim):
    """The circuit still matches the stored baseline (written with ``--circuit-update``)."""

    THRESHOLDS = ('min_overlap', 'faithfulness_tolerance', 'keep_top')

    vs: Literal["baseline"] = Field("baseline", description="what to compare with (the stored baseline file)")
    RENAMED = {"neurons": "nodes"}
    model: ModelName | None = Field(None, description="whose baseline: default this model's, else the spec's first model's")
    nodes: Count | None = Field(None, description="circuit size compared, in (layer, position, neuron) nodes (was neurons); "
                                "default: the baseline's nodes for 0.8 faithfulness, the smallest faithful circuit")
    min_overlap: Rate = Field(0.5, description="overlap of the two circuits weighted by attribution: per node the smaller "
                              "of its two shares of |score|, summed, over the larger, summed (1: same nodes, same shares)")
    faithfulness_tolerance: float = Field(0.05, ge=0.0, lt=1.0, description="how far the stored circuit's faithfulness may drop (below 1)")
    keep_top: Index = Field(5, description="the baseline's strongest nodes that must all stay in the circuit (0: none)")

    @model_validator(mode="after")
    def _keep_fits(self) -> Stable:
        if self.nodes is not None and self.keep_top > self.nodes:
            raise ValueError(f"'keep_top' ({self.keep_top}) is more than 'nodes' ({self.nodes}): they could never all stay in it")
        return self


KINDS: dict[str, type[Claim]] = {
    "behaves": Behaves, "sparse": Sparse, "area": Area, "agrees_with_patching": AgreesWithPatching,
    "necessary": Necessary, "flips": Flips,
    "pinned": Pinned, "steers": Steers, "scales": Scales, "stable": Stable,
}


def _entry_model(kind: str, params: type[Strict]) -> type[Strict]:
    return type(kind.capitalize() + "Entry", (Strict,), {"__annotations__": {kind: params}, "__doc__": params.__doc__})


def _kind_of(entry: Any) -> str | None:
    if isinstance(entry, BaseModel):
        return next(iter(type(entry).model_fields))
    if isinstance(entry, dict) and len(entry) == 1:
        return next(iter(entry))
    return None


def _labels(entries: list) -> list[str]:
    kinds = [_kind_of(entry) for entry in entries]
    claims = [getattr(entry, kind) for entry, kind in zip(entries, kinds)]
    return [claim.id or (kind if kinds.count(kind) == 1 else f"{kind}-{claim.digest()}") for kind, claim in zip(kinds, claims)]


ExpectationEntry = Annotated[
    Union[tuple(Annotated[_entry_model(k, m), Tag(k)] for k, m in KINDS.items())],  # type: ignore[misc]
    Discriminator(_kind_of, custom_error_type="expectation_kind",
                  custom_error_message=f"must be one mapping whose key is one of {', '.join(KINDS)}"),
]


# --------------------------------------------------------------------------- the spec


class Spec(Strict):
    """A circuit spec: a named claim about models, checked as pytest items."""

    name: str = Field(pattern=NAME_PATTERN, max_length=200, description="used in test ids")
    description: str = Field("", description="what the circuit does, shown in reports")
    models: list[ModelName] = Field(
        min_length=1, description="registered names, hub ids with optional @revision, local directories or .gguf files "
        "inside the project (relative to the spec)"
    )
    markers: list[Literal["gpu", "slow"]] = Field([], description="pytest markers for every item of this spec")
    task: Task = Field(description="the data: see task below")
    trace: Trace = Field(Trace(), description="how to find the circuit: see trace below")
    expect: list[ExpectationEntry] = Field(min_length=1, description="claims, each a one-key mapping: see the kinds below")

    _path: Path = PrivateAttr(Path("<spec>"))
    _examples: tuple[PairedExample, ...] = PrivateAttr(())
    _lines: tuple[int, ...] = PrivateAttr(())  # the line of each claim in the spec file (none for a spec built in Python)

    @field_validator("models")
    @classmethod
    def _each_model_once(cls, models: list[str]) -> list[str]:
        twice = [name for i, name in enumerate(models) if name in models[:i]]
        if twice:
            raise ValueError(f"{twice[0]} is listed twice; list each model once")
        return models

    @property
    def path(self) -> Path:
        return self._path

    @property
    def examples(self) -> tuple[PairedExample, ...]:
        return self._examples

    @property
    def repeated(self) -> list[Repeat]:
        """Examples that repeat an earlier one: noted on every item (a held-out repeat of a training one is refused)."""
        return repeats(self._examples)

    @property
    def expectations(self) -> list[Expectation]:
        """The claims in order, each named as :class:`Claim` says: ``pinned``, ``pinned-3fa2c1``, or its ``id``."""
        return [Expectation(_kind_of(entry), getattr(entry, _kind_of(entry)), index, label,
                            self._lines[index] if index < len(self._lines) else None)
                for index, (entry, label) in enumerate(zip(self.expect, _labels(self.expect)))]

    @field_validator("expect")
    @classmethod
    def _names_differ(cls, expect: list) -> list:
        labels = _labels(expect)
        twice = next((label for i, label in enumerate(labels) if label in labels[:i]), None)
        if twice is not None:
            raise ValueError(f"two expectations are both named {twice!r} (test ids must differ): give one of them "
                             f"an id, e.g. {{id: {twice.split('-')[0]}-2, ...}}, or remove the repeated claim")
        return expect


@dataclass(frozen=True)
class Expectation:
    """One claim of a spec, e.g. ``sparse: {max_neurons: 100, min_faithfulness: 0.8}``."""

    kind: str
    params: Strict
    index: int  # position in the spec's ``expect`` list
    label: str  # the name in test ids and reports: the claim's id, its kind, or kind-DIGEST (see Claim)
    line: int | None = None  # where it is written in the spec file

    def where(self, path: Path) -> str:
        """``FILE:LINE`` of the claim (``FILE`` alone for a spec built in Python)."""
        return f"{path}:{self.line}" if self.line else str(path)


def json_schema() -> dict:
    """The JSON Schema of a spec file, for editors and ``circuit-tests schema``."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "circuit-tests spec"
    return schema


def reference_markdown() -> str:
    """Every field of a spec, with type, default and meaning: docs/spec-reference.md is this text."""
    lines = ["# Spec reference", "", "Generated from the schema by `circuit-tests schema --markdown`; do not edit by hand.", "",
             "Values are read as their type, never converted: `true` or `\"0.5\"` where a number is meant is an error, as is "
             "`1.0` where a whole number is; a whole number may be given where a float is meant (`min_accuracy: 1`).", ""]
    sections = [("Top level", Spec), ("task", Task), ("task.chat", Chat), ("trace", Trace)] + [(f"expect: `{k}`", m) for k, m in KINDS.items()]
    for title, model in sections:
        lines += [f"## {title}", "", " ".join((model.__doc__ or "").replace("``", "`").split()), "", "| field | type | default | meaning |", "|---|---|---|---|"]
        for name, info in model.model_fields.items():
            value = info.get_default(call_default_factory=True)
            value = value.model_dump() if isinstance(value, BaseModel) else value
            default = "required" if info.is_required() else f"`{json.dumps(value)}`"
            kind = _type_name(info.annotation)
            lines.append(f"| `{name}` | {kind} | {default} | {info.description or ''} |")
        lines.append("")
    lines += ["## Renamed fields", "", "These old names still work in this release, with a warning that names the spec file and "
              "the new name. Rename them: a later release drops them.", "", "| old name | new name |", "|---|---|"]
    lines += [f"| `{kind}.{old}` | `{kind}.{new}` |" for kind, model in KINDS.items() for old, new in model.RENAMED.items()]
    lines.append("")
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " or ".join(f"`{value}`" for value in args)
    if origin in (Union, UnionType):
        named = [_type_name(arg) for arg in args if arg is not type(None)]
        return "an expectation" if len(named) > 2 else " or ".join(named) + (" or null" if type(None) in args else "")
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in args)}]"
    return getattr(annotation, "__name__", str(annotation))


# --------------------------------------------------------------------------- loading


REMOTE_CODE = (
    "field 'trust_remote_code': no spec can let a checkpoint run its own code. Remove the field; the person running "
    "the suite allows a model by id with `--circuit-trust-remote-code=ORG/MODEL` (never a directory inside the project)."
)


def load_spec(path: Path, root: Path | None = None) -> Spec:
    """Read and validate a spec file; the spec and its data must lie under ``root`` (the project) when given."""
    try:
        text = read_text(path, None if root is None else [root], SPEC_LIMIT)
    except UnreadableInput as error:
        raise SpecError(f"{error}. A spec is a YAML file inside the project.") from None
    spec = spec_from_mapping(parse_yaml(text, path), path, root)
    spec._lines = _claim_lines(text)
    return spec


def _claim_lines(text: str) -> tuple[int, ...]:
    """The line (from 1) of each entry of the spec's ``expect`` list, read from the YAML node tree."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    for key, value in root.value if isinstance(root, yaml.MappingNode) else ():
        if key.value == "expect" and isinstance(value, yaml.SequenceNode):
            return tuple(item.start_mark.line + 1 for item in value.value)
    return ()


def parse_yaml(text: str, path: Path) -> object:
    """The YAML document in ``text``: safe tags only, no aliases, no duplicate keys, no lone surrogates, nested at most
    :data:`MAX_DEPTH` deep."""
    try:
        _check_events(text, path)
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 (a SafeLoader)
    except _Repeated as error:
        raise SpecError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        where = " ".join(str(error).replace('in "<unicode string>", ', "at ").split())
        raise SpecError(f"{path}: not valid YAML ({where}). Fix the syntax at the line shown.") from None


def _check_events(text: str, path: Path) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(f"{path}: nested more than {MAX_DEPTH} levels deep at line {event.start_mark.line + 1}; "
                                "a spec needs far fewer. Fix the brackets.")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.ScalarEvent) and has_surrogate(event.value):
            raise SpecError(f"{path}: line {event.start_mark.line + 1}: the text {quoted(event.value)}: {SURROGATE_FIX}.")


class _Repeated(Exception):
    """Part of a YAML file that repeats another: an alias, or a key given twice."""


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what hides or loses part of a spec: aliases and duplicate keys."""

    def compose_node(self, parent, index):  # type: ignore[no-untyped-def]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Repeated(f"line {event.start_mark.line + 1}: the alias *{event.anchor} repeats another part of the file, "
                            "which hides what a reviewer reads. Write the value out.")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        seen: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _Repeated(f"key {key!r} is given on line {seen[key].start_mark.line + 1} and again on line "
                                f"{key_node.start_mark.line + 1}; the second would silently replace the first. Keep one.")
            seen[key] = key_node
        return super().construct_mapping(node, deep)


def spec_from_mapping(raw: object, path: Path, root: Path | None = None) -> Spec:
    """Validate a spec given as a mapping; ``path`` is where it came from (data paths are relative to it)."""
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec is a mapping with keys {', '.join(Spec.model_fields)}; got {type(raw).__name__}.")
    if "trust_remote_code" in raw:
        raise SpecError(f"{path}: {REMOTE_CODE}")
    context: dict = {}
    try:
        spec = Spec.model_validate(raw, context=context)
    except ValidationError as error:
        raise SpecError(_describe(path, error)) from None
    for model, old, new in context.get("renamed", []):
        kind = next(kind for kind, params in KINDS.items() if params is model)
        warnings.warn(SpecFieldRenamed(f"{path}: field '{kind}.{old}' is now '{kind}.{new}' (it counts (layer, position, "
                                       f"neuron) nodes); the old name still works in this release. Rename it."), stacklevel=2)
    spec._path = path
    spec._examples = tuple(_examples(spec, path, root))
    for expectation in spec.expectations:
        if isinstance(expectation.params, Pinned) and expectation.params.circuit is not None:
            expectation.params._read = _circuit_file(expectation, path, root)
    return spec


def _circuit_file(expectation: Expectation, path: Path, root: Path | None) -> CircuitFile:
    """A pinned claim's circuit file, relative to the spec and inside the project."""
    field = f"field 'expect[{expectation.index}].pinned.circuit'"
    try:
        read = read_circuit(path.parent / expectation.params.circuit, None if root is None else [root])
    except SpecError as error:
        raise SpecError(f"{path}: {field}: {error} The path is relative to the spec file.") from None
    if expectation.params.nodes is not None and expectation.params.nodes > len(read.nodes):
        raise SpecError(f"{path}: field 'expect[{expectation.index}].pinned.nodes' asks for {expectation.params.nodes} "
                        f"nodes and {expectation.params.circuit} holds {len(read.nodes)}. Ask for fewer, or export more.")
    return read


def _examples(spec: Spec, path: Path, root: Path | None) -> list[PairedExample]:
    if spec.task.examples is not None:
        if not spec.task.examples:
            raise SpecError(f"{path}: field 'task.examples' is empty. Give at least one example.")
        return [parse_example(record, f"{path}: task.examples[{i}]") for i, record in enumerate(spec.task.examples)]
    dataset = path.parent / spec.task.dataset
    real = resolved(dataset)
    if root is not None and real is not None and not inside(real, [root]):
        raise SpecError(
            f"{path}: field 'task.dataset' points to {shown(real)}, outside the project {root}. "
            "Keep data inside the project (copy the file under fixtures/) so a spec cannot read arbitrary files."
        )
    try:
        return read_jsonl(dataset, None if root is None else [root])
    except SpecError as error:
        raise SpecError(f"{path}: field 'task.dataset': {error} The path is relative to the spec file.") from None


def _describe(path: Path, error: ValidationError) -> str:
    """One paragraph for every problem pydantic found: where, what, and how to fix it."""
    problems = []
    for problem in error.errors(include_url=False):
        field = _field_name(problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        problems.append(f"field '{field}': {message}{_fix(problem, field)}")
    count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
    return f"{path}: {count}: " + "; ".join(problems) + "."


def _field_name(loc: tuple) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts[-1] = f"{parts[-1]}[{part}]" if parts else f"[{part}]"
        elif part in KINDS and parts and parts[-1] == part:
            continue  # the discriminator's tag repeats the expectation's key
        else:
            parts.append(str(part))
    return ".".join(parts) or "the top level"


def _fix(problem: dict, field: str) -> str:
    kind, leaf = problem["type"], field.rsplit(".", 1)[-1]
    if kind == "extra_forbidden":
        return f" (remove '{leaf}' or fix its spelling; see `circuit-tests schema` for the allowed keys)"
    if kind == "missing":
        return f" (add '{leaf}')"
    if kind == "expectation_kind" and isinstance(problem["input"], dict):
        return f" (got {', '.join(map(repr, problem['input']))})"
    if kind == "literal_error":
        return ""  # pydantic already lists the allowed values
    if kind in ("int_type", "float_type") and isinstance(problem["input"], (bool, str, float)):  # strict: nothing converted
        wanted = "a whole number" if kind == "int_type" else "a number"
        return f" (got {problem['input']!r}; write {wanted}: true, false and quoted text are not numbers)"
    if "input" in problem and not isinstance(problem["input"], (dict, list)):
        return f" (got {problem['input']!r})"
    return ""
