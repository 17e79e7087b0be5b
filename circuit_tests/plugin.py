"""The pytest plugin: every (spec, model, expectation) in a YAML circuit spec is one test item.

Collection follows pytest's documented YAML example: :func:`pytest_collect_file` turns a spec
file into a :class:`SpecFile`, which yields a :class:`SpecNode` for the spec, which yields one
:class:`ExpectationItem` per expectation and model, parametrized by the model the way pytest
parametrizes a test: ``specs/sva_simple.yaml::sva-simple::sparse[smollm2-135m-instruct]``.
(The model stays in the trailing brackets, where pytest reads parameters, so that node ids
given on the command line, ``--lf`` and ``--ff`` find the item.) A spec that cannot be read is
one failing :class:`BrokenSpecItem`; every other spec still runs.

A :class:`CircuitSession` loads each model once and prepares each (spec, model) once, however
many items use it; traces are also cached on disk. Baselines are written once at the end of
the session (``--circuit-update``), and the report is built from the test reports, so all of
this works under pytest-xdist (``-n 4 --dist loadfile`` keeps a spec's items on one worker).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from circuit_tests.baselines import BaselineStore, stale_entries
from circuit_tests.errors import CircuitTestsError, ModelNotAvailableError
from circuit_tests.evaluation import Subject, default_trace_cache
from circuit_tests.expectations import Outcome, check
from circuit_tests.models import LoadedModel, LoadOptions, ModelCache
from circuit_tests.report import PROPERTY, Report, payload
from circuit_tests.spec import Expectation, Spec, load_spec, spec_from_mapping

SESSION = pytest.StashKey["CircuitSession"]()
OOM_ADVICE = ("out of GPU memory. Try a smaller `task.batch_size`, `--circuit-dtype bfloat16`, or "
              "`--circuit-device auto` to shard the model over every visible GPU.")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("circuit-tests", "MLP-neuron circuit specs")
    group.addoption("--circuit-model", action="append", default=[], metavar="NAME",
                    help="run every spec against this model instead of the spec's own list (repeatable)")
    group.addoption("--circuit-device", default=None, metavar="DEVICE",
                    help="cpu, cuda, cuda:N or auto (default: cpu; given explicitly, specs marked gpu run there too)")
    group.addoption("--circuit-dtype", default=None, metavar="DTYPE",
                    help="float32, bfloat16 or float16 (default: float32 on cpu, bfloat16 on cuda)")
    group.addoption("--circuit-update", action="store_true", help="record each spec's circuit and metrics as its baseline")
    group.addoption("--circuit-report", metavar="PATH.html", help="write a self-contained HTML report")
    group.addoption("--circuit-json", metavar="PATH.json", help="write the report's data as JSON")
    group.addoption("--circuit-strict", action="store_true", help="a model that is not available fails instead of skipping")
    group.addoption("--circuit-no-cache", action="store_true", help="trace again instead of reading cached traces")


def pytest_configure(config: pytest.Config) -> None:
    if (config.getoption("circuit_device") or "cpu") != "cpu":
        deterministic_cuda()
    for line in ("circuit: a test item collected from a YAML circuit spec",
                 "gpu: needs a CUDA device (skipped with a reason when there is none)",
                 "slow: loads a real model or runs long"):
        config.addinivalue_line("markers", line)
    config.stash[SESSION] = CircuitSession(
        LoadOptions(device=worker_device(config.getoption("circuit_device") or "cpu", os.environ.get("PYTEST_XDIST_WORKER"),
                                         torch.cuda.device_count()), dtype=config.getoption("circuit_dtype")),
        BaselineStore(update=config.getoption("circuit_update")),
        None if config.getoption("circuit_no_cache") else default_trace_cache(),
    )
    config.pluginmanager.register(ReportCollector(config), "circuit-tests-report")


def deterministic_cuda() -> None:
    """Same spec, same checkpoint, same numbers on a GPU too: deterministic kernels where torch has them
    (``warn_only``: an op without one warns instead of failing), and cuBLAS's fixed workspace."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def worker_device(device: str, worker: str | None, n_gpus: int) -> str:
    """``cuda`` under pytest-xdist means one GPU per worker: worker ``gwN`` takes ``cuda:(N mod n_gpus)``."""
    if device != "cuda" or worker is None or n_gpus < 2:
        return device
    return f"cuda:{int(worker.removeprefix('gw')) % n_gpus}"


def is_spec_path(path: Path) -> bool:
    """Spec files: YAML under a ``specs`` directory, or named ``circuit_*.yaml`` / ``*.circuit.yaml``."""
    if path.suffix not in (".yaml", ".yml"):
        return False
    return "specs" in path.parent.parts or path.name.startswith("circuit_") or path.stem.endswith(".circuit")


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Collector | None:
    return SpecFile.from_parent(parent, path=file_path) if is_spec_path(file_path) else None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and not torch.cuda.is_available() and item.config.getoption("circuit_device") is None:
        pytest.skip("marked gpu and no CUDA device is visible (--circuit-device cpu runs it on the CPU anyway)")


class CircuitSession:
    """What one pytest session shares: loaded models, prepared (spec, model) subjects, baselines."""

    def __init__(self, options: LoadOptions, baselines: BaselineStore, trace_cache: Path | None) -> None:
        self.options = options
        self.baselines = baselines
        self.trace_cache = trace_cache
        self.models = ModelCache()
        self._subjects: dict[tuple[Path, str, str], Subject | CircuitTestsError] = {}
        self._recorded: set[tuple[Path, str]] = set()
        self.written: list[Path] = []  # baseline files, once the session has finished
        self.write_errors: list[str] = []

    def model(self, name: str, trust_remote_code: bool = False) -> LoadedModel:
        options = LoadOptions(self.options.device, self.options.dtype, trust_remote_code=trust_remote_code)
        return self.models.get(name, options)

    def subject(self, spec: Spec, model: str) -> Subject:
        """The prepared (spec, model); a failure to prepare is remembered, not retried per item."""
        key = (spec.path, spec.model_dump_json(), model)
        if key not in self._subjects:
            try:
                self._subjects[key] = Subject(spec, self.model(model, spec.trust_remote_code), self.trace_cache)
            except CircuitTestsError as error:
                self._subjects[key] = error
        found = self._subjects[key]
        if isinstance(found, CircuitTestsError):
            raise found
        return found

    def record_baseline(self, subject: Subject) -> None:
        key = (subject.spec.path, subject.loaded.ref.name)
        if self.baselines.update and key not in self._recorded:
            self.baselines.record(subject.spec, subject.loaded.ref.name, subject.baseline_entry())
            self._recorded.add(key)


class SpecFile(pytest.File):
    """A YAML spec; a spec that cannot be read becomes one failing item with the reason."""

    def collect(self):
        try:
            spec = load_spec(self.path, self.config.rootpath)
        except CircuitTestsError as error:
            yield BrokenSpecItem.from_parent(self, name="spec", error=error)
            return
        yield SpecNode.from_parent(self, name=spec.name, spec=spec)


class SpecNode(pytest.Collector):
    """One spec: an item per (model, expectation), grouped by model so a model's items run together."""

    def __init__(self, *, spec: Spec, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec = spec

    def collect(self):
        expectations = self.spec.expectations
        for model in self.config.getoption("circuit_model") or self.spec.models:
            for expectation in expectations:
                item = ExpectationItem.from_parent(self, name=f"{expectation.label}[{model}]", model=model, expectation=expectation)
                for marker in ("circuit", *self.spec.markers):
                    item.add_marker(marker)
                yield item


class ExpectationItem(pytest.Item):
    """One expectation of one spec on one model."""

    def __init__(self, *, model: str, expectation: Expectation, parent: SpecNode, **kwargs) -> None:
        super().__init__(parent=parent, nodeid=_parametrized_id(parent, expectation.label, model), **kwargs)
        self.model = model
        self.expectation = expectation

    def runtest(self) -> None:
        session: CircuitSession = self.config.stash[SESSION]
        spec, model = self.parent.spec, self.model
        result = payload(spec.name, model, spec.path, self.expectation.label)
        self.user_properties.append((PROPERTY, result))
        try:
            subject = session.subject(spec, model)
            outcome = check(subject, self.expectation, session.baselines)
            session.record_baseline(subject)
        except ModelNotAvailableError as error:
            if self.config.getoption("circuit_strict"):
                raise
            pytest.skip(str(error))
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise CircuitTestsError(f"{spec.path}: {model}: {OOM_ADVICE}") from None
        result.update(message=outcome.message, figures=subject.figures() | outcome.figures)
        if not outcome.passed:
            raise ExpectationFailed(outcome)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        if isinstance(excinfo.value, (ExpectationFailed, CircuitTestsError)):
            return f"{self.parent.name}::{self.name}\n{_indent(str(excinfo.value))}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"{self.parent.name}::{self.name}"


def _parametrized_id(parent: pytest.Collector, name: str, param: str):
    """The node id of ``name[param]`` as pytest builds a parametrized test's, so ``--lf`` can match it.

    pytest 9 keeps ids structured (``NodeId``) and reads the trailing ``[...]`` of a stored id as
    the parameters; pytest 8's string id ``parent::name[param]`` is what the default gives.
    """
    structured = getattr(parent, "id", None)
    return None if structured is None else structured.child(name).with_params(param)


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

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.message)
        self.outcome = outcome


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# --------------------------------------------------------------------------- reporting


class ReportCollector:
    """Builds the report from test reports (on the xdist controller too) and writes it at the end."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.report = Report()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        result = dict(report.user_properties).get(PROPERTY)
        if result is None or (report.when != "call" and not report.failed):
            return
        self.report.add(result, report.outcome, result.get("message") if report.passed else _failure_text(report))

    def pytest_sessionfinish(self) -> None:
        if hasattr(self.config, "workerinput"):
            return  # the controller writes the reports
        if self.config.getoption("circuit_report"):
            self.report.write_html(Path(self.config.getoption("circuit_report")))
        if self.config.getoption("circuit_json"):
            self.report.write_json(Path(self.config.getoption("circuit_json")))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        session: CircuitSession = self.config.stash[SESSION]
        for path in session.written:
            terminalreporter.write_line(f"baseline written: {path}")
        for error in session.write_errors:
            terminalreporter.write_line(f"baseline NOT written: {error}", red=True)
        if not self.report.rows:
            return
        terminalreporter.write_sep("=", "circuit specs")
        for line in self.report.terminal_lines():
            terminalreporter.write_line(line)
        for path in sorted({row.path for row in self.report.rows.values()}):
            stale = stale_entries(Path(path))
            if stale:
                terminalreporter.write_line(f"stale baseline entries in {path}: {', '.join(stale)} (models the spec no longer lists)")


def _failure_text(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    lines = str(report.longrepr).splitlines()
    return "\n".join(line.strip() for line in lines[1:]) or "\n".join(lines)


def pytest_sessionfinish(session: pytest.Session) -> None:
    circuit_session = session.config.stash[SESSION]
    circuit_session.written, circuit_session.write_errors = circuit_session.baselines.flush()


# --------------------------------------------------------------------------- fixtures for Python tests


@pytest.fixture(scope="session")
def circuit_model(pytestconfig: pytest.Config):
    """``circuit_model(name)``: a loaded, frozen model, shared with the session's specs."""
    session: CircuitSession = pytestconfig.stash[SESSION]
    return session.model


@pytest.fixture(scope="session")
def circuit_trace(pytestconfig: pytest.Config):
    """``circuit_trace(model, dataset=... or examples=..., trace={...})``: a traced
    :class:`~circuit_tests.evaluation.Subject` (scores, circuit, curve, flip rates) built by the
    same machinery as a YAML spec; ``dataset`` is relative to the rootdir."""
    session: CircuitSession = pytestconfig.stash[SESSION]
    root = pytestconfig.rootpath

    def make(model: str, trace: dict | None = None, **task) -> Subject:
        raw = {"name": "python", "models": [model], "task": task, "trace": trace or {},
               "expect": [{"behaves": {"min_accuracy": 0.0}}]}
        return session.subject(spec_from_mapping(raw, root / "python-api.yaml", root), model)

    return make
