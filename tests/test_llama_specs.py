"""The paper's Llama-3.1-8B specs: they validate and collect here, and run end to end on a random
Llama with the same layers and neurons (32 x 14336) around a narrow residual stream."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from circuit_tests.model.loading import load_model
from circuit_tests.testing import scaled_llama_31_8b

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


@pytest.fixture(scope="module")
def scaled_llama(tmp_path_factory) -> Path:
    """A saved random Llama-3.1-8B-shaped checkpoint with SmolLM2's tokenizer (and its chat template)."""
    tokenizer = load_model("smollm2-135m-instruct").tokenizer
    path = tmp_path_factory.mktemp("llama-3.1-8b-scaled")
    scaled_llama_31_8b(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_they_run_end_to_end_on_a_scaled_down_random_llama(pytester, scaled_llama):
    """SmolLM2's tokenizer stands in for Llama's and splits more names: the two multi-hop specs drop 58% and 50%
    of their pairs with it. A copy of the specs allows that (max_dropped 0.6), so that every claim still runs."""
    for folder in ("specs/llama-3.1-8b", "fixtures/multihop", "fixtures/sva"):
        shutil.copytree(ROOT / folder, pytester.path / folder)
    for name in ("state_capitals.yaml", "texas_california.yaml"):
        path = pytester.path / "specs" / "llama-3.1-8b" / name
        path.write_text(path.read_text().replace("\n  seed: 0\n", "\n  seed: 0\n  max_dropped: 0.6\n", 1))
    report = pytester.path / "report.json"
    result = pytester.runpytest_subprocess("specs/llama-3.1-8b", f"--circuit-model={scaled_llama}", "--circuit-device", "cpu",
                                           "--circuit-json", str(report), "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert "errors" not in outcomes and "skipped" not in outcomes  # every expectation measured, none crashed
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == 4 * 4 + 3 + 3
    result.stdout.no_fnmatch_line("*Traceback*")
    rows = {row["spec"]: row for row in json.loads(report.read_text())["rows"]}
    assert len(rows) == 6 and all(row["figures"]["n_test"] > 0 for row in rows.values())
    texas = {r["expectation"]: r["message"] for r in rows["llama-texas-california"]["results"]}
    assert "measured: flip rate" in texas["pinned"] and "x0 -> x1" in texas["scales"]  # the paper's neurons, in range
    assert "note: 8 of 16 examples dropped for " in texas["pinned"] and rows["llama-texas-california"]["figures"]["n_dropped"] == 8
