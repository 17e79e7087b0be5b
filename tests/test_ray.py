"""--circuit-ray: the same verdicts, figures and baselines as one process; an actor that dies fails its items only.

A local Ray instance (started by the plugin), two tiny checkpoints, one spec. Skipped where Ray is not installed
(``pip install 'circuit-tests[ray]'``)."""

from __future__ import annotations

import json

import pytest

from circuit_tests.testing import save_tiny_checkpoint

pytest.importorskip("ray")
pytest_plugins = ["pytester"]
pytestmark = pytest.mark.slow

SPEC = """name: agree
models: [../a, ../b]
task: {dataset: ../data.jsonl, test_fraction: 0.5}
trace: {ablation: mean}
expect:
  - behaves: {min_accuracy: 0.1}
  - sparse: {max_nodes: 300, min_faithfulness: 0.5}
  - stable: {nodes: 20}
"""
KILL_ONE = """
import ray

def pytest_collection_finish(session):
    run = session.config.pluginmanager.get_plugin("circuit-tests-session").session.remote
    ray.kill(run.actors["../b"])  # one checkpoint's actor dies before it measures anything
"""


@pytest.fixture
def project(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("CIRCUIT_TESTS_CACHE", str(tmp_path / "cache"))
    save_tiny_checkpoint(pytester.path / "a", seed=0)
    save_tiny_checkpoint(pytester.path / "b", seed=1)
    pairs = [{"clean_prefix": f"The {noun} near the key", "patch_prefix": f"The {noun}s near the key",
              "clean_answer": " is", "patch_answer": " are"} for noun in ("author", "baker", "farmer", "doctor", "pilot")] * 4
    (pytester.path / "data.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    (pytester.path / "specs").mkdir()
    (pytester.path / "specs" / "agree.yaml").write_text(SPEC)
    yield pytester
    import ray

    ray.shutdown()


def _figures(path):
    return [(row["model"], {k: v for k, v in row["figures"].items() if k != "timings"}, [r["outcome"] for r in row["results"]])
            for row in json.loads(path.read_text())["rows"]]


def test_a_ray_run_gives_what_one_process_gives_and_only_the_client_writes_baselines(project):
    baseline = project.path / "specs" / "agree.baseline.json"
    here = project.runpytest_inprocess("specs", "--circuit-update", "--circuit-no-cache", "--circuit-json", "here.json")
    here.assert_outcomes(passed=6)
    recorded = baseline.read_bytes()
    baseline.unlink()
    remote = project.runpytest_inprocess("specs", "--circuit-update", "--circuit-no-cache", "--circuit-ray", "--circuit-json", "ray.json")
    remote.assert_outcomes(passed=6)
    assert baseline.read_bytes() == recorded  # written once, by the client, from the actors' entries
    assert _figures(project.path / "ray.json") == _figures(project.path / "here.json")
    compared = project.runpytest_inprocess("specs", "--circuit-no-cache", "--circuit-ray")  # stable reads the stored file
    compared.assert_outcomes(passed=6)


def test_an_actor_that_dies_fails_its_checkpoints_items_only(project):
    project.runpytest_inprocess("specs", "--circuit-update").assert_outcomes(passed=6)
    project.makeconftest(KILL_ONE)
    result = project.runpytest_subprocess("specs", "--circuit-ray")  # a process of its own: Ray's and the plugin's state
    result.assert_outcomes(passed=3, failed=3)
    result.stdout.fnmatch_lines(["*../b: the Ray actor measuring this checkpoint died*the others go on*"])
    assert "../a" not in "".join(line for line in result.stdout.lines if "actor" in line)
