"""Baseline files (atomic, merged, never corrupted) and the HTML/JSON/terminal report."""

from __future__ import annotations

import html
import json
import math
import multiprocessing
import os
import re
import signal
import time
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest

from circuit_tests.errors import SpecError
from circuit_tests.spec.baselines import BaselineStore, baseline_path, read_baseline, write_baseline
from circuit_tests.spec.figures import BaselineFigures, CurveFigures, Figures
from circuit_tests.spec.report import Report, decode, encode, payload
from circuit_tests.spec.session import baseline_figures


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


# Writers are forked: separate processes with their own locks and file handles, started without importing torch anew.
FORK = multiprocessing.get_context("fork")


def test_concurrent_writers_from_several_processes_all_keep_their_entries(tmp_path):
    path = tmp_path / "s.baseline.json"
    models = [f"m{i}" for i in range(8)]
    with FORK.Pool(4) as pool:
        pool.starmap(_write_one, [(str(path), model) for model in models])
    assert sorted(read_baseline(path)["models"]) == models


def _stall_mid_write(path: str, writing) -> None:
    def stall(fd: int) -> None:
        writing.set()
        time.sleep(60)

    os.fsync = stall  # the new file is written and about to be flushed to disk
    write_baseline(Path(path), "s", {"new": {"circuit": [[0, 0, i, 0.1] for i in range(100000)]}})


def test_a_killed_writer_leaves_the_old_file_intact(tmp_path):
    path = tmp_path / "s.baseline.json"
    write_baseline(path, "s", {"old": entry(1.0)})
    before = path.read_text()
    writing = FORK.Event()
    writer = FORK.Process(target=_stall_mid_write, args=(str(path), writing))
    writer.start()
    assert writing.wait(30)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    assert path.read_text() == before
    assert set(read_baseline(path)["models"]) == {"old"}


def test_a_damaged_file_is_an_error_and_is_not_overwritten(tmp_path):
    path = tmp_path / "s.baseline.json"
    path.write_text("{ damaged")
    with pytest.raises(SpecError, match="cannot be read.*left untouched"):
        write_baseline(path, "s", {"a": entry(1.0)})
    assert path.read_text() == "{ damaged"


SHAPED = {"shape": {"layers": 3, "neurons": 96}, "metrics": {"faithfulness": {"5": 0.5}}, "circuit": [[2, 2, 7, 0.5], [1, 2, 3, -0.25]]}


@pytest.mark.parametrize("text, reason", [
    ('{"models": {"a": %s, "a": %s}, "version": 1}' % (json.dumps(entry(0.5)), json.dumps(entry(0.25))),
     "gives the key 'a' twice in one object (a JSON reader would silently keep the second); keep one"),
    ('{"models": {"a": %s}, "models": {}, "version": 1}' % json.dumps(entry(0.5)), "gives the key 'models' twice"),
    (json.dumps({"models": {"a": entry(0.5)}, "version": 2}),
     "field 'version': version 2 is not one this circuit-tests reads (it reads 1); if a later circuit-tests wrote the file, upgrade"),
    (json.dumps({"models": {"a": entry(0.5)}, "version": "1"}), "field 'version': Input should be a valid integer"),
    (json.dumps({"models": {"a": entry(0.5)}}), "field 'version': Field required"),
    (json.dumps({"models": {"a": SHAPED | {"circuit": [[2, 2, 7, 0.5], [1, 2, 3, 0.25], [2, 2, 7, 0.125]]}}, "version": 1}),
     "field 'models.a.circuit': rows 0 and 2 both list the node L2/P2/N7; keep one"),
    (json.dumps({"models": {"a": SHAPED | {"circuit": [[2, 2, 7, 0.5], [99, 2, 3, 0.25]]}}, "version": 1}),
     "field 'models.a.circuit': row 1, node L99/P2/N3, is outside the shape stored with it (3 layers x 96 neurons)"),
    ('{"models": {}, "version": 1, "x": ' + "[" * 200_000 + "]" * 200_000 + "}", "is nested more than 32 levels deep"),
])
def test_a_hostile_baseline_is_an_error_and_an_update_leaves_it_as_it_was(tmp_path, text, reason):
    path = tmp_path / "s.baseline.json"
    path.write_text(text)
    for attempt in (lambda: read_baseline(path), lambda: write_baseline(path, "s", {"b": entry(1.0)})):  # a run, an update
        with pytest.raises(SpecError) as raised:
            attempt()
        assert f"{path}: the stored baseline cannot be read (" in str(raised.value) and reason in str(raised.value)
        assert "left untouched" in str(raised.value) and path.read_text() == text
    path.write_text(json.dumps({"models": {"a": SHAPED}, "version": 1}))
    assert read_baseline(path)["models"]["a"] == SHAPED  # the file mended is read


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


def test_the_job_summary_shows_links_and_images_from_a_spec_as_text(tmp_path):
    report = Report()
    image, link = "![i](https://evil.example/p.png)", "[click](https://evil.example/x)"
    result = payload("s", image, Path("specs/s.yaml"), "sparse", description=link)
    report.add(result, "failed", f"expected: {link} *bold* <img src=x> a|b\nmeasured: 0.1")
    report.write_markdown(tmp_path / "summary.md")
    summary = (tmp_path / "summary.md").read_text()
    for markup in ("![", "](", "<img", "*bold*"):
        assert markup not in summary.replace("`" + image + "`", ""), markup  # only as a code span, where nothing renders
    assert "\\[click\\]\\(https://evil.example/x\\) \\*bold\\* &lt;img src=x&gt; a\\|b" in summary
    assert "| s | \\!\\[i\\]\\(https://evil.example/p.png\\) |" in summary


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
    assert report.terminal_lines()[1].split() == ["s<x>", "m", "0", "0.95", "70", "-", "1.00@30", "-", "-", "failed", "(1/2)"]
    report.write_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["rows"][0]["status"] == "failed"


def _page(tmp_path: Path, figures: Figures, description: str = "") -> str:
    """The HTML page of one row with these figures."""
    report = Report()
    report.add(payload("s", "m", Path("specs/s.yaml"), "sparse", description) | {"figures": figures.to_json()}, "passed", "ok")
    report.write_html(tmp_path / "r.html")
    return (tmp_path / "r.html").read_text()


def _figures(**measured) -> Figures:
    return Figures(model="m", revision="r", device="cpu", dtype="float32", n_train=4, n_test=4, n_dropped=0, **measured)


def _polyline_ys(page: str) -> list[float]:
    return [float(point.split(",")[1]) for points in re.findall(r"<polyline[^>]* points='([^']*)'", page) for point in points.split()]


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


def test_figures_carry_intervals_tokens_pinned_figures_and_the_stored_baseline_through_json(tmp_path):
    figures = _figures(curve=CurveFigures([10, 100], [0.4, 0.9], [0.6, 0.1], [[0.3, 0.5], [0.8, 1.0]], [[0.5, 0.7], [0.0, 0.2]]),
                       top=[[3, -1, 77, 0.5]], tokens={"-1": " she"}, pinned={"4 pinned neurons": {"flip_rate": 0.25, "faithfulness": 0.5}},
                       stored_baseline=BaselineFigures("base", {10: 0.5, 100: 0.95}, [None], [[5, -1, 9, 1]]))
    assert Figures.from_json(json.loads(json.dumps(figures.to_json()))) == figures
    assert "<th>pinned: 4 pinned neurons</th><td>flip rate 0.250, faithfulness 0.500</td>" in _page(tmp_path, figures)
    assert "faithfulness_interval" not in _figures(curve=CurveFigures([10], [0.4], [0.6])).to_json()["curve"]


def test_html_report_shows_the_spec_description(tmp_path):
    page = _page(tmp_path, _figures(), description="Agreement <is> carried by neurons.")
    assert "<p class='description'>Agreement &lt;is&gt; carried by neurons.</p>" in page


def test_curve_axis_spans_values_above_one_and_below_zero(tmp_path):
    inside = _polyline_ys(_page(tmp_path, _figures(curve=CurveFigures([10, 100], [0.0, 1.0], [1.0, 0.0]))))
    assert min(inside) == 40 and max(inside) == 240  # 1 at the top of the plot, 0 at its bottom
    page = _page(tmp_path, _figures(curve=CurveFigures([10, 100], [0.3, 1.4], [-0.3, 0.1])))
    ys = _polyline_ys(page)
    assert min(ys) == 40 and max(ys) == 240  # 1.4 and -0.3 are the plot's ends: nothing drawn outside it
    assert ">1.40</text>" in page and ">-0.30</text>" in page


def test_curve_intervals_are_shaded_bands_that_the_axis_includes(tmp_path):
    assert "<polygon" not in _page(tmp_path, _figures(curve=CurveFigures([10, 100], [0.4, 0.9], [0.6, 0.1])))
    curve = CurveFigures([10, 100], [0.4, 0.9], [0.6, 0.1], [[0.3, 0.5], [0.8, 1.2]], [[0.5, 0.7], [math.nan, 0.2]])
    page = _page(tmp_path, _figures(curve=curve))
    bands = re.findall(r"<polygon[^>]*points='([^']*)'><title>95% interval</title>", page)
    assert len(bands) == 2 and len(bands[0].split()) == 4 and len(bands[1].split()) == 2  # an undefined bound: not drawn
    assert ">1.20</text>" in page and min(float(p.split(",")[1]) for p in bands[0].split()) == 40


def test_top_nodes_show_the_token_at_their_position(tmp_path):
    figures = _figures(top=[[3, -1, 77, -0.5], [4, -2, 8, 0.25], [5, None, 9, 0.1]], tokens={"-1": " she", "-3": "<b>"})
    cells = re.findall(r"<tr><td>(\d+)</td><td>([^<]*)</td>", _page(tmp_path, figures))
    assert [(layer, html.unescape(position)) for layer, position in cells] == [("3", "-1 ' she'"), ("4", "-2"), ("5", "-")]


def test_stored_baseline_curve_is_overlaid_and_top_nodes_show_their_rank_in_it(tmp_path):
    curve = CurveFigures([10, 100], [0.4, 0.9], [0.6, 0.1])
    top = [[3, -1, 77, -0.5], [4, -1, 8, 0.25]]
    assert "stroke-dasharray" not in _page(tmp_path, _figures(curve=curve, top=top))
    stored = BaselineFigures("base<1>", {10: 0.6, 30: 0.8, 100: 0.95}, ranks=[2, None], lost=[[5, -1, 9, 1]])
    page = _page(tmp_path, _figures(curve=curve, top=top, tokens={"-1": " she"}, stored_baseline=stored))
    dashed = re.findall(r"<polyline[^>]*stroke-dasharray[^>]*points='([^']*)'", page)
    assert len(dashed) == 1 and len(dashed[0].split()) == 3 and "base&lt;1&gt;'s baseline</text>" in page
    assert re.findall(r"<td>[+-]0\.\d+</td><td>(\w+)</td>", page) == ["2", "new"]
    assert "In the top 2 of base<1>'s baseline, not in this run's: L5/P-1/N9 ' she' (rank 1)" in html.unescape(page)


def test_the_session_ranks_top_nodes_in_the_stored_circuit_only_where_its_nodes_mean_the_same():
    top = [[3, -1, 77, 0.5], [4, -1, 8, 0.25], [5, -2, 9, 0.1]]
    subject = SimpleNamespace(figures=_figures(top=top), shape={"layers": 6, "neurons": 100},
                              spec=SimpleNamespace(trace=SimpleNamespace(align="end")))
    stored = {"shape": {"layers": 6, "neurons": 100}, "align": "end",
              "metrics": {"faithfulness": {"10": "0.5", "100": 0.9, "0": 0.1, "x": 0.2}},  # what lax validation lets through
              "circuit": [[1, -1, 2, 0.9], ["3", -1, 77, 0.8], [6, -3, 1, 0.7], [3, -1, 77, 0.6], [4, -1, 8, 0.5]]}
    compared = baseline_figures("base", stored, subject)
    assert compared == BaselineFigures("base", {10: 0.5, 100: 0.9}, ranks=[2, 5, None], lost=[[1, -1, 2, 1], [6, -3, 1, 3]])
    for other in ({"shape": {"layers": 6, "neurons": 50}}, {"align": "start"}):
        assert baseline_figures("base", stored | other, subject) == BaselineFigures("base", {10: 0.5, 100: 0.9})


def test_a_rows_figures_join_what_each_item_measured_in_any_order():
    """Under xdist two workers may each prepare the same (spec, model): the row keeps what either measured, zeros too."""
    report = Report()
    base = {"model": "m", "revision": "r", "device": "cpu", "dtype": "float32", "n_train": 4, "n_test": 4, "n_dropped": 0}
    result = payload("s", "m", Path("specs/s.yaml"), "behaves")
    report.add(result | {"figures": base | {"accuracy": 0.0, "flip_rate": {"30": 1.0}}}, "failed")
    report.add(result | {"expectation": "stable", "figures": base | {"overlap": 0.5, "flip_rate": {"10": 0.5}}}, "passed")
    figures = next(iter(report.rows.values())).figures
    assert (figures.accuracy, figures.overlap, figures.flip_rate) == (0.0, 0.5, {30: 1.0, 10: 0.5})
