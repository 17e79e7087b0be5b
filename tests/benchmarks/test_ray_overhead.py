"""What --circuit-ray costs against one process: the shipped specs on CPU, both measured from scratch.

Each run is pytest in a process of its own over ``specs/`` (SmolLM2 and Gemma 3 270M, ``--circuit-no-cache``, so
every trace is measured); the Ray run starts a local instance with an actor per checkpoint. Both must give the same
figures. Target: under 15% more wall time. It runs the shipped specs twice (about 8 minutes on 2 cores), so it runs
only when measuring: ``pytest tests/benchmarks/test_ray_overhead.py --benchmark-enable``; figures in
docs/benchmarks.md. tests/test_ray.py checks the same figures on two SmolLM2 specs in every run of the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
WAYS = {"one-process": [], "ray": ["--circuit-ray"]}


@pytest.fixture(scope="module")
def runs() -> dict:
    return {}


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.benchmark(group="ray-overhead-shipped-specs-cpu")
def test_shipped_specs(benchmark, way, runs, tmp_path):
    if benchmark.disabled:
        pytest.skip("runs the shipped specs twice (about 8 minutes): measure with --benchmark-enable")
    pytest.importorskip("ray")
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pytest", "specs", "-q", "-p", "no:cacheprovider", "--circuit-strict",
               "--circuit-no-cache", "--circuit-json", str(report), *WAYS[way]]
    started = time.perf_counter()
    done = benchmark.pedantic(subprocess.run, (command,), {"cwd": ROOT, "capture_output": True, "text": True},
                              rounds=1, iterations=1)
    assert done.returncode == 0, done.stdout[-3000:]
    runs[way] = (time.perf_counter() - started, _figures(report))
    if len(runs) == len(WAYS):
        (alone, here), (remote, there) = runs["one-process"], runs["ray"]
        assert there == here
        benchmark.extra_info["overhead"] = remote / alone - 1
        print(f"one process {alone:.1f} s, Ray {remote:.1f} s: {remote / alone - 1:+.1%}")


def _figures(path: Path) -> list:
    rows = json.loads(path.read_text())["rows"]
    return [(row["spec"], row["model"], {k: v for k, v in row["figures"].items() if k != "timings"},
             [result["outcome"] for result in row["results"]]) for row in rows]
