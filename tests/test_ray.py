"""--circuit-ray: the same verdicts, figures, trends and baselines as one process; faults fail only what they touch.

Two shipped specs on SmolLM2, and tiny checkpoints with one spec, on a local Ray instance (one per module, started
here with its files in a temporary directory; the plugin joins it; the fault cases run pytest in processes of their own). The Ray cases skip where Ray is not installed (``pip install 'circuit-tests[ray]'``);
the option checks run everywhere."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from circuit_tests import cli
from circuit_tests.errors import BadOptionError
from circuit_tests.spec.distributed import LOCAL, TOKEN, Cluster, cluster
from circuit_tests.testing import save_tiny_checkpoint, tiny_agreement_pairs

try:  # imported here, once: pytester's in-process runs drop modules imported during them, and Ray cannot load twice
    import ray
except ImportError:
    ray = None

pytest_plugins = ["pytester"]
needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed: pip install 'circuit-tests[ray]'")
ROOT = Path(__file__).resolve().parents[1]

SPEC = """name: agree
models: [../a, ../b]
task: {dataset: ../data.jsonl, test_fraction: 0.5}
trace: {ablation: mean}
expect:
  - behaves: {min_accuracy: 0.6}
  - scales: {neurons: [[0, 1]], factors: [0, 1], max_change: 0.5, token: ' is'}
  - stable: {nodes: 20}
"""
KILL_ONE = """
import pytest, ray

@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    run = session.config.pluginmanager.get_plugin("circuit-tests-session").session.remote
    ray.kill(run.actors["../b"])  # one checkpoint's actor dies before it measures anything
"""
LOSE_THE_CLUSTER = """
import subprocess, pytest

@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    subprocess.run(["pkill", "-9", "-f", {where!r}])  # every process of the cluster, once the work is sent
"""


@pytest.fixture(autouse=True)
def not_an_xdist_worker(monkeypatch):
    """The runs here are the client; under `pytest -n`, this process's worker id would refuse --circuit-ray."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)


def test_the_gpus_of_an_actor_follow_the_device():
    assert cluster(LOCAL, "cpu", None) == Cluster(LOCAL, 0)
    assert cluster("auto", "cuda:3", None) == Cluster("auto", 1)
    assert cluster(LOCAL, "cuda", 0.5) == Cluster(LOCAL, 0.5)
    assert cluster(LOCAL, "auto", 4) == Cluster(LOCAL, 4)
    for device, gpus, says in [("cpu", 1, "asks for GPUs on --circuit-device cpu"), ("cuda", 2, "give --circuit-device auto"),
                               ("auto", None, "say how many with --circuit-ray-gpus"), ("cuda", 0, "0 < N <= 1")]:
        with pytest.raises(BadOptionError, match=says):
            cluster(LOCAL, device, gpus)


def test_ray_options_that_cannot_work_are_refused_before_anything_runs(pytester, capsys):
    pytester.makefile(".yaml", spec=SPEC)
    result = pytester.runpytest_inprocess("--circuit-ray-gpus", "1", "spec.yaml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--circuit-ray-gpus sets the GPUs of each Ray actor; give --circuit-ray too.*"])
    result = pytester.runpytest_inprocess("--circuit-ray", "--circuit-device", "auto", "spec.yaml")
    result.stderr.fnmatch_lines(["*--circuit-device auto on a Ray cluster shards*--circuit-ray-gpus N*"])
    save_tiny_checkpoint(pytester.path / "a")
    assert cli.main(["series", "spec.yaml", "--checkpoints", "a", "--matrix", "--ray"]) == 2
    assert "--matrix evaluates every checkpoint's circuit on every checkpoint in this process" in capsys.readouterr().err


@needs_ray
def test_a_cluster_that_is_not_there_is_a_usage_error(project):
    result = project.runpytest_inprocess("specs", "--circuit-ray", f"127.0.0.1:{_free_port()}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*could not reach the Ray cluster (nothing answers there). Start one with `ray start --head`*"])


@pytest.fixture(scope="module")
def ray_here():
    """A local Ray instance for the module; its address, and the environment another process needs to join it."""
    if ray is None:
        pytest.skip("Ray is not installed: pip install 'circuit-tests[ray]'")
    where = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TOKEN, os.urandom(16).hex())
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=where)
        yield ray.get_runtime_context().gcs_address
        ray.shutdown()
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def project(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("CIRCUIT_TESTS_CACHE", str(tmp_path / "cache"))
    save_tiny_checkpoint(pytester.path / "a", seed=0, taught=True)
    save_tiny_checkpoint(pytester.path / "b", seed=1, taught=True)
    pairs = tiny_agreement_pairs()  # the task the taught checkpoints do
    (pytester.path / "data.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    (pytester.path / "specs").mkdir()
    (pytester.path / "specs" / "agree.yaml").write_text(SPEC)
    return pytester


def _figures(path: Path) -> list:
    return [(row["model"], {k: v for k, v in row["figures"].items() if k != "timings"}, [r["outcome"] for r in row["results"]])
            for row in json.loads(path.read_text())["rows"]]


@pytest.mark.slow
def test_a_series_through_ray_has_the_same_trend(project, ray_here, monkeypatch):
    monkeypatch.chdir(project.path)
    save_tiny_checkpoint(project.path / "c", seed=2)
    run = ["series", "specs/agree.yaml", "--checkpoints", "a,b,c"]
    assert cli.main([*run, "--update"]) in (0, 1)
    assert cli.main([*run, "--json", "here.json"]) in (0, 1)
    assert cli.main([*run, "--json", "ray.json", "--ray", ray_here]) in (0, 1)
    here, remote = (json.loads((project.path / name).read_text()) for name in ("here.json", "ray.json"))
    assert [point["checkpoint"] for point in here["series"][0]["points"]] == ["a", "b", "c"]
    assert remote["series"] == here["series"]
    assert _figures(project.path / "ray.json") == _figures(project.path / "here.json")


@pytest.mark.slow
@needs_ray
def test_an_actor_that_dies_fails_its_checkpoints_items_only(project, tmp_path):
    project.runpytest_inprocess("specs", "--circuit-update").assert_outcomes(passed=6)
    project.makeconftest(KILL_ONE)
    cache, home = Path(tempfile.mkdtemp(prefix="ct", dir="/tmp")), tmp_path / "home"
    (cache / "ray").mkdir()
    (cache / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")  # a cluster `ray start` left: not joined
    env = {"CIRCUIT_TESTS_CACHE": str(cache), "HOME": str(home)}
    result = _pytest(project, env, "specs", "--circuit-ray")  # this process starts a local instance of its own
    assert result.returncode == 1, result.stdout
    assert "3 failed, 3 passed" in result.stdout
    assert "../b: the Ray actor measuring this checkpoint died" in result.stdout
    assert "../a" not in "".join(line for line in result.stdout.splitlines() if "actor" in line)
    assert (cache / "ray").is_dir() and not (home / ".ray").exists()  # Ray's files in the cache, its token never on disk
    shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.slow
@needs_ray
def test_a_lost_cluster_fails_the_run_and_keeps_the_baselines(project):
    project.runpytest_inprocess("specs", "--circuit-update").assert_outcomes(passed=6)
    baseline = (project.path / "specs" / "agree.baseline.json").read_bytes()
    where, port = tempfile.mkdtemp(prefix="ray", dir="/tmp"), _free_port()
    env = {TOKEN: os.urandom(16).hex(), "RAY_AUTH_MODE": "token"}  # what joining a cluster with token authentication needs
    command = Path(sys.executable).parent / "ray"
    subprocess.run([command, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    f"--temp-dir={where}"], env=os.environ | env, check=True, capture_output=True, timeout=120)
    try:
        project.makeconftest(LOSE_THE_CLUSTER.format(where=where))
        result = _pytest(project, env, "specs", "--circuit-update", "--circuit-ray", f"127.0.0.1:{port}")
    finally:
        subprocess.run(["pkill", "-9", "-f", where])
        shutil.rmtree(where, ignore_errors=True)
    assert result.returncode == 1, result.stdout
    assert "6 failed" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count("the connection to the Ray cluster was lost") >= 6
    assert (project.path / "specs" / "agree.baseline.json").read_bytes() == baseline


@pytest.mark.slow
def test_shipped_sva_specs_on_smollm2_give_the_same_figures_and_baselines_through_ray(pytester, ray_here):
    """Figures identical to one process; the client alone writes the baselines, byte for byte as one process does."""
    names = ("specs/sva_simple.yaml", "specs/sva_early_layers.yaml", "fixtures/sva/simple.jsonl")
    baselines = ("specs/sva_simple.baseline.json", "specs/sva_early_layers.baseline.json")
    for name in names + baselines:
        (pytester.path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, pytester.path / name)
    run = ("specs", "-k", "smollm2", "--circuit-strict", "--circuit-no-cache", "--circuit-update")
    pytester.runpytest_inprocess(*run, "--circuit-json", "here.json").assert_outcomes(passed=8, deselected=6)
    recorded = [(pytester.path / name).read_bytes() for name in baselines]
    for name in baselines:  # stable compares with the shipped file again, as the client reads it
        shutil.copy2(ROOT / name, pytester.path / name)
    remote = pytester.runpytest_inprocess(*run, "--circuit-json", "ray.json", "--circuit-ray")
    remote.assert_outcomes(passed=8, deselected=6)
    remote.stdout.fnmatch_lines_random([f"baseline written: *{name}" for name in baselines])  # by the client
    assert [(pytester.path / name).read_bytes() for name in baselines] == recorded
    assert _figures(pytester.path / "ray.json") == _figures(pytester.path / "here.json")


def _pytest(project, env: dict, *args: str) -> subprocess.CompletedProcess:
    """pytest in a process of its own (Ray's state and the plugin's stay out of this one)."""
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=project.path,
                          env=os.environ | env, capture_output=True, text=True, timeout=300)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
