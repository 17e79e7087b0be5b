"""Baseline files (atomic, merged, never corrupted) and the HTML/JSON/terminal report."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from circuit_tests.errors import SpecError
from circuit_tests.spec.baselines import BaselineStore, baseline_path, read_baseline, write_baseline
from circuit_tests.spec.report import Report, decode, encode, payload


def entry(value: float) -> dict:
    return {"circuit": [[1, 2, 3, value]], "metrics": {"accuracy": value, "faithfulness": {"100": value}}}


def _write_one(path: str, model: str) -> None:
    from pathlib import Path

    write_baseline(Path(path), "s", {model: entry(1.0)})


def test_baseline_file_sits_next_to_its_spec(tmp_path):
    assert baseline_path(tmp_path / "sva.yaml") == tmp_path / "sva.baseline.json"
    assert baseline_path(tmp_path / "a.circuit.yaml") == tmp_path / "a.circuit.baseline.json"


def test_writes_merge_and_are_reviewable(tmp_path):
    path = tmp_path / "s.baseline.json"
    write_baseline(path, "s", {"a": entry(0.5)})
    write_baseline(path, "s", {"b": entry(0.25)})
    assert set(read_baseline(path)["models"]) == {"a", "b"}
    assert "[1, 2, 3, 0.5]" in path.read_text()  # one node per line: small diffs
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_concurrent_writers_from_several_processes_all_keep_their_entries(tmp_path):
    path = tmp_path / "s.baseline.json"
    models = [f"m{i}" for i in range(8)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.starmap(_write_one, [(str(path), model) for model in models])
    assert sorted(read_baseline(path)["models"]) == models


def test_a_killed_writer_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "s.baseline.json"
    write_baseline(path, "s", {"old": entry(1.0)})
    before = path.read_text()
    writer = subprocess.Popen([sys.executable, "-c", f"""
import os, time
from pathlib import Path
from circuit_tests.spec import baselines
os.fsync = lambda fd: (print("writing", flush=True), time.sleep(60))  # stall mid-write
baselines.write_baseline(Path({str(path)!r}), "s", {{"new": {{"circuit": [[0, 0, i, 0.1] for i in range(100000)]}}}})
"""], stdout=subprocess.PIPE, text=True, env={**os.environ, "CIRCUIT_TESTS_CACHE": str(tmp_path / "cache")})
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert path.read_text() == before
    assert set(read_baseline(path)["models"]) == {"old"}


def test_a_damaged_file_is_an_error_and_is_not_overwritten(tmp_path):
    path = tmp_path / "s.baseline.json"
    path.write_text("{ damaged")
    with pytest.raises(SpecError, match="cannot be read.*left untouched"):
        write_baseline(path, "s", {"a": entry(1.0)})
    assert path.read_text() == "{ damaged"


def test_store_writes_once_at_the_end(tmp_path):
    from circuit_tests.spec.schema import spec_from_mapping

    spec = spec_from_mapping({"name": "s", "models": ["m"], "task": {"examples": [{"prompt": "a", "answer": " b"}]},
                              "expect": [{"behaves": {"min_accuracy": 1.0}}]}, tmp_path / "s.yaml")
    store = BaselineStore(update=True)
    store.record(spec, "m", entry(1.0))
    assert not baseline_path(spec.path).exists()
    assert store.flush() == ([baseline_path(spec.path)], [])
    assert store.entry(spec, "other-checkpoint") == ("m", entry(1.0))  # falls back to the spec's first model


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags, self.urls = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def test_html_report_is_self_contained_and_shows_curve_results_and_neurons(tmp_path):
    report = Report()
    figures = {"accuracy": 0.95, "curve": {"sizes": [10, 100], "faithfulness": [0.2, 0.9], "completeness": [0.7, 0.1]},
               "nodes_for_0.8": 70.0, "flip_rate": {"30": 1.0}, "top": [[3, 1, 77, -0.5]]}
    result = payload("s<x>", "m", Path("specs/s.yaml"), "sparse") | {"figures": figures}
    report.add(result, "passed", "expected: ...")
    report.add(result | {"expectation": "flips"}, "failed", "expected: flips\nmeasured: 0.1")
    path = tmp_path / "r.html"
    report.write_html(path)
    parser = _Collector()
    parser.feed(path.read_text())
    assert {"svg", "polyline", "table"} <= set(parser.tags) and parser.urls == []
    assert "s&lt;x&gt;" in path.read_text()
    assert report.terminal_lines()[1].split() == ["s<x>", "m", "0", "0.95", "70", "1.00@30", "-", "-", "failed", "(1/2)"]
    report.write_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["status"] == "failed"


def test_result_property_is_json_with_null_for_what_is_not_a_number():
    figures = {"curve": {"sizes": [10, 100], "faithfulness": [0.5, math.nan], "completeness": [math.inf, 0.1]},
               "steering": {5: math.nan}}
    result = payload("s", "m", Path("specs/s.yaml"), "sparse") | {"figures": figures}
    text = encode(result)
    plain = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in the property"))
    assert plain["figures"]["curve"]["faithfulness"] == [0.5, None] and plain["undefined"] == [
        ["figures", "curve", "faithfulness", 1], ["figures", "curve", "completeness", 0], ["figures", "steering", "5"]]
    decoded = decode(text)
    assert math.isnan(decoded["figures"]["curve"]["faithfulness"][1]) and math.isnan(decoded["figures"]["steering"]["5"])
    assert decoded["figures"]["curve"]["completeness"][1] == 0.1 and "undefined" not in decoded
    report = Report()
    report.add(decoded, "failed", "faithfulness is not a number")
    assert report.to_json()["rows"][0]["undefined"] == [
        "figures.curve.faithfulness[1]", "figures.curve.completeness[0]", "figures.steering.5"]
