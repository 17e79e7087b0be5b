"""One run of circuit specs, whether driven by pytest or by ``circuit-tests run``.

A :class:`CircuitSession` loads each model once, prepares each (spec, model) once, checks an
expectation to a :class:`Verdict` (passed, failed with the reason, or skipped with the reason),
records baselines, and at the end writes baselines and reports once (:meth:`CircuitSession.finish`).
A verdict's figures carry the stored baseline the report compares the run with.
Every way a check can go wrong becomes a verdict with one readable paragraph; nothing here
decides how a verdict is shown.

Who may skip: only a model that is well named but not on this machine (a hub id missing from
the local Hugging Face cache, a registered model whose package is not installed), only when it
came from a spec, and never with ``strict``. A model given on the command line that cannot be
loaded is a failure: the person running the suite asked for exactly that model.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from circuit_tests.errors import CircuitTestsError, ModelNotAvailableError, SpecError
from circuit_tests.model.loading import LoadedModel, LoadOptions, ModelCache
from circuit_tests.model.nodes import Node
from circuit_tests.model.references import parse_model_ref, remote_code_allowed
from circuit_tests.model.series import Checkpoint
from circuit_tests.progress import Countdown, about
from circuit_tests.spec.baselines import BaselineStore, entry_for, model_key
from circuit_tests.spec.distributed import Cluster, RayRun, Work
from circuit_tests.spec.expectations import check
from circuit_tests.spec.figures import BaselineFigures
from circuit_tests.spec.report import Report, payload
from circuit_tests.spec.schema import Expectation, Spec
from circuit_tests.spec.subject import Subject
from circuit_tests.spec.trend import circuit_of, watched

OOM_ADVICE = ("out of GPU memory. Try a smaller `task.batch_size`, `--circuit-dtype bfloat16`, or "
              "`--circuit-device auto` to shard the model over every visible GPU.")


@dataclass(frozen=True)
class RunOptions:
    """What the person running the suite chose (a pull request controls none of it)."""

    project: Path  # specs, data, baselines and spec-named checkpoints must lie inside it
    load: LoadOptions = LoadOptions()
    update: bool = False  # record baselines
    strict: bool = False  # a model that is not on this machine fails instead of skipping
    trace_cache: Path | None = None
    trusted: tuple[str, ...] = ()  # model ids allowed to run their own code
    html: Path | None = None
    json: Path | None = None
    summary: Path | None = None  # a Markdown summary (GitHub Actions' job summary)
    series: tuple[Checkpoint, ...] = ()  # the checkpoints of a training run, in order: models loaded one at a time
    graph: int = 0  # draw the top N nodes of each spec's circuit as a graph in the reports (0: none)
    areas: bool = False  # measure MIB's curve and its areas (CPR, CMD) for every spec, for the reports
    ray: Cluster | None = None  # measure on a Ray cluster, an actor per checkpoint; None: in this process


@dataclass(frozen=True)
class Verdict:
    """The result of one expectation on one model, with the figures measured on the way."""

    status: Literal["passed", "failed", "skipped"]
    message: str
    figures: dict = field(default_factory=dict)


class CircuitSession:
    """What one run shares: loaded models, prepared subjects, baselines and the report."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self.baselines = BaselineStore(update=options.update)
        self.report = Report(options.series)
        self.models = ModelCache()
        self._subjects: dict[tuple, Subject | CircuitTestsError] = {}
        self._recorded: set[tuple[Path, str]] = set()
        self.tested: set[tuple[Path, str]] = set()  # (spec, baseline key) of every model a spec ran on
        self.remote: RayRun | None = None  # under options.ray, the actors measuring each checkpoint
        self.written: list[Path] = []  # baseline files, once finished
        self.problems: list[str] = []  # outputs that could not be written, once finished
        self.countdown = Countdown([checkpoint.name for checkpoint in options.series])

    def model(self, name: str, spec: Spec | None = None) -> LoadedModel:
        """A loaded model: named in ``spec`` (relative to it, inside the project) or, without one, on the command line."""
        project = self.options.project
        ref = parse_model_ref(name, spec.path.parent, project) if spec is not None else parse_model_ref(name)
        trusted = remote_code_allowed(ref, self.options.trusted, project)
        load = LoadOptions(self.options.load.device, self.options.load.dtype, trust_remote_code=trusted)
        return self.models.get(ref, load)

    def subject(self, spec: Spec, model: str | LoadedModel, from_command_line: bool = False) -> Subject:
        """The prepared (spec, model), the model named or already loaded; a failure to prepare is remembered, not retried."""
        key = (spec.path, spec.model_dump_json(), model if isinstance(model, str) else id(model), from_command_line)
        if key not in self._subjects:
            self._let_go_of_other_checkpoints(model)
            try:
                loaded = model if isinstance(model, LoadedModel) else self.model(model, None if from_command_line else spec)
                self._subjects[key] = Subject(spec, loaded, self.options.trace_cache)
            except CircuitTestsError as error:
                self._subjects[key] = error
        found = self._subjects[key]
        if isinstance(found, CircuitTestsError):
            raise found
        return found

    def _let_go_of_other_checkpoints(self, model: str | LoadedModel) -> None:
        """In a series, a checkpoint about to load replaces the others: their subjects and weights are dropped, so
        memory stays flat however long the series (its items run checkpoint by checkpoint)."""
        series = {checkpoint.name for checkpoint in self.options.series}
        if not isinstance(model, str) or model not in series:
            return
        others = series - {model}
        for key in [key for key in self._subjects if key[2] in others]:
            del self._subjects[key]
        if self.models.release(others):
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def send(self, works: Sequence[Work]) -> None:
        """Under ``options.ray``, send every check the run will ask for to the cluster now, an actor per checkpoint."""
        if self.remote is None:
            self.remote = RayRun(self.options.ray)
        self.remote.submit(self.options, works, self.baselines)

    def check(self, spec: Spec, model: str, expectation: Expectation, from_command_line: bool = False) -> Verdict:
        """Check one expectation; every error becomes a failed (or, for a missing hub model, skipped) verdict. Progress
        names the spec and the checkpoint (:mod:`circuit_tests.progress`)."""
        self.countdown.reached(model)
        with about(f"{spec.name} on {model}"):
            return self._check(spec, model, expectation, from_command_line)

    def _check(self, spec: Spec, model: str, expectation: Expectation, from_command_line: bool) -> Verdict:
        if self.remote is not None:
            return self._checked_remotely(Work(spec, model, expectation, from_command_line))
        subject = None
        try:
            subject = self.subject(spec, model, from_command_line)
            self.tested.add((spec.path, model_key(subject)))
            outcome = check(subject, expectation, self.baselines)
            self._record(subject)
            if self.options.graph:
                subject.graph(self.options.graph)
            if self.options.areas:  # both rankings, for the pair MIB's tables print
                subject.area("absolute")
                subject.area("signed")
        except ModelNotAvailableError as error:
            may_skip = not (self.options.strict or from_command_line)
            return Verdict("skipped" if may_skip else "failed", str(error) if may_skip else f"{error}{_why_not_skipped(from_command_line)}")
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return Verdict("failed", f"{spec.path}: {model}: {OOM_ADVICE}", self._figures(subject))
        except CircuitTestsError as error:
            return Verdict("failed", str(error), self._figures(subject))
        message = outcome.message + (f"\nnote: {subject.drop_summary}" if subject.dropped else "") + _repeat_note(spec)
        return Verdict("passed" if outcome.passed else "failed", message, self._figures(subject))

    def _checked_remotely(self, work: Work) -> Verdict:
        """The verdict an actor gave, with the baseline entries it recorded and the keys it tested taken in."""
        try:
            verdict, pending, tested = self.remote.result(work)
        except CircuitTestsError as error:
            return Verdict("failed", str(error))
        self.baselines.merge(pending)
        self.tested.update((Path(path), key) for path, key in tested)
        return verdict

    def planned(self, spec: Spec, model: str, expectation: Expectation) -> dict:
        """What one expectation carries to the report before any verdict: where it is written and what it watches
        (as it stands for an item the run never measured, :data:`~circuit_tests.spec.report.NOT_RUN`)."""
        return payload(spec.name, model, spec.path, expectation.label, spec.description, expectation.line) | {
            "watches": watched(expectation)}

    def result(self, spec: Spec, model: str, expectation: Expectation, verdict: Verdict) -> dict:
        """What one checked expectation carries to the report (and, under pytest, to its JUnit property)."""
        return self.planned(spec, model, expectation) | {"message": verdict.message, "figures": verdict.figures,
                                                          "stale": self.stale(spec)}

    def cross_faithfulness(self, spec: Spec, names: Sequence[str]) -> None:
        """Into the report: ``[a][b]``, the faithfulness on checkpoint ``b`` of the circuit checkpoint ``a``'s row holds
        (None where either is missing). Overlap can stay high while faithfulness moves; this shows it. Each
        checkpoint loads once more, and the matrix costs one circuit's curve per pair: meant for a short series."""
        rows = [self.report.rows.get((str(spec.path), name)) for name in names]
        circuits = [circuit_of(row.figures) if row and row.figures and row.figures.circuit else None for row in rows]
        matrix: list[list[float | None]] = [[None] * len(names) for _ in names]
        for b, name in enumerate(names):
            try:
                subject = self.subject(spec, name, from_command_line=True)
            except CircuitTestsError:  # its verdicts already say why
                continue
            for a, circuit in enumerate(circuits):
                if circuit is not None:
                    matrix[a][b] = subject.faithfulness_curve(circuit, [len(circuit)], complement=False).faithfulness[0]
        self.report.matrices[str(spec.path)] = matrix

    def stale(self, spec: Spec) -> list[str]:
        """Models in the spec's baseline file that it no longer lists, and that this run did not test it on."""
        return [name for name in self.baselines.stale(spec) if (spec.path, name) not in self.tested]

    def _figures(self, subject: Subject | None) -> dict:
        """The subject's figures as plain data, with the stored baseline the report compares them with."""
        if subject is None:
            return {}
        subject.figures.stored_baseline = self._stored_baseline(subject)
        return subject.figures.to_json()

    def _stored_baseline(self, subject: Subject) -> BaselineFigures | None:
        """The entry ``stable`` compares with by default (this model's, else the spec's first model's) beside this run;
        None without one, or when the file is damaged (``stable`` reports that)."""
        try:
            found = self.baselines.entry(subject.spec, model_key(subject))
        except SpecError:
            return None
        return None if found is None else baseline_figures(*found, subject)

    def _record(self, subject: Subject) -> None:
        key = (subject.spec.path, model_key(subject))
        if self.baselines.update and key not in self._recorded:
            self.baselines.record(subject.spec, key[1], entry_for(subject))
            self._recorded.add(key)

    def finish(self) -> None:
        """Write the baselines, then each report; one output failing never costs another."""
        if self.remote is not None:
            self.remote.shutdown()
        self.written, self.problems = self.baselines.flush()
        outputs = ((self.options.html, self.report.write_html), (self.options.json, self.report.write_json),
                   (self.options.summary, self.report.write_markdown))
        for path, write in outputs:
            if path is None:
                continue
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write(path)
            except OSError as error:
                self.problems.append(f"{path}: the report could not be written ({error.strerror or error}).")


def _repeat_note(spec: Spec) -> str:
    """"note: 3 of 40 examples repeat an earlier one (FILE:LINE repeats FILE:LINE; ...)", the first three named; "" for none."""
    found = spec.repeated
    if not found:
        return ""
    shown = "; ".join(map(str, found[:3])) + ("; ..." if len(found) > 3 else "")
    return f"\nnote: {len(found)} of {len(spec.examples)} examples repeat an earlier one ({shown}); each counts again in the figures"


def _why_not_skipped(from_command_line: bool) -> str:
    if from_command_line:
        return " (given on the command line, so it fails instead of skipping)"
    return " (--circuit-strict: a model that is not available fails)"


def baseline_figures(name: str, entry: dict, subject: Subject) -> BaselineFigures:
    """A stored entry's faithfulness by size, and where the subject's top nodes rank in its circuit: compared node by
    node only for a model of the same shape whose positions count the same way (``trace.align``)."""
    faithfulness = {int(size): float(value) for size, value in entry["metrics"]["faithfulness"].items()
                    if size.isdecimal() and int(size) > 0}
    top = [_node(row) for row in subject.figures.top]
    if entry.get("shape") not in (None, subject.shape) or entry.get("align", "start") != subject.spec.trace.align or not top:
        return BaselineFigures(name, faithfulness)
    stored = [_node(row) for row in entry["circuit"]]
    rank = {node: index for index, node in reversed(list(enumerate(stored, 1)))}  # a node listed twice: its first rank
    lost = [[*node, index] for index, node in enumerate(stored[:len(top)], 1) if node not in top]
    return BaselineFigures(name, faithfulness, [rank.get(node) for node in top], lost)


def _node(row: list) -> Node:
    """(layer, position, neuron) of a ``[layer, position, neuron, score]`` row, as integers (a baseline file may hold "3")."""
    layer, position, neuron = row[:3]
    return int(layer), None if position is None else int(position), int(neuron)
