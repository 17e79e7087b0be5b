"""The suite's power to catch a regression, itself under test.

Two checkpoints derived from SmolLM2 by ``fixtures/derive_checkpoints.py`` (seeded, cached): a
benign fine-tune on ordinary prose must pass the shipped SVA specs, a fine-tune on disagreeing
sentences must fail them, naming what broke. So must ``sva_simple_pinned``, the circuit exported
from the base model once and pinned, with no new trace. ``sva_within_rc`` is left out: its 100-node
faithfulness sits at the 0.8 line (0.81) and drops below it after any fine-tune we tried, benign
ones included (docs/regressions.md).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from circuit_tests.cli import main

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SPECS = ("sva_simple", "sva_nounpp", "sva_rc")
KINDS = ("behaves", "sparse", "area", "necessary", "flips", "stable")
PINNED = "sva_simple_pinned"  # one pinned claim: circuits/sva_simple.smollm2-135m-instruct.json


def _derive(kind: str) -> Path:
    spec = importlib.util.spec_from_file_location("derive_checkpoints", ROOT / "fixtures" / "derive_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.derive(kind)


@pytest.fixture(scope="module")
def benign() -> Path:
    return _derive("benign")


@pytest.fixture(scope="module")
def broken() -> Path:
    return _derive("broken")


@pytest.fixture
def project(pytester) -> pytest.Pytester:
    """A copy of the shipped SVA specs, their baselines and data, and the pinned circuit's spec and file."""
    (pytester.path / "specs").mkdir()
    for name in SPECS:
        for suffix in (".yaml", ".baseline.json"):
            shutil.copy(ROOT / "specs" / f"{name}{suffix}", pytester.path / "specs")
    shutil.copy(ROOT / "specs" / f"{PINNED}.yaml", pytester.path / "specs")
    shutil.copytree(ROOT / "circuits", pytester.path / "circuits")
    shutil.copytree(ROOT / "fixtures" / "sva", pytester.path / "fixtures" / "sva")
    return pytester


def test_a_benign_fine_tune_passes_and_reports_how_far_the_circuit_moved(project, benign):
    result = project.runpytest("specs", f"--circuit-model={benign}", "--circuit-json", "r.json", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(SPECS) * len(KINDS) + 1)
    rows = [row for row in json.loads((project.path / "r.json").read_text())["rows"] if row["spec"] != "sva-simple-pinned"]
    assert len(rows) == len(SPECS)
    for row in rows:
        assert 0.5 <= row["figures"]["overlap"] < 1.0, row["spec"]  # moved, yet within what the specs allow


def test_a_broken_fine_tune_fails_and_names_what_broke(project, broken):
    result = project.runpytest("specs", f"--circuit-model={broken}", "-p", "no:cacheprovider", "--circuit-report", "r.html")
    result.stdout.fnmatch_lines([  # the short summary, in collection order
        f"FAILED specs/{name}.yaml::{name.replace('_', '-')}::{kind}[[]*smollm2-broken*[]]*"
        for name in sorted(SPECS) for kind in ("behaves", "flips", "stable")
    ])
    result.stdout.fnmatch_lines(["*expected: accuracy >= 0.90*", "*measured: accuracy 0.*"])
    # The fine-tune lost the behaviour (sva_simple: 12 of 37 held-out examples right, mean logit difference -0.507), so
    # every circuit claim fails on that, with the figures, instead of measuring its circuit on noise.
    result.stdout.fnmatch_lines([f"FAILED specs/{PINNED}.yaml::sva-simple-pinned::pinned[[]*smollm2-broken*[]]*"])
    result.stdout.fnmatch_lines(["*expected: the behaviour that pinned is about: accuracy above chance (0.5) with 95% *",
                                 "*measured: * of 37 held-out examples answered right (accuracy 0.*; p = * that guessing *"])
    assert result.parseoutcomes()["failed"] >= len(SPECS) * 3
    assert "Traceback" not in result.stdout.str()
    assert "of 37 held-out examples answered right" in (project.path / "r.html").read_text()


def test_diff_shows_what_changed_in_the_circuit(broken, capsys):
    spec = ROOT / "specs" / "sva_simple.yaml"
    assert main(["diff", str(spec), "--models", "smollm2-135m-instruct", str(broken), "--top", "100"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "gained (" in out and "lost (" in out
    assert out.count("\n  + L") == 5 and out.count("\n  - L") == 5 and "promotes " in out  # cards of the first 5 each way
    gained = int(out.split("gained (")[1].split(")")[0])
    assert 0 < gained < 100  # the broken circuit shares some nodes with the base one, not all
