"""One run of circuit specs, whether driven by pytest or by ``circuit-tests run``.

A :class:`CircuitSession` loads each model once, prepares each (spec, model) once, checks an
expectation to a :class:`Verdict` (passed, failed with the reason, or skipped with the reason),
records baselines, and at the end writes baselines and reports once (:meth:`CircuitSession.finish`).
Every way a check can go wrong becomes a verdict with one readable paragraph; nothing here
decides how a verdict is shown.

Who may skip: only a model that is well named but not on this machine (a hub id missing from
the local Hugging Face cache, a registered model whose package is not installed), only when it
came from a spec, and never with ``strict``. A model given on the command line that cannot be
loaded is a failure: the person running the suite asked for exactly that model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from circuit_tests.errors import CircuitTestsError, ModelNotAvailableError
from circuit_tests.model.loading import LoadedModel, LoadOptions, ModelCache
from circuit_tests.model.references import parse_model_ref, remote_code_allowed
from circuit_tests.spec.baselines import BaselineStore, entry_for
from circuit_tests.spec.expectations import check
from circuit_tests.spec.report import Report
from circuit_tests.spec.schema import Expectation, Spec
from circuit_tests.spec.subject import Subject

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
        self.report = Report()
        self.models = ModelCache()
        self._subjects: dict[tuple, Subject | CircuitTestsError] = {}
        self._recorded: set[tuple[Path, str]] = set()
        self.written: list[Path] = []  # baseline files, once finished
        self.problems: list[str] = []  # outputs that could not be written, once finished

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
            try:
                loaded = model if isinstance(model, LoadedModel) else self.model(model, None if from_command_line else spec)
                self._subjects[key] = Subject(spec, loaded, self.options.trace_cache)
            except CircuitTestsError as error:
                self._subjects[key] = error
        found = self._subjects[key]
        if isinstance(found, CircuitTestsError):
            raise found
        return found

    def check(self, spec: Spec, model: str, expectation: Expectation, from_command_line: bool = False) -> Verdict:
        """Check one expectation; every error becomes a failed (or, for a missing hub model, skipped) verdict."""
        subject = None
        try:
            subject = self.subject(spec, model, from_command_line)
            outcome = check(subject, expectation, self.baselines)
            self._record(subject)
        except ModelNotAvailableError as error:
            may_skip = not (self.options.strict or from_command_line)
            return Verdict("skipped" if may_skip else "failed", str(error) if may_skip else f"{error}{_why_not_skipped(from_command_line)}")
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return Verdict("failed", f"{spec.path}: {model}: {OOM_ADVICE}", _figures(subject))
        except CircuitTestsError as error:
            return Verdict("failed", str(error), _figures(subject))
        message = outcome.message + (f"\nnote: {subject.drop_summary}" if subject.dropped else "")
        return Verdict("passed" if outcome.passed else "failed", message, subject.figures.to_json())

    def stale(self, spec: Spec) -> list[str]:
        """Models in the spec's baseline file that it no longer lists."""
        return self.baselines.stale(spec)

    def _record(self, subject: Subject) -> None:
        key = (subject.spec.path, subject.loaded.ref.name)
        if self.baselines.update and key not in self._recorded:
            self.baselines.record(subject.spec, subject.loaded.ref.name, entry_for(subject))
            self._recorded.add(key)

    def finish(self) -> None:
        """Write the baselines, then each report; one output failing never costs another."""
        self.written, self.problems = self.baselines.flush()
        for path, write in ((self.options.html, self.report.write_html), (self.options.json, self.report.write_json)):
            if path is None:
                continue
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write(path)
            except OSError as error:
                self.problems.append(f"{path}: the report could not be written ({error.strerror or error}).")


def _why_not_skipped(from_command_line: bool) -> str:
    if from_command_line:
        return " (given on the command line, so it fails instead of skipping)"
    return " (--circuit-strict: a model that is not available fails)"


def _figures(subject: Subject | None) -> dict:
    return {} if subject is None else subject.figures.to_json()
