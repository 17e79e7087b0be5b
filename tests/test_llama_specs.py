"""The paper's Llama-3.1-8B specs: they validate and collect here, and run end to end on a random
Llama with the same layers and neurons (32 x 14336) around a narrow residual stream."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs" / "llama-3.1-8b"


def test_they_collect_one_item_per_model_and_expectation(pytester):
    result = pytester.runpytest_inprocess(str(SPECS), "--collect-only", "-q")
    result.stdout.fnmatch_lines(["*sva_simple.yaml::llama-sva-simple::sparse[[]meta-llama/Llama-3.1-8B[]]",
                                 "*texas_california.yaml::llama-texas-california::pinned[[]meta-llama/Llama-3.1-8B-Instruct[]]",
                                 "38 tests collected*"])


def test_without_a_gpu_they_skip_saying_why(pytester):
    result = pytester.runpytest_inprocess(str(SPECS), "-rs", "-q")
    result.assert_outcomes(skipped=38)
    result.stdout.fnmatch_lines(["*marked gpu and no CUDA device is visible*"])


@pytest.mark.slow
def test_they_run_end_to_end_on_a_scaled_down_random_llama(monkeypatch, capsys, tmp_path):
    """Through ``ci/gpu_specs.py``'s CPU mode: the specs copied beside a random Llama-3.1-8B-shaped checkpoint
    (16 wide) saved with SmolLM2's tokenizer, which splits more names than Llama's: the two multi-hop specs
    drop 58% and 50% of their pairs with it, so the copy allows that (max_dropped 0.6) and every claim still runs."""
    script = ROOT / "ci" / "gpu_specs.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--device", "cpu", "--dtype", "float32", "--hidden-size", "16",
                                      "--json", str(tmp_path / "report.json")])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repository first
    runpy.run_path(str(script), run_name="__main__")  # the script here, its pytest in a process of its own
    report = json.loads(capsys.readouterr().out)
    assert not report["crashed"] and set(report["outcomes"]) <= {"passed", "failed"}  # every expectation measured, none crashed
    assert sum(report["outcomes"].values()) == 4 * 4 + 3 + 3
    assert len(report["specs"]) == 6 and all(spec["n_test"] > 0 for spec in report["specs"].values())
    rows = {row["spec"]: row for row in json.loads((tmp_path / "report.json").read_text())["rows"]}
    texas = {r["expectation"]: r["message"] for r in rows["llama-texas-california"]["results"]}
    # random weights do not do the task: the pinned claim is judged on the behaviour first (docs/method.md section 4)
    assert "held-out examples answered right" in texas["pinned"] and "x0 -> x1" in texas["scales"]  # the paper's neurons, in range
    assert "note: 8 of 16 examples dropped for " in texas["pinned"] and rows["llama-texas-california"]["figures"]["n_dropped"] == 8
