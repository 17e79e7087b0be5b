"""The plugin's session object: test reports in (on the pytest-xdist controller too), outputs out, once.

Registered beside the :class:`~circuit_tests.spec.session.CircuitSession` it drives, as
pytest-benchmark registers its ``BenchmarkSession``. Under pytest-xdist, workers send the
baselines they recorded to the controller, which alone writes them and the reports, and fails
the run if any could not be written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from circuit_tests.spec.baselines import baseline_path
from circuit_tests.spec.report import PROPERTY, decode, github_annotations
from circuit_tests.spec.session import CircuitSession
from circuit_tests.text import printable

WORKER_OUTPUT = "circuit_tests_baselines"


class SessionHooks:
    """Feeds test reports to the session (on the xdist controller too) and finishes it once."""

    def __init__(self, config: pytest.Config, session: CircuitSession) -> None:
        self.config = config
        self.session = session

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        encoded = dict(report.user_properties).get(PROPERTY)
        if encoded is None or (report.when != "call" and not report.failed):
            return
        result = decode(encoded)
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


def _failure_text(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    lines = str(report.longrepr).splitlines()
    return "\n".join(line.strip() for line in lines[1:]) or "\n".join(lines)


