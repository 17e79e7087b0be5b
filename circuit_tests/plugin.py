"""The pytest plugin: every (spec, model, expectation) in a YAML circuit spec is one test item.

Collection follows pytest's documented YAML example: :func:`pytest_collect_file` turns a spec
file into a :class:`SpecFile`, which yields a :class:`SpecNode` for the spec, which yields one
:class:`ExpectationItem` per expectation and model, parametrized by the model the way pytest
parametrizes a test: ``specs/sva_simple.yaml::sva-simple::sparse[smollm2-135m-instruct]``.
(The model stays in the trailing brackets, where pytest reads parameters, so that node ids
given on the command line, ``--lf`` and ``--ff`` find the item.) A spec that cannot be read is
one failing :class:`BrokenSpecItem`; every other spec still runs.

One :class:`~circuit_tests.session.CircuitSession` per pytest process does the work; the
:class:`SessionHooks` registered beside it feed it test reports and finish it once. Under
pytest-xdist, workers send the baselines they recorded to the controller, which alone writes
them and the reports, and fails the run if any could not be written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from circuit_tests.errors import CircuitTestsError
from circuit_tests.evaluation import Subject, default_trace_cache
from circuit_tests.models import LoadOptions, check_device, check_dtype, check_trusted
from circuit_tests.report import PROPERTY, payload
from circuit_tests.session import CircuitSession, RunOptions
from circuit_tests.spec import Expectation, Spec, load_spec, spec_from_mapping
from circuit_tests.untrusted import printable

SESSION = pytest.StashKey[CircuitSession]()
WORKER_OUTPUT = "circuit_tests_baselines"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("circuit-tests", "MLP-neuron circuit specs")
    group.addoption("--circuit-model", action="append", default=[], metavar="NAME",
                    help="run every spec against this model instead of the spec's own list (repeatable); "
                         "a model given here that cannot be loaded fails")
    group.addoption("--circuit-device", default=None, metavar="DEVICE",
                    help="cpu, cuda, cuda:N or auto (default: cpu; given explicitly, specs marked gpu run there too)")
    group.addoption("--circuit-dtype", default=None, metavar="DTYPE",
                    help="float32, bfloat16 or float16 (default: float32 on cpu, bfloat16 on cuda)")
    group.addoption("--circuit-update", action="store_true", help="record each spec's circuit and metrics as its baseline")
    group.addoption("--circuit-report", metavar="PATH.html", help="write a self-contained HTML report")
    group.addoption("--circuit-json", metavar="PATH.json", help="write the report's data as JSON")
    group.addoption("--circuit-strict", action="store_true",
                    help="a model that is not on this machine (hub id not in the local cache) fails instead of skipping")
    group.addoption("--circuit-no-cache", action="store_true", help="trace again instead of reading cached traces")
    group.addoption("--circuit-trust-remote-code", action="append", default=[], metavar="MODEL",
                    help="let this model run the code shipped with its checkpoint (a hub id, any revision, or id@revision; "
                         "or a directory outside the project); repeatable. No spec can allow this.")


def pytest_configure(config: pytest.Config) -> None:
    for line in ("circuit: a test item collected from a YAML circuit spec",
                 "gpu: needs a CUDA device (skipped with a reason when there is none)",
                 "slow: loads a real model or runs long"):
        config.addinivalue_line("markers", line)
    try:
        options = run_options(config)
    except CircuitTestsError as error:
        raise pytest.UsageError(printable(str(error))) from None
    if options.load.device != "cpu":
        deterministic_cuda()
    session = CircuitSession(options)
    config.stash[SESSION] = session
    config.pluginmanager.register(SessionHooks(config, session), "circuit-tests-session")


def run_options(config: pytest.Config) -> RunOptions:
    """The command line's choices, checked before anything runs."""
    device = config.getoption("circuit_device") or "cpu"
    check_device(device)
    check_dtype(config.getoption("circuit_dtype"))
    trusted = tuple(config.getoption("circuit_trust_remote_code"))
    check_trusted(trusted, config.rootpath)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    return RunOptions(
        project=config.rootpath,
        load=LoadOptions(worker_device(device, worker, torch.cuda.device_count()), config.getoption("circuit_dtype")),
        update=config.getoption("circuit_update"),
        strict=config.getoption("circuit_strict"),
        trace_cache=None if config.getoption("circuit_no_cache") else default_trace_cache(),
        trusted=trusted,
        html=_path(config, "circuit_report"),
        json=_path(config, "circuit_json"),
    )


def _path(config: pytest.Config, option: str) -> Path | None:
    value = config.getoption(option)
    return None if value is None else Path(value).absolute()


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


# --------------------------------------------------------------------------- collection


class SpecFile(pytest.File):
    """A YAML spec; a spec that cannot be read becomes one failing item with the reason."""

    def collect(self):
        try:
            spec = load_spec(self.path, self.config.rootpath)
        except CircuitTestsError as error:
            yield BrokenSpecItem.from_parent(self, name="spec", message=str(error))
            return
        except Exception as error:  # noqa: BLE001 -- one unreadable spec must never stop the session
            yield BrokenSpecItem.from_parent(self, name="spec", message=(
                f"{self.path}: circuit-tests failed while reading this spec ({type(error).__name__}: {error}). "
                "This is a bug in circuit-tests; please report it with the spec."))
            return
        yield SpecNode.from_parent(self, name=spec.name, spec=spec)


class SpecNode(pytest.Collector):
    """One spec: an item per (model, expectation), grouped by model so a model's items run together."""

    def __init__(self, *, spec: Spec, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec = spec

    def collect(self):
        given = list(dict.fromkeys(self.config.getoption("circuit_model")))
        for model in given or self.spec.models:
            for expectation in self.spec.expectations:
                item = ExpectationItem.from_parent(self, name=f"{expectation.label}[{model}]", model=model,
                                                   expectation=expectation, from_command_line=bool(given))
                for marker in ("circuit", *self.spec.markers):
                    item.add_marker(marker)
                yield item


class ExpectationItem(pytest.Item):
    """One expectation of one spec on one model."""

    def __init__(self, *, model: str, expectation: Expectation, from_command_line: bool, parent: SpecNode, **kwargs) -> None:
        super().__init__(parent=parent, nodeid=_parametrized_id(parent, expectation.label, model), **kwargs)
        self.model = model
        self.expectation = expectation
        self.from_command_line = from_command_line

    def runtest(self) -> None:
        session = self.config.stash[SESSION]
        spec = self.parent.spec
        verdict = session.check(spec, self.model, self.expectation, self.from_command_line)
        result = payload(spec.name, self.model, spec.path, self.expectation.label, spec.description) | {
            "message": verdict.message, "figures": verdict.figures, "stale": session.stale(spec)}
        self.user_properties.append((PROPERTY, result))
        if verdict.status == "skipped":
            pytest.skip(printable(verdict.message))
        if verdict.status == "failed":
            raise ExpectationFailed(verdict.message)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        if isinstance(excinfo.value, ExpectationFailed):
            return printable(f"{self.parent.name}::{self.name}\n{_indent(str(excinfo.value))}")
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

    def __init__(self, *, message: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.message = message

    def runtest(self) -> None:
        self.user_properties.append((PROPERTY, payload(self.path.name, "-", self.path, "spec") | {"message": self.message}))
        raise ExpectationFailed(self.message)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None) -> str:
        return printable(f"invalid circuit spec: {self.message}")

    def reportinfo(self):
        return self.path, None, "spec"


class ExpectationFailed(Exception):
    """An expectation that did not hold (or could not be checked); its message is the domain report."""


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# --------------------------------------------------------------------------- the session's hooks


class SessionHooks:
    """Feeds test reports to the session (on the xdist controller too) and finishes it once."""

    def __init__(self, config: pytest.Config, session: CircuitSession) -> None:
        self.config = config
        self.session = session

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        result = dict(report.user_properties).get(PROPERTY)
        if result is None or (report.when != "call" and not report.failed):
            return
        message = result.get("message") if report.passed else _failure_text(report)
        self.session.report.add(result, report.outcome, message)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        """pytest-xdist: a worker finished; take the baselines it recorded."""
        self.session.baselines.merge(getattr(node, "workeroutput", {}).get(WORKER_OUTPUT, {}))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):  # a pytest-xdist worker: the controller writes
            self.config.workeroutput[WORKER_OUTPUT] = self.session.baselines.pending()
            return
        self.session.finish()
        if self.session.problems and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        for path in self.session.written:
            terminalreporter.write_line(f"baseline written: {path}")
        for problem in self.session.problems:
            terminalreporter.write_line(printable(f"NOT written: {problem}"), red=True)
        report = self.session.report
        if not report.rows:
            return
        terminalreporter.write_sep("=", "circuit specs")
        for line in report.terminal_lines():
            terminalreporter.write_line(line)
        for row in report.rows.values():
            if row.stale:
                terminalreporter.write_line(printable(
                    f"stale baseline entries in {row.path}: {', '.join(row.stale)} (models the spec no longer lists)", one_line=True))


def _failure_text(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    lines = str(report.longrepr).splitlines()
    return "\n".join(line.strip() for line in lines[1:]) or "\n".join(lines)


# --------------------------------------------------------------------------- fixtures for Python tests


@pytest.fixture(scope="session")
def circuit_model(pytestconfig: pytest.Config):
    """``circuit_model(name)``: a loaded, frozen model, shared with the session's specs."""
    return pytestconfig.stash[SESSION].model


@pytest.fixture(scope="session")
def circuit_trace(pytestconfig: pytest.Config):
    """``circuit_trace(model, dataset=... or examples=..., trace={...})``: a traced
    :class:`~circuit_tests.evaluation.Subject` (scores, circuit, curve, flip rates) built by the
    same machinery as a YAML spec; ``dataset`` is relative to the rootdir."""
    session = pytestconfig.stash[SESSION]
    root = pytestconfig.rootpath

    def make(model: str, trace: dict | None = None, **task) -> Subject:
        raw = {"name": "python", "models": [model], "task": task, "trace": trace or {},
               "expect": [{"behaves": {"min_accuracy": 1.0}}]}
        return session.subject(spec_from_mapping(raw, root / "python-api.yaml", root), model, from_command_line=True)

    return make
