"""Progress: bars on an interactive terminal; timestamped stage lines in a pipe, a CI log and under pytest; none with -q."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_subject import project as tiny  # a tiny checkpoint and agreement pairs in its words

from circuit_tests.cli import main
from circuit_tests.progress import Countdown, bar, reported, stage
from circuit_tests.testing import save_tiny_checkpoint

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] circuit-tests: (.*)$")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def said(text: str) -> list[str]:
    """The progress lines in ``text``, without their timestamps; every other line dropped."""
    return [match[1] for match in map(LINE.match, text.splitlines()) if match]


def test_a_terminal_shows_the_bar(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    terminal = Terminal()
    with reported(terminal):
        assert list(bar(range(3), "tracing")) == [0, 1, 2]
    assert "tracing" in terminal.getvalue() and "/3 [" in terminal.getvalue() and not said(terminal.getvalue())


@pytest.mark.parametrize("stream, ci", [(Terminal(), "true"), (io.StringIO(), None)], ids=["in CI", "piped"])
def test_ci_and_pipes_get_a_line_when_each_stage_starts_and_ends(monkeypatch, stream, ci):
    monkeypatch.delenv("CI", raising=False)
    if ci:
        monkeypatch.setenv("CI", ci)
    with reported(stream):
        assert list(bar(range(3), "tracing")) == [0, 1, 2]
        with stage("loading ./ckpt"):
            pass
    lines = said(stream.getvalue())
    assert lines[0] == "tracing: started, 3 batches" and lines[2] == "loading ./ckpt: started"
    assert re.fullmatch(r"tracing: done in \d+\.\d s", lines[1]) and re.fullmatch(r"loading ./ckpt: done in \d+\.\d s", lines[3])
    assert len(lines) == 4 and "\r" not in stream.getvalue()


def test_a_long_stage_says_how_far_it_is_every_interval():
    every_batch, never = io.StringIO(), io.StringIO()
    with reported(every_batch, interval=0):
        list(bar(range(3), "faithfulness curve"))
    with reported(never, interval=3600):
        list(bar(range(3), "faithfulness curve"))
    assert said(every_batch.getvalue())[1:4] == [f"faithfulness curve: batch {k} of 3" for k in (1, 2, 3)]
    assert len(said(never.getvalue())) == 2


def test_the_heartbeat_waits_for_the_interval(monkeypatch):
    clock = iter([0.0, 0.0, 10.0, 31.0, 40.0, 62.0, 62.0])  # started; each batch's end; the stage's end
    monkeypatch.setattr("circuit_tests.progress.time.perf_counter", lambda: next(clock))
    stream = io.StringIO()
    with reported(stream):
        list(bar(["a", "b", "c", "d"], "null draws"))
    assert said(stream.getvalue()) == ["null draws: started, 4 batches", "null draws: batch 2 of 4", "null draws: batch 4 of 4",
                                       "null draws: done in 62.0 s"]


def test_a_series_says_which_checkpoint_and_the_time_left(monkeypatch):
    clock = iter([100.0, 110.0, 120.0])
    monkeypatch.setattr("circuit_tests.progress.time.perf_counter", lambda: next(clock))
    stream, countdown = io.StringIO(), Countdown(["a", "b", "c", "d"])
    with reported(stream):
        for name in ("a", "a", "b", "elsewhere", "c"):
            countdown.reached(name)
    assert said(stream.getvalue()) == ["checkpoint 1 of 4 (a)", "checkpoint 2 of 4 (b); about 30 s left",
                                       "checkpoint 3 of 4 (c); about 20 s left"]


def test_quiet_and_the_library_alone_say_nothing():
    items, stream = [1, 2], io.StringIO()
    assert bar(items, "tracing") is items
    with reported(stream, quiet=True):
        assert bar(items, "tracing") is items
        with stage("loading"):
            pass
    assert stream.getvalue() == ""


# --------------------------------------------------------------------------- the command line and the plugin


def _piped(tiny: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "CI"} | {
        "PYTHONPATH": str(ROOT), "CIRCUIT_TESTS_CACHE": str(tiny / "cache")}
    return subprocess.run([sys.executable, "-m", "circuit_tests.cli", *args], cwd=tiny, env=env, capture_output=True, text=True)


def test_the_command_line_in_a_pipe_says_each_stage_with_its_seconds_and_q_quiets_it(tiny):
    run = _piped(tiny, "new", "data.jsonl", "--name", "agree", "--model", "./ckpt", "--measure", "--out", "specs/agree.yaml")
    assert run.returncode == 0, run.stderr
    lines = said(run.stderr)
    for what in ("loading ./ckpt", "relp attribution", "cards", "faithfulness curve", "flip rates"):
        assert f"{what}: started" in " ".join(lines), what
        assert any(re.fullmatch(rf"{what}: done in \d+\.\d s", line) for line in lines), what
    assert not said(run.stdout) and "\r" not in run.stderr
    quiet = _piped(tiny, "trace", "--dataset", "data.jsonl", "--model", "./ckpt", "--top", "3", "-q")
    assert quiet.returncode == 0 and quiet.stderr == "" and len(json.loads(quiet.stdout)["nodes"]) == 3


def test_the_command_line_on_a_terminal_keeps_the_bars(tiny, monkeypatch, capsys):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.chdir(tiny)
    monkeypatch.setenv("CIRCUIT_TESTS_CACHE", str(tiny / "cache"))
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main(["trace", "--dataset", "data.jsonl", "--model", "./ckpt", "--batch-size", "8", "--top", "3"]) == 0
    assert re.search(r"\rrelp attribution: +\d+%\|[^|]*\| \d+/\d+ \[", terminal.getvalue()) and not said(terminal.getvalue())
    assert len(json.loads(capsys.readouterr().out)["nodes"]) == 3  # stdout keeps only the JSON


def test_under_pytest_the_lines_reach_the_log_past_capture_and_a_series_counts_checkpoints(tiny, pytester):
    for seed, name in enumerate(("ckpt-1", "ckpt-2")):
        save_tiny_checkpoint(pytester.path / name, seed=seed, taught=True)
    (pytester.path / "data.jsonl").write_text((tiny / "data.jsonl").read_text())
    pytester.mkdir("specs")
    (pytester.path / "specs" / "agree.yaml").write_text(
        'name: agree\nmodels: ["../ckpt-1"]\ntask: {dataset: ../data.jsonl, test_fraction: 0.5}\n'
        "expect:\n  - behaves: {min_accuracy: 0.6}\n")
    result = pytester.runpytest("specs", "--circuit-series", "ckpt-*", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    lines = said(result.stdout.str())
    assert lines[0] == "checkpoint 1 of 2 (ckpt-1)" and "agree on ckpt-1: loading ckpt-1: started" in lines
    assert any(re.fullmatch(r"agree on ckpt-2: preferences: done in \d+\.\d s", line) for line in lines)
    assert any(re.fullmatch(r"checkpoint 2 of 2 \(ckpt-2\); about \d+ s left", line) for line in lines)
    result.stdout.fnmatch_lines(["specs/agree.yaml *", "*passed*"])
    quiet = pytester.runpytest("specs", "-q", "-p", "no:cacheprovider")
    quiet.assert_outcomes(passed=1)
    assert not said(quiet.stdout.str())
