"""The suite's power to catch a regression, itself under test.

Two checkpoints derived from SmolLM2 by ``fixtures/derive_checkpoints.py`` (seeded, cached): a
benign fine-tune on ordinary prose must pass the shipped SVA specs, a fine-tune on disagreeing
sentences must fail them, naming what broke. So must ``sva_simple_pinned``, the circuit exported
from the base model once and pinned, with no new trace. ``sva_within_rc`` is left out: its 100-node
faithfulness sits at the 0.8 line (0.81) and drops below it after any fine-tune we tried, benign
ones included (docs/regressions.md).

The graded set (``derive_checkpoints.graded()``): each lesion of a spec's circuit must fail that spec, each
benign change must pass every SVA spec, and each must fail exactly the claims docs/regressions.md's table
names (``fixtures/regression_power.py`` measures it and rewrites the table).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

from circuit_tests.cli import main

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SPECS = ("sva_simple", "sva_nounpp", "sva_rc")
KINDS = ("behaves", "sparse", "area", "necessary", "flips", "stable")
PINNED = "sva_simple_pinned"  # one pinned claim: circuits/sva_simple.smollm2-135m-instruct.json


def _fixture(name: str) -> ModuleType:
    """``fixtures/<name>.py``, imported (once: a second import would be a second module of the same name)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "fixtures" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


derived, power = _fixture("derive_checkpoints"), _fixture("regression_power")
GRADED = derived.graded()  # name -> (kind, lesioned spec, what derives it): each derived once, cached on disk
TESTED_ELSEWHERE = "benign"  # the benign fine-tune: test_a_benign_fine_tune_passes_and_reports_how_far_the_circuit_moved


@pytest.fixture(scope="module")
def benign() -> Path:
    return derived.derive("benign")


@pytest.fixture(scope="module")
def broken() -> Path:
    return derived.derive("broken")


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
    documented = [power.documented()[(TESTED_ELSEWHERE, spec)] for spec in SPECS]
    assert documented == [()] * len(SPECS), f"docs/regressions.md says {documented}: run {power.COMMAND}"


def test_the_graded_table_lists_the_graded_set_and_names_what_catches_each_lesion():
    table = power.documented()
    assert set(table) == {(name, spec) for name, (kind, lesioned, _) in GRADED.items() for spec in power.specs_for(kind, lesioned)}
    unmeasured = sorted(key for key, failed in table.items() if failed is None)
    assert not unmeasured, f"docs/regressions.md has not measured {unmeasured}: run {power.COMMAND}"
    assert all(table[(name, lesioned)] for name, (kind, lesioned, _) in GRADED.items() if kind == "lesion")


@pytest.mark.parametrize("name", [name for name in GRADED if name != TESTED_ELSEWHERE])
def test_a_lesion_fails_its_spec_and_a_benign_change_passes_every_spec_as_the_table_says(name):
    kind, lesioned, make = GRADED[name]
    rows = power.measure(name, kind, power.specs_for(kind, lesioned), make())
    assert [row.spec for row in rows] == list(power.specs_for(kind, lesioned))
    table = power.documented()
    for row in rows:
        assert row.failed if kind == "lesion" else not row.failed, (row.spec, row.failed)
        assert table[(name, row.spec)] is not None, f"docs/regressions.md has not measured {name}: run {power.COMMAND}"
        assert row.failed == table[(name, row.spec)], (row.spec, row.cells())  # the claims docs/regressions.md names


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
