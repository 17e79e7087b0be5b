"""Progress bars: on an interactive terminal only, never in CI or when output is captured."""

from __future__ import annotations

import io
import json

import pytest

from circuit_tests.cli import main
from circuit_tests.progress import bar, on_terminal


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_shows_the_bar(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    terminal = Terminal()
    with on_terminal(terminal):
        assert list(bar(range(3), "tracing")) == [0, 1, 2]
    assert "tracing" in terminal.getvalue() and "/3 [" in terminal.getvalue()


@pytest.mark.parametrize("stream, ci", [(Terminal(), "true"), (io.StringIO(), None)], ids=["in CI", "piped"])
def test_ci_and_pipes_stay_quiet(monkeypatch, stream, ci):
    monkeypatch.delenv("CI", raising=False)
    if ci:
        monkeypatch.setenv("CI", ci)
    items = range(3)
    with on_terminal(stream):
        assert bar(items, "tracing") is items
    assert stream.getvalue() == ""


def test_the_library_is_quiet_outside_the_command_line():
    items = [1, 2]
    assert bar(items, "tracing") is items


@pytest.mark.slow
def test_trace_on_a_terminal_shows_attribution_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CI", raising=False)
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    rows = [{"clean_prefix": f"The {n}", "patch_prefix": f"The {n}s", "clean_answer": " is", "patch_answer": " are"}
            for n in ("author", "teacher", "doctor")]
    dataset = tmp_path / "d.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["trace", "--dataset", str(dataset), "--batch-size", "1", "--top", "3"]) == 0
    assert "relp attribution" in terminal.getvalue() and "/3 [" in terminal.getvalue()
    assert len(json.loads(capsys.readouterr().out)["nodes"]) == 3  # stdout keeps only the JSON
