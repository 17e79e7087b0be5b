"""The pytest plugin: every (spec, model, expectation) in a YAML circuit spec is one test item.

Collection follows pytest's documented YAML example: :func:`pytest_collect_file` turns a spec
file into a :class:`SpecFile`, which yields one :class:`SpecModel` collector per model, which
yields one :class:`ExpectationItem` per expectation. Node ids read
``specs/sva.yaml::sva-early-layers[smollm2-135m-instruct]::pinned``. Each model is loaded
once per session and each (spec, model) is prepared once, however many items use it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from circuit_tests.errors import CircuitTestsError, ModelNotAvailableError
from circuit_tests.expectations import Subject, check
from circuit_tests.models import LoadOptions, ModelCache
from circuit_tests.spec import Expectation, Spec, load_spec

SESSION = pytest.StashKey["CircuitSession"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("circuit-tests", "MLP-neuron circuit specs")
    group.addoption("--circuit-model", action="append", default=[], metavar="NAME",
                    help="run every spec against this model instead of the spec's own list (repeatable)")
    group.addoption("--circuit-device", default="cpu", metavar="DEVICE", help="cpu, cuda, cuda:N or auto (default: cpu)")
    group.addoption("--circuit-dtype", default=None, metavar="DTYPE",
                    help="float32, bfloat16 or float16 (default: float32 on cpu, bfloat16 on cuda)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "circuit: a test item collected from a YAML circuit spec")
    config.stash[SESSION] = CircuitSession(
        LoadOptions(device=config.getoption("circuit_device"), dtype=config.getoption("circuit_dtype"))
    )


def is_spec_path(path: Path) -> bool:
    """Spec files: YAML under a ``specs`` directory, or named ``circuit_*.yaml`` / ``*.circuit.yaml``."""
    if path.suffix not in (".yaml", ".yml"):
        return False
    return "specs" in path.parent.parts or path.name.startswith("circuit_") or path.stem.endswith(".circuit")


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Collector | None:
    return SpecFile.from_parent(parent, path=file_path) if is_spec_path(file_path) else None


class CircuitSession:
    """What one pytest session shares: loaded models, and each (spec, model) prepared once."""

    def __init__(self, options: LoadOptions) -> None:
        self.options = options
        self.models = ModelCache()
        self._subjects: dict[tuple[Path, str], Subject] = {}

    def subject(self, spec: Spec, model: str) -> Subject:
        key = (spec.path, model)
        if key not in self._subjects:
            self._subjects[key] = Subject(spec, self.models.get(model, self.options))
        return self._subjects[key]


class SpecFile(pytest.File):
    """A YAML spec; a spec that cannot be read becomes one failing item with the reason."""

    def collect(self):
        try:
            spec = load_spec(self.path)
        except CircuitTestsError as error:
            yield BrokenSpecItem.from_parent(self, name="spec", error=error)
            return
        for model in self.config.getoption("circuit_model") or spec.models:
            yield SpecModel.from_parent(self, name=f"{spec.name}[{model}]", spec=spec, model=model)


class SpecModel(pytest.Collector):
    """One spec on one model: the expectations as items."""

    def __init__(self, *, spec: Spec, model: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.model = model

    def collect(self):
        counts: dict[str, int] = {}
        for expectation in self.spec.expectations:
            counts[expectation.kind] = counts.get(expectation.kind, 0) + 1
            name = expectation.kind if counts[expectation.kind] == 1 else f"{expectation.kind}-{counts[expectation.kind]}"
            item = ExpectationItem.from_parent(self, name=name, expectation=expectation)
            item.add_marker("circuit")
            yield item


class ExpectationItem(pytest.Item):
    """One expectation of one spec on one model."""

    def __init__(self, *, expectation: Expectation, **kwargs) -> None:
        super().__init__(**kwargs)
        self.expectation = expectation

    def runtest(self) -> None:
        session: CircuitSession = self.config.stash[SESSION]
        try:
            subject = session.subject(self.parent.spec, self.parent.model)
        except ModelNotAvailableError as error:
            pytest.skip(str(error))
        outcome = check(subject, self.expectation)
        if not outcome.passed:
            raise ExpectationFailed(outcome.message)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        if isinstance(excinfo.value, (ExpectationFailed, CircuitTestsError)):
            return f"{self.nodeid}\n  {excinfo.value}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"{self.parent.name}::{self.name}"


class BrokenSpecItem(pytest.Item):
    """Stands for a spec file that could not be read, so the error shows as one failed item."""

    def __init__(self, *, error: CircuitTestsError, **kwargs) -> None:
        super().__init__(**kwargs)
        self.error = error

    def runtest(self) -> None:
        raise self.error

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        return f"invalid circuit spec: {self.error}"

    def reportinfo(self):
        return self.path, None, "spec"


class ExpectationFailed(Exception):
    """An expectation that did not hold; its message is the domain report."""
