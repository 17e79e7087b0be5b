"""The pytest plugin: every (spec, model, expectation) in a YAML circuit spec is one test item.

This module is what pytest loads in every run of an environment where circuit-tests is
installed, so it imports nothing heavy: it declares the options, which files are specs, and the
fixtures for Python tests. torch, transformers and the circuit session start only when a run asks
for them (:func:`started`): at start-up when a ``--circuit-*`` option is given or pytest-xdist
will collect reports from workers, else when the first spec file is collected or a fixture used.
:mod:`~circuit_tests.plugin.hooks` then checks the options, makes the one
:class:`~circuit_tests.spec.session.CircuitSession` of the process, and registers the hooks that
feed it and finish it once; collection lives in :mod:`~circuit_tests.plugin.items`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from circuit_tests.model.loading import LoadedModel
    from circuit_tests.spec.session import CircuitSession
    from circuit_tests.spec.subject import Subject

SESSION = pytest.StashKey["CircuitSession"]()
# The options, declared once: any of them given starts the session at once (all default to a false value).
OPTIONS: tuple[tuple[str, dict], ...] = (
    ("--circuit-model", dict(action="append", default=[], metavar="NAME",
        help="run every spec against this model instead of the spec's own list (repeatable); "
        "a model given here that cannot be loaded fails")),
    ("--circuit-series", dict(action="append", default=[], metavar="CHECKPOINTS",
        help="run every spec against a training run's checkpoints, in order, and report the trend: a glob "
        "('ckpts/step-*', natural order), a comma-separated list, or a list file with one per line, given as "
        "--circuit-series=@FILE (one argument: pytest expands a separate @FILE itself) (repeatable)")),
    ("--circuit-ray", dict(nargs="?", const=True, default=None, metavar="ADDRESS",
        help="measure on a Ray cluster: an actor per checkpoint (no ADDRESS: start Ray on this machine); "
        "reports and baselines stay here")),
    ("--circuit-ray-gpus", dict(type=float, default=None, metavar="N",
        help="GPUs each checkpoint's actor holds under --circuit-ray (default: 1 for cuda, 0 for cpu; "
        "a fraction shares a GPU; with --circuit-device auto, the GPUs a checkpoint is sharded over)")),
    ("--circuit-areas", dict(action="store_true",
        help="measure MIB's faithfulness curve (top 0.1%% to 100%% of nodes) and its areas, CPR and CMD, for "
        "every spec and model, for the reports (one more curve of 10 sizes each)")),
    ("--circuit-graph", dict(type=int, default=0, metavar="N",
        help="draw the top N nodes of each spec's circuit as a graph in the reports: cards, edges, clusters "
        "(one backward pass per node; default 0, none)")),
    ("--circuit-summary", dict(metavar="PATH.md",
        help="write a Markdown summary of the run (default under GitHub Actions: $GITHUB_STEP_SUMMARY)")),
    ("--circuit-device", dict(default=None, metavar="DEVICE",
        help="cpu, cuda, cuda:N or auto (default: cpu; given explicitly, specs marked gpu run there too)")),
    ("--circuit-dtype", dict(default=None, metavar="DTYPE",
        help="float32, bfloat16 or float16 (default: float32 on cpu, bfloat16 on cuda)")),
    ("--circuit-update", dict(action="store_true", help="record each spec's circuit and metrics as its baseline")),
    ("--circuit-report", dict(metavar="PATH.html", help="write a self-contained HTML report")),
    ("--circuit-json", dict(metavar="PATH.json", help="write the report's data as JSON")),
    ("--circuit-strict", dict(action="store_true",
        help="a model that is not on this machine (hub id not in the local cache) fails instead of skipping")),
    ("--circuit-no-cache", dict(action="store_true", help="trace and measure again instead of reading cached traces and measurements")),
    ("--circuit-trust-remote-code", dict(action="append", default=[], metavar="MODEL",
        help="let this model run the code shipped with its checkpoint (a hub id, any revision, or id@revision; "
        "or a directory outside the project); repeatable. No spec can allow this.")),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("circuit-tests", "MLP-neuron circuit specs")
    for name, kwargs in OPTIONS:
        group.addoption(name, **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    for line in ("circuit: a test item collected from a YAML circuit spec",
                 "gpu: needs a CUDA device (skipped with a reason when there is none)",
                 "slow: loads a real model or runs long"):
        config.addinivalue_line("markers", line)
    if any(config.getoption(name.removeprefix("--").replace("-", "_")) for name, _ in OPTIONS) or _xdist_controller(config):
        started(config)  # the options are checked now, before anything runs; the controller gathers workers' results


def started(config: pytest.Config) -> CircuitSession:
    """The process's circuit session, started (options checked, torch imported) on first use."""
    if SESSION not in config.stash:
        from circuit_tests.plugin.hooks import start

        config.stash[SESSION] = start(config)
    return config.stash[SESSION]


def _xdist_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput") and bool(config.getoption("numprocesses", None) or config.getoption("tx", None))


def is_spec_path(path: Path) -> bool:
    """Spec files, as pytest collects them: YAML under a ``specs`` directory, or named ``circuit_*.yaml`` / ``*.circuit.yaml``."""
    if path.suffix not in (".yaml", ".yml"):
        return False
    return "specs" in path.parent.parts or path.name.startswith("circuit_") or path.stem.endswith(".circuit")


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Collector | None:
    if not is_spec_path(file_path):
        return None
    started(parent.config)
    from circuit_tests.plugin.items import SpecFile
    from circuit_tests.text import has_control, shown

    if has_control(str(file_path)):  # pytest prints a file's id raw (progress, summary): "x\n::error::" would be a line
        root = parent.config.rootpath
        where = file_path.relative_to(root) if file_path.is_relative_to(root) else file_path
        return SpecFile.from_parent(parent, path=file_path, name=shown(file_path.name), nodeid=shown(where.as_posix()))
    return SpecFile.from_parent(parent, path=file_path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a series run, spec items run checkpoint by checkpoint, so that one checkpoint is loaded at a time."""
    circuits = config.stash.get(SESSION, None)  # none started: no spec was collected
    if circuits is not None and circuits.options.series:
        from circuit_tests.plugin.items import in_series

        in_series(items, circuits.options.series)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under ``--circuit-ray``, every item that will run is sent to the cluster now, once deselection is done."""
    circuits = session.config.stash.get(SESSION, None)
    if circuits is not None and circuits.options.ray and not session.config.option.collectonly:
        from circuit_tests.plugin.hooks import send

        send(session)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and item.config.getoption("circuit_device") is None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("marked gpu and no CUDA device is visible (--circuit-device cpu runs it on the CPU anyway)")


# --------------------------------------------------------------------------- fixtures for Python tests


@pytest.fixture(scope="session")
def circuit_model(pytestconfig: pytest.Config):
    """``circuit_model(name)``: a loaded, frozen model, shared with the session's specs."""
    return started(pytestconfig).model


@pytest.fixture(scope="module")
def circuit_trace(pytestconfig: pytest.Config, request: pytest.FixtureRequest):
    """``circuit_trace(model, dataset=... or examples=..., trace={...})``: a traced
    :class:`~circuit_tests.spec.subject.Subject` (scores, circuit, curve, flip rates) built by the
    same machinery as a YAML spec. ``model`` is a name or what ``circuit_model`` gave; a relative
    ``dataset`` is read from the test file's directory. Subjects are shared by the whole session."""
    session = started(pytestconfig)
    where = request.path.parent

    def make(model: str | LoadedModel, trace: dict | None = None, **task) -> Subject:
        from circuit_tests.spec.schema import spec_from_mapping

        name = model if isinstance(model, str) else model.ref.name
        raw = {"name": "python", "models": [name], "task": task, "trace": trace or {},
               "expect": [{"behaves": {"min_accuracy": 1.0}}]}
        return session.subject(spec_from_mapping(raw, where / "python-api.yaml", pytestconfig.rootpath), model, from_command_line=True)

    return make
