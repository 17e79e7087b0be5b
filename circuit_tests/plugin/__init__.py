"""The pytest plugin: every (spec, model, expectation) in a YAML circuit spec is one test item.

This module holds the plugin's options, the checks of those options at start-up, the device
policy (one GPU per pytest-xdist worker, deterministic kernels) and the fixtures for Python tests.
Collection lives in :mod:`~circuit_tests.plugin.items`; one
:class:`~circuit_tests.spec.session.CircuitSession` per pytest process does the work, driven by
the :class:`~circuit_tests.plugin.hooks.SessionHooks` registered beside it, which finish it once.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from circuit_tests.errors import BadOptionError, CircuitTestsError
from circuit_tests.model.loading import LoadedModel, LoadOptions, check_device, check_dtype, deterministic_cuda
from circuit_tests.model.references import check_trusted
from circuit_tests.model.series import expand_series
from circuit_tests.plugin.hooks import SessionHooks
from circuit_tests.plugin.items import SESSION, ExpectationItem, SpecFile, in_series
from circuit_tests.spec.distributed import LOCAL, cluster
from circuit_tests.spec.report import github_step_summary
from circuit_tests.spec.schema import is_spec_path, spec_from_mapping
from circuit_tests.spec.session import CircuitSession, RunOptions
from circuit_tests.spec.subject import Subject
from circuit_tests.spec.traces import default_trace_cache
from circuit_tests.text import printable


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("circuit-tests", "MLP-neuron circuit specs")
    group.addoption("--circuit-model", action="append", default=[], metavar="NAME",
                    help="run every spec against this model instead of the spec's own list (repeatable); "
                         "a model given here that cannot be loaded fails")
    group.addoption("--circuit-series", action="append", default=[], metavar="CHECKPOINTS",
                    help="run every spec against a training run's checkpoints, in order, and report the trend: a glob "
                         "('ckpts/step-*', natural order), a comma-separated list, or @FILE with one per line (repeatable)")
    group.addoption("--circuit-ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
                    help="measure on a Ray cluster: an actor per checkpoint (no ADDRESS: start Ray on this machine); "
                         "reports and baselines stay here")
    group.addoption("--circuit-ray-gpus", type=float, default=None, metavar="N",
                    help="GPUs each checkpoint's actor holds under --circuit-ray (default: 1 for cuda, 0 for cpu; "
                         "a fraction shares a GPU; with --circuit-device auto, the GPUs a checkpoint is sharded over)")
    group.addoption("--circuit-areas", action="store_true",
                    help="measure MIB's faithfulness curve (top 0.1%% to 100%% of nodes) and its areas, CPR and CMD, for "
                         "every spec and model, for the reports (one more curve of 10 sizes each)")
    group.addoption("--circuit-graph", type=int, default=0, metavar="N",
                    help="draw the top N nodes of each spec's circuit as a graph in the reports: cards, edges, clusters "
                         "(one backward pass per node; default 0, none)")
    group.addoption("--circuit-summary", metavar="PATH.md",
                    help="write a Markdown summary of the run (default under GitHub Actions: $GITHUB_STEP_SUMMARY)")
    group.addoption("--circuit-device", default=None, metavar="DEVICE",
                    help="cpu, cuda, cuda:N or auto (default: cpu; given explicitly, specs marked gpu run there too)")
    group.addoption("--circuit-dtype", default=None, metavar="DTYPE",
                    help="float32, bfloat16 or float16 (default: float32 on cpu, bfloat16 on cuda)")
    group.addoption("--circuit-update", action="store_true", help="record each spec's circuit and metrics as its baseline")
    group.addoption("--circuit-report", metavar="PATH.html", help="write a self-contained HTML report")
    group.addoption("--circuit-json", metavar="PATH.json", help="write the report's data as JSON")
    group.addoption("--circuit-strict", action="store_true",
                    help="a model that is not on this machine (hub id not in the local cache) fails instead of skipping")
    group.addoption("--circuit-no-cache", action="store_true", help="trace and measure again instead of reading cached traces and measurements")
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
    if options.load.device != "cpu" and options.ray is None:
        deterministic_cuda()
    session = CircuitSession(options)
    config.stash[SESSION] = session
    config.pluginmanager.register(SessionHooks(config, session), "circuit-tests-session")


def run_options(config: pytest.Config) -> RunOptions:
    """The command line's choices, checked before anything runs."""
    device = config.getoption("circuit_device") or "cpu"
    ray = config.getoption("circuit_ray")
    check_device(device, available=ray is None)  # on a cluster, the GPUs are the workers'
    check_dtype(config.getoption("circuit_dtype"))
    trusted = tuple(config.getoption("circuit_trust_remote_code"))
    check_trusted(trusted, config.rootpath)
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    series = config.getoption("circuit_series")
    if config.getoption("circuit_graph") < 0:
        raise BadOptionError(f"--circuit-graph {config.getoption('circuit_graph')}: give how many of each circuit's top nodes "
                             "to draw (0 draws none).")
    if ray and worker is not None:
        raise BadOptionError("--circuit-ray spreads the work over a Ray cluster; pytest-xdist (-n) cannot run beside it.")
    if ray is None and config.getoption("circuit_ray_gpus") is not None:
        raise BadOptionError("--circuit-ray-gpus sets the GPUs of each Ray actor; give --circuit-ray too.")
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


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> pytest.Collector | None:
    return SpecFile.from_parent(parent, path=file_path) if is_spec_path(file_path) else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a series run, spec items run checkpoint by checkpoint, so that one checkpoint is loaded at a time."""
    series = config.stash[SESSION].options.series
    if series:
        in_series(items, series)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under ``--circuit-ray``, every item that will run is sent to the cluster now, once deselection is done."""
    circuits = session.config.stash[SESSION]
    if circuits.options.ray and not session.config.option.collectonly:
        try:
            circuits.send([item.work for item in session.items if isinstance(item, ExpectationItem)])
        except CircuitTestsError as error:
            raise pytest.UsageError(printable(str(error))) from None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and not torch.cuda.is_available() and item.config.getoption("circuit_device") is None:
        pytest.skip("marked gpu and no CUDA device is visible (--circuit-device cpu runs it on the CPU anyway)")


# --------------------------------------------------------------------------- fixtures for Python tests


@pytest.fixture(scope="session")
def circuit_model(pytestconfig: pytest.Config):
    """``circuit_model(name)``: a loaded, frozen model, shared with the session's specs."""
    return pytestconfig.stash[SESSION].model


@pytest.fixture(scope="module")
def circuit_trace(pytestconfig: pytest.Config, request: pytest.FixtureRequest):
    """``circuit_trace(model, dataset=... or examples=..., trace={...})``: a traced
    :class:`~circuit_tests.spec.subject.Subject` (scores, circuit, curve, flip rates) built by the
    same machinery as a YAML spec. ``model`` is a name or what ``circuit_model`` gave; a relative
    ``dataset`` is read from the test file's directory. Subjects are shared by the whole session."""
    session = pytestconfig.stash[SESSION]
    where = request.path.parent

    def make(model: str | LoadedModel, trace: dict | None = None, **task) -> Subject:
        name = model.ref.name if isinstance(model, LoadedModel) else model
        raw = {"name": "python", "models": [name], "task": task, "trace": trace or {},
               "expect": [{"behaves": {"min_accuracy": 1.0}}]}
        return session.subject(spec_from_mapping(raw, where / "python-api.yaml", pytestconfig.rootpath), model, from_command_line=True)

    return make
