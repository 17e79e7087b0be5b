"""A training run's checkpoints as one input: the series options, the trend, bisect, and the job summary.

The series is built offline from a tiny random Llama: its checkpoints interpolate between the model and a copy
whose five strongest circuit neurons write nothing, ``(1 - t) * model + t * knockout`` at t = 0, 0.25, ..., 1
(saved as step-0 ... step-1000). What the spec measures must move with t, and bisect must agree with the scan.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
from test_walkthrough import without_neurons

from circuit_tests.cli import main
from circuit_tests.errors import BadOptionError
from circuit_tests.model.series import LIST_LIMIT, Checkpoint, axis, expand_series, first_failure, natural_key, step_of
from circuit_tests.spec.schema import load_spec
from circuit_tests.spec.session import CircuitSession, RunOptions
from circuit_tests.testing import interpolated_checkpoint, save_tiny_checkpoint, tiny_agreement_pairs

pytest_plugins = ["pytester"]
STEPS = (0, 250, 500, 750, 1000)


# --------------------------------------------------------------------------- naming a series


def test_a_glob_is_in_natural_order_and_a_list_in_the_order_given(tmp_path):
    for name in ("step-1000", "step-900", "step-50", "notes.txt"):
        (tmp_path / name).mkdir() if name.startswith("step") else (tmp_path / name).write_text("")
    assert [c.name for c in expand_series(["step-*"], tmp_path)] == ["step-50", "step-900", "step-1000"]
    assert [c.name for c in expand_series(["step-900,step-50", "step-900"], tmp_path)] == ["step-900", "step-50"]
    (tmp_path / "run.txt").write_text("# the run\nstep-1000\n\nstep-5*  # a glob on a line\norg/pythia@step3000\n")
    assert expand_series(["@run.txt"], tmp_path) == (
        Checkpoint("step-1000", 1000), Checkpoint("step-50", 50), Checkpoint("org/pythia@step3000", 3000))


@pytest.mark.parametrize("values", [["nothing-*"], ["@missing.txt"], ["a,,b"]])
def test_a_series_that_names_nothing_is_refused_saying_what(tmp_path, values):
    with pytest.raises(BadOptionError, match="checkpoint series"):
        expand_series(values, tmp_path)


def test_a_list_file_is_read_as_a_dataset_is_and_a_fifo_or_device_refused(tmp_path, capsys):
    """``@FILE`` names a regular, bounded text file: a FIFO would hang and /dev/zero exhaust memory."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big.txt").write_text("step-1\n" * (LIST_LIMIT // 7 + 1))
    for name, kind in (("fifo", "is a FIFO"), ("/dev/zero", "is a character device"), ("big.txt", "more than the 1.0 MiB allowed")):
        with pytest.raises(BadOptionError, match=f"checkpoint series @{name}: .*{kind}.*one checkpoint per line"):
            expand_series([f"@{name}"], tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert main(["series", "agree.yaml", "--checkpoints", "@fifo"]) == 2
    assert "is a FIFO, not a regular file" in capsys.readouterr().err


def test_under_pytest_a_list_file_is_one_argument_and_pytests_own_expansion_is_refused(pytester):
    """pytest turns a separate ``@FILE`` into command-line arguments: a list holding ``-k`` would deselect claims."""
    pytester.path.joinpath("circuit_a.yaml").write_text("name: a\nmodels: [m]\ntask:\n  examples:\n    - {clean_prefix: a, "
                                                        "patch_prefix: b, clean_answer: c, patch_answer: d}\n"
                                                        "expect:\n  - behaves: {min_accuracy: 1.0}\n  - flips: {nodes: 1, min_flip_rate: 0.5}\n")
    pytester.path.joinpath("run.txt").write_text("ckpt-1\n-k\nnot flips\n")
    result = pytester.runpytest("--collect-only", "-q", "--circuit-series", "@run.txt")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--circuit-series @run.txt: pytest reads a separate @FILE argument itself*"
                                 "Write --circuit-series=@run.txt, one argument*"])
    result = pytester.runpytest("--collect-only", "-q", "--circuit-series=@run.txt")
    assert [line for line in result.outlines if "::" in line] == [f"circuit_a.yaml::a::{claim}[{name}]" for name in ("ckpt-1", "-k", "not flips")
                                                                   for claim in ("behaves", "flips")]


def test_steps_come_from_the_name_and_else_the_place():
    assert [step_of(n) for n in ("ckpts/step-1200", "run3/final", "org/m@step40", "org/m")] == [1200, None, 40, None]
    assert axis([Checkpoint("a", 10), Checkpoint("b", 20)]) == [10, 20]
    assert axis([Checkpoint("a", 10), Checkpoint("b", None)]) == [0, 1]
    assert sorted(["s10", "s9", "s100"], key=natural_key) == ["s9", "s10", "s100"]


@pytest.mark.parametrize("n", range(1, 14))
def test_bisect_finds_what_a_scan_finds_in_log2_checks(n):
    for first_bad in range(n + 1):  # n: no checkpoint fails
        checked = []

        def fails(index: int) -> bool:
            checked.append(index)
            return index >= first_bad

        found, visited = first_failure(n, fails)
        assert found == (first_bad if first_bad < n else None) and visited == checked
        assert len(visited) <= 1 + math.ceil(math.log2(n)) and len(set(visited)) == len(visited)


# --------------------------------------------------------------------------- a series run end to end


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A project: the tiny model, a spec measured on it with its baseline, and the interpolated series."""
    root = tmp_path_factory.mktemp("run")
    save_tiny_checkpoint(root / "ckpt", taught=True)
    (root / "data.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in tiny_agreement_pairs()))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert main(["new", "data.jsonl", "--name", "agree", "--model", "ckpt", "--measure"]) == 0
    stored = json.loads((root / "specs" / "agree.baseline.json").read_text())["models"]["../ckpt"]["circuit"]
    without_neurons(root / "ckpt", root / "knockout", [(row[0], row[2]) for row in stored[:5]])
    for step in STEPS:
        interpolated_checkpoint(root / "ckpt", root / "knockout", step / 1000, root / "series" / f"step-{step}")
    return root


@pytest.fixture
def project(pytester, run, monkeypatch) -> pytest.Pytester:
    shutil.copytree(run / "specs", pytester.path / "specs")
    shutil.copy(run / "data.jsonl", pytester.path)
    (pytester.path / "series").symlink_to(run / "series", target_is_directory=True)  # checkpoints named on the command line
    monkeypatch.chdir(pytester.path)
    return pytester


def test_a_series_runs_checkpoint_by_checkpoint_and_reports_the_trend(project):
    specs = project.path / "specs"  # a second spec, so that collection order (spec by spec) differs from the run's
    (specs / "again.yaml").write_text((specs / "agree.yaml").read_text().replace("name: agree", "name: again", 1))
    (specs / "again.baseline.json").write_text((specs / "agree.baseline.json").read_text())
    result = project.runpytest("specs", "--circuit-series", "series/step-*", "--circuit-json", "r.json",
                               "--circuit-summary", "summary.md", "--circuit-report", "r.html", "-v", "-p", "no:cacheprovider")
    ran = [re.search(r"\[series/step-(\d+)\]", line).group(1) for line in result.stdout.lines
           if line.startswith("specs/") and (" PASSED" in line or " FAILED" in line)]
    items = len(ran) // len(STEPS)
    assert items >= 4  # two specs, two expectations each
    assert ran == [str(step) for step in STEPS for _ in range(items)]  # one checkpoint loaded at a time

    trend = next(t for t in json.loads((project.path / "r.json").read_text())["series"] if t["spec"] == "agree")
    points = trend["points"]
    assert [p["x"] for p in points] == list(STEPS) and [p["checkpoint"] for p in points] == [f"series/step-{s}" for s in STEPS]
    assert points[0]["failed"] == [] and "stable" in points[-1]["failed"]  # the model passes; the knockout loses the circuit
    assert trend["first_failure"]["stable"] == next(p["checkpoint"] for p in points if "stable" in p["failed"])
    overlaps = [p["overlap"] for p in points]
    assert overlaps[0] > 0.99  # the circuit leaves the baseline step by step (equal overlaps may differ in the last bit)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(overlaps, overlaps[1:])), overlaps
    assert points[0]["overlap_previous"] is None and all(0 <= p["overlap_previous"] <= 1 for p in points[1:])

    result.stdout.fnmatch_lines(["*trend of agree over 5 checkpoints*", "checkpoint*step*acc*n@0.8*ov-base*ov-prev*failed",
                                 "series/step-0 * 0 *", "agree: first failure: *stable at series/step-*"])
    page = (project.path / "r.html").read_text()
    assert "<h2>agree over 5 checkpoints</h2>" in page and "aria-label='overlap with the baseline'" in page
    assert "<title>threshold 0.5</title>" in page and f"<title>first failure: step {trend['first_failure']['stable'].rsplit('-', 1)[1]}<" in page
    summary = (project.path / "summary.md").read_text()
    assert "### agree over 5 checkpoints" in summary and "| series/step-1000 | 1000 |" in summary
    assert "### Failed" in summary and "first failure:" in summary


def test_bisect_agrees_with_the_scan(project, capsys):
    assert main(["run", "specs/agree.yaml", "--model", "series/step-0"]) == 0  # the series' start holds
    capsys.readouterr()
    scan = [main(["run", "specs/agree.yaml", "--model", f"series/step-{step}"]) for step in STEPS]
    first_bad = STEPS[scan.index(1)]
    capsys.readouterr()
    assert main(["bisect", "specs/agree.yaml", "--checkpoints", "series/step-*"]) == 1
    out = capsys.readouterr().out
    assert f"first failing checkpoint series/step-{first_bad} (step {first_bad})" in out
    checked = re.search(r"(\d+) of 5 checkpoints checked", out).group(1)
    assert int(checked) <= 1 + math.ceil(math.log2(len(STEPS)))
    assert re.search(r"accuracy +\d\.\d\d +\d\.\d\d", out) and re.search(r"left \(\d+\): ", out)


def test_failures_are_annotated_on_their_spec_line_under_github_actions(project, monkeypatch, tmp_path, capsys):
    summary = tmp_path / "job-summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_WORKSPACE", str(project.path))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = project.runpytest("specs", "--circuit-model", "series/step-1000", "-k", "stable", "-p", "no:cacheprovider")
    line = 1 + next(i for i, text in enumerate((project.path / "specs" / "agree.yaml").read_text().splitlines()) if "stable" in text)
    result.stdout.fnmatch_lines([f"::error file=specs/agree.yaml,line={line},title=agree%3A%3Astable[[]series/step-1000[]]::*"])
    assert summary.read_text().startswith("earlier step\n## circuit-tests")  # appended, as every step of a job does
    capsys.readouterr()
    assert main(["run", "specs/agree.yaml", "--model", "series/step-1000"]) == 1  # the command line does the same
    assert f"::error file=specs/agree.yaml,line={line},title=agree%3A%3Astable[series/step-1000]::" in capsys.readouterr().out
    assert summary.read_text().count("## circuit-tests") == 2


def test_a_series_run_holds_one_checkpoint_at_a_time(run):
    series = expand_series(["series/step-*"], run)
    names = [c.name for c in series]
    session = CircuitSession(RunOptions(project=run, series=tuple(Checkpoint(str(run / n), c.step) for n, c in zip(names, series))))
    spec = load_spec(run / "specs" / "agree.yaml", run)
    for checkpoint in session.options.series[:3]:
        session.subject(spec, checkpoint.name, from_command_line=True)
        assert len(session.models) == 1 and len(session._subjects) == 1


def test_the_matrix_evaluates_each_checkpoints_circuit_on_every_checkpoint(project, capsys):
    assert main(["series", "specs/agree.yaml", "--checkpoints", "series/step-*", "--matrix", "--json", "m.json"]) == 1
    (trend,) = json.loads((project.path / "m.json").read_text())["series"]
    matrix, points = trend["matrix"], trend["points"]
    assert len(matrix) == len(STEPS) and all(len(row) == len(STEPS) and None not in row for row in matrix)
    # step 0 is the traced model itself, so its circuit is the baseline's: row 0 is the baseline circuit's faithfulness
    assert matrix[0] == pytest.approx([p["stored_circuit_faithfulness"] for p in points], abs=1e-6)
    assert "faithfulness of each checkpoint's circuit (rows, by step) on each checkpoint (columns)" in capsys.readouterr().out


def test_under_xdist_a_checkpoints_items_share_a_worker_and_the_trend_is_the_same(project):
    serial = project.runpytest("specs", "--circuit-series", "series/step-*", "--circuit-json", "serial.json", "-p", "no:cacheprovider")
    result = project.runpytest("specs", "--circuit-series", "series/step-*", "--circuit-json", "xdist.json", "-n", "2",
                               "--dist", "loadgroup", "-p", "no:cacheprovider")
    assert result.parseoutcomes() == serial.parseoutcomes()
    (alone,), (spread,) = (json.loads((project.path / name).read_text())["series"] for name in ("serial.json", "xdist.json"))
    assert spread == alone


# --------------------------------------------------------------------------- an interrupted run


HELD = "every expectation held"


@pytest.fixture
def two_checkpoints(pytester, monkeypatch) -> pytest.Pytester:
    """Two tiny checkpoints and a spec that holds on both."""
    monkeypatch.chdir(pytester.path)
    for seed, name in enumerate(("ckpt-1", "ckpt-2")):
        save_tiny_checkpoint(pytester.path / name, seed=seed, taught=True)
    (pytester.path / "data.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in tiny_agreement_pairs()))
    pytester.mkdir("specs")
    (pytester.path / "specs" / "agree.yaml").write_text('name: agree\nmodels: ["../ckpt-1"]\ntask: {dataset: ../data.jsonl, '
                                                         'test_fraction: 0.5}\nexpect:\n  - behaves: {min_accuracy: 0.6}\n')
    return pytester


def test_a_series_interrupted_under_pytest_says_what_was_not_run_and_never_held(two_checkpoints):
    two_checkpoints.makeconftest("def pytest_runtest_setup(item):\n    if 'ckpt-2' in item.nodeid:\n        raise KeyboardInterrupt\n")
    result = two_checkpoints.runpytest("specs", "--circuit-series", "ckpt-*", "--circuit-report", "r.html", "--circuit-json", "r.json",
                                       "--circuit-summary", "s.md", "-p", "no:cacheprovider", no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["agree * ckpt-1 * passed (1/1)", "agree * ckpt-2 * not run (0/1)",
                                 "not run: agree::behaves[[]ckpt-2[]]: the run stopped before this item ran*",
                                 "ckpt-2 * (not run)", "agree: no failure where it ran; not run in full at 1 of 2 checkpoints: ckpt-2"])
    (trend,) = json.loads((two_checkpoints.path / "r.json").read_text())["series"]
    assert [point["ran"] for point in trend["points"]] == [True, False]
    for output in ("r.html", "s.md"):
        text = (two_checkpoints.path / output).read_text()
        assert "not run in full at 1 of 2 checkpoints: ckpt-2" in text and HELD not in text
    assert HELD not in result.stdout.str()


def test_a_series_interrupted_on_the_command_line_reports_what_ran_and_bisect_stops_in_one_line(two_checkpoints, monkeypatch, capsys):
    check = CircuitSession.check

    def interrupted_at_the_second(session, spec, model, *args):
        if model == "ckpt-2":
            raise KeyboardInterrupt
        return check(session, spec, model, *args)

    monkeypatch.setattr(CircuitSession, "check", interrupted_at_the_second)
    assert main(["series", "specs/agree.yaml", "--checkpoints", "ckpt-*", "--report", "r.html"]) == 130
    out, err = capsys.readouterr()
    assert "PASS agree::behaves[ckpt-1]" in out and "not run (0/1)" in out and HELD not in out
    assert "agree: no failure where it ran; not run in full at 1 of 2 checkpoints: ckpt-2" in out
    assert HELD not in (two_checkpoints.path / "r.html").read_text()
    assert err == "circuit-tests series: interrupted; 1 checks not run\n"
    assert main(["bisect", "specs/agree.yaml", "--checkpoints", "ckpt-*"]) == 130  # the last checkpoint, first
    out, err = capsys.readouterr()
    assert err == "circuit-tests bisect: interrupted\n" and out == "checking ckpt-2 (2 of 2)\n"
