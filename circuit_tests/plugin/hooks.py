"""The plugin's session: started from the command line's options, fed test reports (on the pytest-xdist controller
too), its outputs written once.

:func:`start` checks the options (a bad one is a usage error before anything runs), sets the device policy
(one GPU per pytest-xdist worker, deterministic kernels) and makes the process's
:class:`~circuit_tests.spec.session.CircuitSession`, with the :class:`SessionHooks` that drive it registered
beside it, as pytest-benchmark registers its ``BenchmarkSession``. Under pytest-xdist, workers send the
baselines they recorded to the controller, which alone writes them and the reports, and fails the run if any
could not be written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from circuit_tests.errors import BadOptionError, CircuitTestsError
from circuit_tests.model.loading import LoadOptions, check_device, check_dtype, deterministic_cuda
from circuit_tests.model.references import check_trusted
from circuit_tests.model.series import expand_series, refuse_pytest_expansion
from circuit_tests.plugin import SESSION
from circuit_tests.plugin.items import ExpectationItem
from circuit_tests.spec.baselines import baseline_path
from circuit_tests.spec.distributed import LOCAL, cluster
from circuit_tests.spec.report import NOT_RUN, PROPERTY, decode, github_annotations, github_step_summary
from circuit_tests.spec.session import CircuitSession, RunOptions
from circuit_tests.spec.traces import default_trace_cache
from circuit_tests.text import has_control, printable, quoted, shown

WORKER_OUTPUT = "circuit_tests_baselines"
WORKER_HIDDEN = "circuit_tests_hidden"  # what a worker's foreign selection deselected, for the controller to report
# Options that deselect collected items (dest -> flag); one that did not come from the command line can hide a claim.
SELECTION = {"keyword": "-k", "markexpr": "-m", "deselect": "--deselect", "lf": "--lf"}
STOPPED = "the run stopped before this item ran (interrupted, or -x/--maxfail)"


class SessionHooks:
    """Feeds test reports to the session (on the xdist controller too) and finishes it once. A spec item that was
    collected and never run (the run was interrupted or stopped early), or deselected by a selection that did not come
    from the command line, is added to the report as :data:`~circuit_tests.spec.report.NOT_RUN`."""

    def __init__(self, config: pytest.Config, session: CircuitSession) -> None:
        self.config = config
        self.session = session
        self.waiting: dict[str, ExpectationItem] = {}  # node id -> a spec item to run that has not reported yet
        self.deselected: list[ExpectationItem] = []
        self.hidden: dict[tuple, dict] = {}  # (path, model, expectation) -> the payload of an item hidden from the run

    def pytest_deselected(self, items) -> None:
        self.deselected += [item for item in items if isinstance(item, ExpectationItem)]

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """What this process will run (the xdist controller collects nothing: its workers report)."""
        if not self.config.option.collectonly:
            self.waiting = {item.nodeid: item for item in session.items if isinstance(item, ExpectationItem)}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or report.when == "setup" and not report.passed:
            self.waiting.pop(report.nodeid, None)
        encoded = dict(report.user_properties).get(PROPERTY)
        if encoded is None or (report.when != "call" and not report.failed):
            return
        result = decode(encoded)
        message = result.get("message") if report.passed else _failure_text(report)
        self.session.report.add(result, report.outcome, message)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error) -> None:
        """pytest-xdist: a worker finished; take the baselines it recorded and the items it saw hidden (every worker
        collects, and deselects, the same items)."""
        output = getattr(node, "workeroutput", {})
        self.session.baselines.merge(output.get(WORKER_OUTPUT, {}))
        self._hide(output.get(WORKER_HIDDEN, []))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):  # a pytest-xdist worker: the controller writes
            self.config.workeroutput[WORKER_OUTPUT] = self.session.baselines.pending()
            self.config.workeroutput[WORKER_HIDDEN] = self._deselected_by_foreign_selection()
            return
        self._hide(self._deselected_by_foreign_selection())
        for item in self.waiting.values():
            self.session.report.add(self._planned(item), NOT_RUN, STOPPED)
        for hidden in self.hidden.values():
            self.session.report.add(hidden, NOT_RUN)
        self.session.finish()
        if (self.session.problems or self.hidden and self.session.options.strict) and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _deselected_by_foreign_selection(self) -> list[dict]:
        """The payloads, with why, of the spec items deselected by a selection that did not come from the command line
        (they fail a run under ``--circuit-strict``)."""
        foreign = selection_not_given(self.config) if self.deselected else []
        why = (f"deselected by {' '.join(foreign)}, which did not come from the command line (an ini file's addopts, or "
               "PYTEST_ADDOPTS). Give the selection on the command line; for a pull request, run pytest with a trusted "
               "-c FILE (docs/security.md).")
        return [self._planned(item) | {"message": why} for item in self.deselected] if foreign else []

    def _planned(self, item: ExpectationItem) -> dict:
        return self.session.planned(item.parent.spec, item.model, item.expectation)

    def _hide(self, payloads: list[dict]) -> None:
        self.hidden.update({(p["path"], p["model"], p["expectation"]): p for p in payloads})

    def pytest_terminal_summary(self, terminalreporter) -> None:
        for path in self.session.written:
            terminalreporter.write_line(f"baseline written: {shown(path)}")
        for problem in self.session.problems:
            terminalreporter.write_line(printable(f"NOT written: {problem}"), red=True)
        report = self.session.report
        if not report.rows:
            return
        for line in github_annotations(report, self.config.rootpath):  # each failure marked on its spec line in a pull request
            terminalreporter.write_line(line)
        terminalreporter.write_sep("=", "circuit specs")
        for line in report.terminal_lines():
            terminalreporter.write_line(line)
        for row in report.rows.values():
            if row.stale:
                terminalreporter.write_line(printable(
                    f"stale baseline entries in {baseline_path(Path(row.path))}: {', '.join(row.stale)} (models {Path(row.path).name} no "
                    "longer lists and this run did not test; delete them from the file, or list the models again)", one_line=True))


def selection_not_given(config: pytest.Config) -> list[str]:
    """The deselecting options (:data:`SELECTION`) in force that the command line itself did not give, as ``-k 'not x'``:
    they came from an ini file's ``addopts`` or ``PYTEST_ADDOPTS``, which a pull request may control."""
    given = config._parser.parse_known_args(list(config.invocation_params.args))  # the command line alone, as pytest parses it
    return [f"{flag} {printable(repr(getattr(config.option, dest)))}" for dest, flag in SELECTION.items()
            if getattr(config.option, dest, None) != getattr(given, dest, None)]


def start(config: pytest.Config) -> CircuitSession:
    """The process's circuit session, its hooks registered; a bad option is a usage error."""
    try:
        options = run_options(config)
    except CircuitTestsError as error:
        raise pytest.UsageError(printable(str(error))) from None
    if options.load.device != "cpu" and options.ray is None:
        deterministic_cuda()
    session = CircuitSession(options)
    config.pluginmanager.register(SessionHooks(config, session), "circuit-tests-session")
    return session


def run_options(config: pytest.Config) -> RunOptions:
    """The command line's choices, checked before anything runs."""
    device = config.getoption("circuit_device") or "cpu"
    ray = config.getoption("circuit_ray")
    ray = LOCAL if ray is True else ray  # --circuit-ray with no address
    check_device(device, available=ray is None)  # on a cluster, the GPUs are the workers'
    check_dtype(config.getoption("circuit_dtype"))
    trusted = tuple(config.getoption("circuit_trust_remote_code"))
    check_trusted(trusted, config.rootpath)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    series = config.getoption("circuit_series")
    refuse_pytest_expansion(config.invocation_params.args, "--circuit-series")
    if config.getoption("circuit_graph") < 0:
        raise BadOptionError(f"--circuit-graph {config.getoption('circuit_graph')}: give how many of each circuit's top nodes "
                             "to draw (0 draws none).")
    if ray and worker is not None:
        raise BadOptionError("--circuit-ray spreads the work over a Ray cluster; pytest-xdist (-n) cannot run beside it.")
    if ray is None and config.getoption("circuit_ray_gpus") is not None:
        raise BadOptionError("--circuit-ray-gpus sets the GPUs of each Ray actor; give --circuit-ray too.")
    for model in config.getoption("circuit_model"):
        if has_control(model):
            raise BadOptionError(f"--circuit-model {quoted(model)}: a model name is one line of printable text (test ids "
                                 "and messages print it). Give it without control characters or line breaks.")
    if series and config.getoption("circuit_model"):
        raise BadOptionError("--circuit-model and --circuit-series both choose the models to run; give one of them.")
    return RunOptions(
        project=config.rootpath,
        load=LoadOptions(worker_device(device, worker, torch.cuda.device_count()), config.getoption("circuit_dtype")),
        update=config.getoption("circuit_update"),
        strict=config.getoption("circuit_strict"),
        trace_cache=None if config.getoption("circuit_no_cache") else default_trace_cache(),
        trusted=trusted,
        html=_path(config, "circuit_report"),
        json=_path(config, "circuit_json"),
        summary=_path(config, "circuit_summary") or github_step_summary(),
        series=expand_series(series, config.invocation_params.dir),
        graph=config.getoption("circuit_graph"),
        areas=config.getoption("circuit_areas"),
        ray=None if ray is None else cluster(ray, device, config.getoption("circuit_ray_gpus")),
    )


def _path(config: pytest.Config, option: str) -> Path | None:
    value = config.getoption(option)
    return None if value is None else Path(value).absolute()


def worker_device(device: str, worker: str | None, n_gpus: int) -> str:
    """``cuda`` under pytest-xdist means one GPU per worker: worker ``gwN`` takes ``cuda:(N mod n_gpus)``."""
    if device != "cuda" or worker is None or n_gpus < 2:
        return device
    return f"cuda:{int(worker.removeprefix('gw')) % n_gpus}"


def send(session: pytest.Session) -> None:
    """``--circuit-ray``: every item that will run, sent to the cluster at once."""
    try:
        session.config.stash[SESSION].send([item.work for item in session.items if isinstance(item, ExpectationItem)])
    except CircuitTestsError as error:
        raise pytest.UsageError(printable(str(error))) from None


def _failure_text(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    lines = str(report.longrepr).splitlines()
    return "\n".join(line.strip() for line in lines[1:]) or "\n".join(lines)


