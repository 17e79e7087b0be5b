"""Reports of a run: a terminal table, a self-contained HTML page and the same data as JSON.

Each spec item carries its result and its subject's figures as a ``circuit_tests`` user
property, JSON text (:func:`encode`, :func:`decode`), so the report is built from test reports
alone and works the same under pytest-xdist (workers send their reports to the controller), and
JUnit XML holds the same JSON. One :class:`Row` per (spec file, model).

Text in a report may come from a pull request (spec names, model names, answers): the terminal
table escapes control characters, the HTML page escapes markup, and the JSON holds no bare
``NaN``: a measurement that is not a number is ``null``, listed under the row's ``undefined``
with the reason given in its expectation's message.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from circuit_tests.analysis.cards import Card, counted
from circuit_tests.model.nodes import format_node, parse_node
from circuit_tests.model.series import Checkpoint
from circuit_tests.spec.figures import AreaFigures, BaselineFigures, CurveFigures, Figures
from circuit_tests.spec.trend import FIGURES, Trend, cell, first_failure_line, matrix_table, table, trends
from circuit_tests.text import printable

PROPERTY = "circuit_tests"
NOT_RUN = "not run"  # the outcome of an item the run never measured: interrupted, stopped early, or deselected by a
# selection that did not come from the command line; a row holding one never reads as passed, nor its trend as held
NOTHING = Figures.from_json({})  # what a row without figures shows: "-" everywhere


def payload(spec_name: str, model: str, path: Path, expectation: str, description: str = "", line: int | None = None) -> dict:
    """What one result carries to :meth:`Report.add` (``figures``, ``message`` and ``stale`` are added as measured);
    ``line``: where the expectation is written in the spec."""
    return {"spec": spec_name, "model": model, "path": str(path), "expectation": expectation, "description": description,
            "line": line}


def encode(result: dict) -> str:
    """A result as the :data:`PROPERTY` user property: JSON text, which JUnit XML holds as it is.

    A number that is not finite is ``null``, and its place (keys and indices) is listed under ``undefined``.
    """
    undefined: list[tuple] = []
    return json.dumps(_finite(result, (), undefined) | {"undefined": undefined}, allow_nan=False)


def decode(text: str) -> dict:
    """The result :func:`encode` wrote, with NaN again at each undefined place."""
    result = json.loads(text)
    for *path, last in result.pop("undefined"):
        container = result
        for step in path:
            container = container[step]
        container[last] = math.nan
    return result


@dataclass
class Result:
    """One expectation's result."""

    expectation: str
    outcome: str  # passed, failed, skipped, or NOT_RUN
    message: str
    line: int | None = None  # where the expectation is written in the spec file


@dataclass
class Row:
    """One spec on one model."""

    spec: str
    model: str
    path: str
    description: str = ""
    figures: Figures | None = None  # None: nothing was measured (a spec that could not be read)
    results: list[Result] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # baseline entries of models the spec no longer lists
    watches: dict[str, dict[str, float | None]] = field(default_factory=dict)  # expectation -> trend figures it judges

    @property
    def status(self) -> str:
        outcomes = {result.outcome for result in self.results}
        return next((outcome for outcome in ("failed", NOT_RUN, "passed") if outcome in outcomes), "skipped")

    @property
    def complete(self) -> bool:
        """Whether every item of the row that the run planned was run."""
        return all(result.outcome != NOT_RUN for result in self.results)


class Report:
    """Rows collected from item payloads, in the order they arrived; with a checkpoint ``series``, each spec's trend too."""

    def __init__(self, series: Sequence[Checkpoint] = ()) -> None:
        self.rows: dict[tuple[str, str], Row] = {}
        self.series = tuple(series)
        self.matrices: dict[str, list[list[float | None]]] = {}  # spec path -> cross-checkpoint faithfulness

    def add(self, payload: dict, outcome: str, message: str | None = None) -> None:
        key = (payload["path"], payload["model"])
        row = self.rows.setdefault(key, Row(*(printable(payload.get(name, "")) for name in ("spec", "model", "path", "description"))))
        if payload.get("figures"):  # one subject's figures grow item by item; under xdist, two workers may each hold some
            figures = Figures.from_json(payload["figures"])
            row.figures = figures if row.figures is None else row.figures.merged(figures)
        row.stale = payload.get("stale", row.stale)
        row.watches[payload["expectation"]] = {key: value for key, value in payload.get("watches", {}).items()
                                               if key in FIGURES and (value is None or isinstance(value, (int, float)))}
        line = payload.get("line")
        row.results.append(Result(payload["expectation"], outcome, printable(message or payload.get("message", "")),
                                  line if isinstance(line, int) else None))

    @property
    def trends(self) -> list[Trend]:
        """Each spec's figures over the series (none without one)."""
        return trends(self.rows.values(), self.series, self.matrices) if self.series else []

    # ------------------------------------------------------------------ terminal

    def terminal_lines(self) -> list[str]:
        header = ("spec", "model", "dropped", "acc", "n@0.8", "cpr/cmd", "flip", "steer", "overlap", "result")
        cells = [header] + [
            (printable(self._label(row), one_line=True), printable(row.model, one_line=True),
             str(figures.n_dropped) if row.figures else "-", _number(figures.accuracy), _number(figures.nodes_for_08, "{:.0f}"),
             _areas(figures), _last(figures.flip_rate),
             _last(figures.steering), _number(figures.overlap),
             f"{row.status} ({sum(r.outcome == 'passed' for r in row.results)}/{len(row.results)})")
            for row, figures in ((row, row.figures or NOTHING) for row in self.rows.values())
        ]
        lines = _aligned(cells)
        lines += [printable(line, one_line=True) for row in self.rows.values() for line in self._drops(row)]
        lines += [printable(f"{NOT_RUN}: {self._label(row)}::{result.expectation}[{row.model}]: {result.message}", one_line=True)
                  for row, result in self.not_run()]
        for trend in self.trends:
            lines += ["", printable(f"trend of {trend.spec} over {len(trend.points)} checkpoints", one_line=True)]
            lines += _aligned([[printable(cell, one_line=True) for cell in cells] for cells in table(trend)])
            lines.append(printable(first_failure_line(trend), one_line=True))
            if trend.matrix is not None:
                lines += ["", "faithfulness of each checkpoint's circuit (rows, by step) on each checkpoint (columns)"]
                lines += _aligned(matrix_table(trend))
        return lines

    def not_run(self) -> list[tuple[Row, Result]]:
        """Every item the run planned and never measured, with why."""
        return [(row, result) for row in self.rows.values() for result in row.results if result.outcome == NOT_RUN]

    def _drops(self, row: Row, shown: int = 3) -> list[str]:
        """Under the table, what each row dropped: the first few examples, then how many more the reports list."""
        dropped = row.figures.dropped if row.figures else []
        more = [f"  ... and {len(dropped) - shown} more (the JSON and HTML reports list every one)"] if len(dropped) > shown else []
        return [f"{self._label(row)} on {row.model} dropped {drop}" for drop in dropped[:shown]] + more

    def _label(self, row: Row) -> str:
        """The spec's name, with its file when another spec file has the same name."""
        shared = {other.path for other in self.rows.values() if other.spec == row.spec}
        return row.spec if len(shared) == 1 else f"{row.spec} ({row.path})"

    # ------------------------------------------------------------------ files

    def to_json(self) -> dict:
        rows = []
        for row in self.rows.values():
            undefined: list[tuple] = []
            data = asdict(row) | {"figures": row.figures.to_json() if row.figures else {}}
            rows.append(_finite(data, (), undefined) | {"status": row.status, "undefined": [_place(where) for where in undefined]})
        return {"rows": rows} | ({"series": [_finite(trend.to_json(), (), []) for trend in self.trends]} if self.series else {})

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")

    def write_markdown(self, path: Path) -> None:
        """Append the run's summary in Markdown (GitHub Actions' job summary is appended to by every step)."""
        with path.open("a", encoding="utf-8") as out:
            out.write(markdown(self))

    def annotations(self, root: Path) -> list[str]:
        """GitHub Actions workflow commands that mark each failed expectation on its line of the spec file."""
        return [annotation(row, result, root) for row in self.rows.values() for result in row.results if result.outcome == "failed"]

    def write_html(self, path: Path) -> None:
        sections = "\n".join([*map(_trend_section, self.trends), *map(_section, self.rows.values())]) or "<p>No circuit specs ran.</p>"
        path.write_text(PAGE.format(style=STYLE, sections=sections), encoding="utf-8")


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells as lines, each column as wide as its widest cell."""
    widths = [max(len(line[i]) for line in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in rows]


def _finite(value: object, where: tuple, undefined: list[tuple]) -> object:
    """``value`` with every NaN or infinity replaced by ``None``; their places (keys and indices) are appended to ``undefined``."""
    if isinstance(value, float) and not math.isfinite(value):
        undefined.append(where)
        return None
    if isinstance(value, dict):
        return {key: _finite(item, (*where, str(key)), undefined) for key, item in value.items()}  # as JSON names keys
    if isinstance(value, list):
        return [_finite(item, (*where, i), undefined) for i, item in enumerate(value)]
    return value


def _place(where: tuple) -> str:
    """A place :func:`_finite` found, as the JSON report names it: ``figures.curve.faithfulness[2]``."""
    return "".join(f"[{step}]" if isinstance(step, int) else f".{step}" if i else step for i, step in enumerate(where))


def _number(value: float | None, form: str = "{:.2f}") -> str:
    """A figure as the reports print it: "-" when not measured, "undefined" when not a number (docs/method.md)."""
    return "-" if value is None else form.format(value) if math.isfinite(value) else "undefined"


def _last(rates: dict[int, float]) -> str:
    """The rate of the largest circuit measured, as 'rate@size'."""
    if not rates:
        return "-"
    size = max(rates)
    return f"{_number(rates[size])}@{size}"


# --------------------------------------------------------------------------- Markdown and GitHub annotations


def markdown(report: Report) -> str:
    """The run as Markdown: one line per spec and model, each failure, and each spec's trend over a series."""
    lines = ["## circuit-tests", "", *_md_table(
        [["spec", "model", "accuracy", "nodes for 0.8", "CPR / CMD", "overlap", "result"]]
        + [[row.spec, row.model, _number(f.accuracy), _number(f.nodes_for_08, "{:.0f}"), _areas(f), _number(f.overlap),
            f"{row.status} ({sum(r.outcome == 'passed' for r in row.results)}/{len(row.results)})"]
           for row, f in ((row, row.figures or NOTHING) for row in report.rows.values())])]
    failures = [(row, r) for row in report.rows.values() for r in row.results if r.outcome == "failed"]
    for title, listed in (("Failed", failures), ("Not run", report.not_run())):
        lines += ["", f"### {title}", ""] if listed else []
        lines += [f"- **{_md(row.spec)}** {_code(r.expectation)} on {_code(row.model)}: {_md(r.message.splitlines()[0] if r.message else '')}"
                  for row, r in listed]
    for trend in report.trends:
        lines += ["", f"### {_md(trend.spec)} over {len(trend.points)} checkpoints", "", *_md_table(table(trend)), "",
                  _md(first_failure_line(trend))]
        if trend.matrix is not None:
            lines += ["", "Faithfulness of each checkpoint's circuit (rows) on each checkpoint (columns):", "",
                      *_md_table(matrix_table(trend))]
    return "\n".join(lines) + "\n"


def _md_table(rows: Sequence[Sequence[str]]) -> list[str]:
    header, *body = [[_md(cell) for cell in row] for row in rows]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(row) + " |" for row in body]


_MARKUP = re.compile(r"([\\`*_{}\[\]()!|~])")  # what Markdown reads as emphasis, links, images, code and tables


def _md(text: str) -> str:
    """Text from a spec or a model name, inert in Markdown: one line, HTML escaped, and every character of Markdown's
    markup backslash-escaped, so that ``![i](URL)`` shows as written instead of loading an image."""
    return _MARKUP.sub(r"\\\1", html.escape(printable(text, one_line=True), quote=False))


def _code(text: str) -> str:
    """Text from a spec or a model name as a code span, where Markdown reads no markup: one line, no backtick."""
    return f"`{printable(text, one_line=True).replace('`', chr(39))}`"


def annotation(row: Row, result: Result, root: Path) -> str:
    """``::error file=...,line=...,title=...::message``: GitHub Actions marks the expectation's line in the spec file."""
    path = Path(row.path)
    where = path.relative_to(root) if path.is_relative_to(root) else path
    properties = {"file": str(where), **({"line": str(result.line)} if result.line else {}),
                  "title": f"{row.spec}::{result.expectation}[{row.model}]"}
    fields = ",".join(f"{key}={_escaped(value, property=True)}" for key, value in properties.items())
    return f"::error {fields}::{_escaped(result.message)}"


def github_step_summary() -> Path | None:
    """GitHub Actions' job summary file, when this run is a step of a GitHub Actions job."""
    found = os.environ.get("GITHUB_STEP_SUMMARY")
    return Path(found) if found and os.environ.get("GITHUB_ACTIONS") == "true" else None


def github_annotations(report: Report, root: Path) -> list[str]:
    """Under GitHub Actions, :meth:`Report.annotations` with paths from the workspace (else from ``root``); elsewhere none."""
    if os.environ.get("GITHUB_ACTIONS") != "true":
        return []
    return report.annotations(Path(os.environ.get("GITHUB_WORKSPACE") or root))


def _escaped(text: str, property: bool = False) -> str:
    """Text as a workflow command carries it (GitHub's escaping: %, CR, LF; and in a property, ':' and ',')."""
    text = printable(text).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if property else text


# --------------------------------------------------------------------------- HTML

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>circuit-tests report</title>
<style>{style}</style></head>
<body><h1>circuit-tests report</h1>
{sections}
</body></html>
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1100px; color: #222; }
section { border: 1px solid #ddd; border-radius: 6px; padding: 0 1em 1em; margin-bottom: 1.5em; }
h2 .passed, td.passed { color: #17803d; } h2 .failed, td.failed { color: #b42318; } h2 .skipped, td.skipped { color: #777; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border-bottom: 1px solid #eee; padding: 2px 8px; text-align: left; vertical-align: top; }
.grid { display: flex; gap: 2em; flex-wrap: wrap; } pre { margin: 0; white-space: pre-wrap; font-size: 12px; }
"""


def _trend_section(trend: Trend) -> str:
    """A spec over the series: one small panel per figure against the step, with the threshold of the expectation that
    judges it dashed, the checkpoints where that expectation failed in red, and the first of them marked."""
    panels = "".join(_trend_svg(trend, key) for key in FIGURES if any(point.figures[key] is not None for point in trend.points))
    matrix = "" if trend.matrix is None else (
        "<h3>Faithfulness of each checkpoint's circuit (rows) on each checkpoint (columns)</h3><table>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(value)}</td>" for value in row) + "</tr>" for row in matrix_table(trend))
        + "</table>")
    return (f"<section class='trend'><h2>{html.escape(trend.spec)} over {len(trend.points)} checkpoints</h2>"
            f"<p>{html.escape(first_failure_line(trend))}</p><div class='grid'>{panels}</div>{matrix}</section>")


def _trend_svg(trend: Trend, key: str, width: int = 250, height: int = 160) -> str:
    left, bottom, right, top = 40, height - 28, width - 12, 26
    xs = [point.x for point in trend.points]
    first = next((point.x for point in trend.points if trend.failed_at(point, key)), None)
    known = [(p.x, p.figures[key], trend.failed_at(p, key)) for p in trend.points
             if p.figures[key] is not None and math.isfinite(p.figures[key])]
    line = trend.threshold(key)
    if not known:
        return ""
    values = [value for _, value, _ in known] + ([line] if line is not None else [])
    low, high = (0.0, max(values)) if key == "nodes_for_0.8" else (min(0.0, *values), max(1.0, *values))
    high = high if high > low else low + 1

    def x(step: float) -> float:
        return left + (right - left) * (step - xs[0]) / ((xs[-1] - xs[0]) or 1)

    def y(value: float) -> float:
        return bottom - (bottom - top) * (value - low) / (high - low)

    drawn = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v, _ in known)
    dots = "".join(f"<circle cx='{x(s):.1f}' cy='{y(v):.1f}' r='3' fill='{'#d1242f' if failed else '#1f6feb'}'>"
                   f"<title>step {s}: {cell(key, v)}</title></circle>" for s, v, failed in known)
    threshold = (f"<line x1='{left}' x2='{right}' y1='{y(line):.1f}' y2='{y(line):.1f}' stroke='#555' stroke-dasharray='5 4'>"
                 f"<title>threshold {line:g}</title></line>") if line is not None else ""
    marker = (f"<line x1='{x(first):.1f}' x2='{x(first):.1f}' y1='{top}' y2='{bottom}' stroke='#d1242f' stroke-width='1.5'>"
              f"<title>first failure: step {first}</title></line>") if first is not None else ""
    axes = (f"<text x='{left - 4}' y='{y(high) + 3:.1f}' font-size='10' text-anchor='end'>{cell(key, high)}</text>"
            f"<text x='{left - 4}' y='{y(low) + 3:.1f}' font-size='10' text-anchor='end'>{cell(key, low)}</text>"
            f"<text x='{left}' y='{height - 10}' font-size='10'>{xs[0]}</text>"
            f"<text x='{right}' y='{height - 10}' font-size='10' text-anchor='end'>{xs[-1]}</text>")
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' aria-label='{FIGURES[key]}'>"
            f"<text x='{left}' y='14' font-size='11'>{FIGURES[key]}</text>"
            f"<line x1='{left}' x2='{right}' y1='{bottom}' y2='{bottom}' stroke='#ddd'/>{axes}{threshold}{marker}"
            f"<polyline fill='none' stroke='#1f6feb' stroke-width='2' points='{drawn}'/>{dots}</svg>")


def _areas(figures: Figures) -> str:
    """CPR/CMD under absolute ranking (MIB's default) for the tables; "-" where not measured."""
    area = figures.areas.get("absolute")
    return "-" if area is None else f"{_number(area.cpr)}/{_number(area.cmd)}"


def _area_text(area: AreaFigures, cmd_from: AreaFigures | None = None) -> str:
    """CPR / CMD with their intervals, the CMD from ``cmd_from`` where given (MIB's pairing), else from ``area``."""
    other = cmd_from or area
    return (f"{_number(area.cpr)} (95% CI {_number(area.cpr_interval[0])} to {_number(area.cpr_interval[1])}) / "
            f"{_number(other.cmd)} (95% CI {_number(other.cmd_interval[0])} to {_number(other.cmd_interval[1])})")


def _mib_pair(figures: Figures) -> list[tuple[str, str]]:
    """The report's line for CPR and CMD as MIB's published tables pair them, where both rankings were measured."""
    if figures.mib_pair is None:
        return []
    signed, absolute = figures.mib_pair
    return [(f"MIB's CPR / CMD as MIB pairs them (CPR from signed ranking, CMD from absolute ranking, {signed.ablation} "
             "ablation)", _area_text(signed, absolute))]


def _section(row: Row) -> str:
    figures = row.figures or NOTHING
    split = (figures.n_train, figures.n_test, figures.n_dropped) if row.figures else ("-",) * 3
    facts = [("checkpoint revision", figures.revision), ("device / dtype", f"{figures.device} / {figures.dtype}"),
             ("train / test / dropped", " / ".join(map(str, split))),
             *(("dropped", drop) for drop in figures.dropped),
             ("accuracy", _number(figures.accuracy)), ("nodes for 0.8 faithfulness", _number(figures.nodes_for_08, "{:.0f}")),
             *((f"MIB's CPR / CMD ({area.ranking} ranking, {area.ablation} ablation)", _area_text(area))
               for area in figures.areas.values()),
             *_mib_pair(figures),
             *((f"{null.figure} of the top {null.size} against {len(null.draws)} random circuits of its shape",
                f"{null.circuit:.3f} against a mean of {null.circuit - null.margin:.3f}: margin {null.margin:+.3f}, p = {null.p:.3f}")
               for null in figures.nulls.values()),
             ("flip rate", _rates(figures.flip_rate)), ("steering success", _rates(figures.steering)),
             *((f"pinned: {what}", ", ".join(f"{figure.replace('_', ' ')} {value:.3f}" for figure, value in measured.items()))
               for what, measured in figures.pinned.items()),
             ("overlap with baseline", _number(figures.overlap))]
    fact_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    results = "".join(
        f"<tr><td>{html.escape(r.expectation)}</td><td class='{r.outcome}'>{r.outcome}</td><td><pre>{html.escape(r.message)}</pre></td></tr>"
        for r in row.results
    )
    return (
        f"<section><h2>{html.escape(row.spec)} [{html.escape(row.model)}] <span class='{row.status}'>{row.status}</span></h2>"
        f"<p>{html.escape(row.path)}</p>" + (f"<p class='description'>{html.escape(row.description)}</p>" if row.description else "")
        + f"<div class='grid'><table>{fact_rows}</table>{_curve_svg(figures.curve, figures.stored_baseline)}</div>"
        f"<h3>Expectations</h3><table><tr><th>expectation</th><th>result</th><th>report</th></tr>{results}</table>"
        + _top_nodes(figures) + _moved_nodes(figures) + graph_section(figures.graph) + "</section>"
    )


def _top_nodes(figures: Figures) -> str:
    """The strongest nodes, with the token at each position and, beside a stored baseline, each node's rank in its
    circuit and the baseline's top nodes this run lacks."""
    if not figures.top:
        return ""
    stored = figures.stored_baseline
    ranked = stored is not None and len(stored.ranks) == len(figures.top)
    head = "<tr><th>layer</th><th>position</th><th>neuron</th><th>score</th>" + (
        f"<th>rank in {html.escape(printable(stored.model))}'s baseline</th>" if ranked else "") + "<th>card</th></tr>"
    rows = "".join(
        f"<tr><td>{layer}</td><td>{html.escape(_position(position, figures.tokens))}</td><td>{neuron}</td><td>{score:+.4f}</td>"
        + (f"<td>{stored.ranks[i] or 'new'}</td>" if ranked else "")
        + f"<td>{_card(figures, (layer, position, neuron))}</td></tr>"
        for i, (layer, position, neuron, score) in enumerate(figures.top)
    )
    lost = ", ".join(_lost(layer, position, neuron, rank, figures.tokens)
                     for layer, position, neuron, rank in (stored.lost if stored else []))
    lost_line = (f"<p class='lost'>In the top {len(figures.top)} of {html.escape(printable(stored.model))}'s baseline, "
                 f"not in this run's: {html.escape(lost)}</p>") if lost else ""
    return f"<h3>Top nodes</h3><table>{head}{rows}</table>{lost_line}"


def _moved_nodes(figures: Figures) -> str:
    """The nodes that entered and left the stored circuit (``stable``), the strongest with their cards."""
    if not figures.moved:
        return ""
    parts = []
    for way in ("entered", "left"):
        names = figures.moved.get(way, [])
        described = "".join(f"<li>{_card(figures, parse_node(name))}</li>" for name in names if name in figures.cards)
        rest = [name for name in names if name not in figures.cards]
        parts.append(f"<h4>{way.capitalize()} ({len(names)})</h4><ul class='cards'>{described}</ul>"
                     + (f"<p>{html.escape(', '.join(rest))}</p>" if rest else ""))
    return "<h3>Nodes that moved against the baseline circuit</h3>" + "".join(parts)


PALETTE = ("#1f6feb", "#d97706", "#16a34a", "#9333ea", "#db2777", "#0891b2", "#65a30d", "#78716c")
GRAPH_EDGES = 40  # the strongest edges drawn; the JSON has every one


def graph_section(graph: dict | None) -> str:
    """A circuit's graph (:meth:`~circuit_tests.analysis.edges.Graph.to_json`): one column per layer, a node's colour its
    cluster, an edge's width its weight (blue: raises the target's activation, red: lowers it); hovering a node shows
    its card's line, and each cluster's cards unfold below."""
    if not graph or not graph.get("nodes"):
        return ""
    cards = [Card.from_json(node) for node in graph["nodes"]]
    clusters = [node["cluster"] for node in graph["nodes"]]
    legend = "".join(
        f"<details><summary><span style='color:{PALETTE[c['id'] % len(PALETTE)]}'>&#9679;</span> cluster {c['id']} "
        f"({len(c['members'])} nodes): {html.escape(printable(c['label']))}</summary><ul class='cards'>"
        + "".join(f"<li>{_folded(card)}</li>" for card, cluster in zip(cards, clusters) if cluster == c["id"])
        + "</ul></details>" for c in graph["clusters"])
    return (f"<h3>Circuit graph: top {len(cards)} nodes, {len(graph['edges'])} edges (the strongest "
            f"{min(GRAPH_EDGES, len(graph['edges']))} drawn)</h3>{_graph_svg(cards, clusters, graph['edges'])}{legend}")


def _graph_svg(cards: Sequence[Card], clusters: Sequence[int], edges: Sequence[dict], row: int = 26, room: int = 1000) -> str:
    """Layers left to right, a layer's nodes top to bottom in circuit order; an edge arcs over the layers it skips."""
    layers = sorted({card.node[0] for card in cards})
    column = min(70, room // max(1, len(layers)))
    arc = 70  # room above the nodes for the arcs of long edges
    slots: dict[int, int] = {}
    where = {}
    for card in cards:
        layer = card.node[0]
        slots[layer] = slots.get(layer, 0) + 1
        where[format_node(card.node)] = (30 + column * layers.index(layer), arc + 20 + row * (slots[layer] - 1))
    width, height = 60 + column * (len(layers) - 1), arc + 40 + row * (max(slots.values()) - 1)
    drawn = [edge for edge in edges[:GRAPH_EDGES] if edge["source"] in where and edge["target"] in where]
    strongest = max((abs(edge["weight"]) for edge in drawn), default=1.0) or 1.0

    def path(edge: dict) -> str:
        (x1, y1), (x2, y2) = where[edge["source"]], where[edge["target"]]
        lift = min(arc, 6 * (x2 - x1) / column)
        return f"M{x1},{y1} Q{(x1 + x2) / 2:.1f},{min(y1, y2) - lift:.1f} {x2},{y2}"

    lines = "".join(
        f"<path d='{path(e)}' fill='none' stroke='{'#1f6feb' if e['weight'] > 0 else '#d1242f'}' stroke-opacity='0.55' "
        f"stroke-width='{0.5 + 3.5 * abs(e['weight']) / strongest:.2f}'>"
        f"<title>{html.escape(e['source'])} -> {html.escape(e['target'])} {e['weight']:+.4g}</title></path>" for e in drawn)
    dots = "".join(
        f"<circle cx='{where[format_node(card.node)][0]}' cy='{where[format_node(card.node)][1]}' r='7' "
        f"fill='{PALETTE[cluster % len(PALETTE)]}'><title>{html.escape(printable(card.summary()))}</title></circle>"
        for card, cluster in zip(cards, clusters))
    axis = "".join(f"<text x='{30 + column * i}' y='{height - 4}' font-size='10' text-anchor='middle'>L{layer}</text>"
                   for i, layer in enumerate(layers))
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height + 10}' role='img' "
            f"aria-label='circuit graph'>{lines}{dots}{axis}</svg>")


def graph_page(title: str, graph: dict) -> str:
    """A standalone page holding one circuit's graph (``circuit-tests graph --html``)."""
    return PAGE.format(style=STYLE, sections=f"<section><h2>{html.escape(printable(title))}</h2>{graph_section(graph)}</section>")


def _card(figures: Figures, node: tuple) -> str:
    """A node's card, folded: one line (the token there, what it promotes and suppresses), the whole card on expanding."""
    data = figures.cards.get(format_node(node))
    return "" if data is None else _folded(Card.from_json(data))


def _folded(card: Card) -> str:
    return (f"<details><summary>{html.escape(printable(card.summary()))}</summary>"
            f"<pre>{html.escape(printable(chr(10).join(card.lines())))}</pre></details>")


def _position(position: int | None, tokens: dict[str, list]) -> str:
    """A node's position with the tokens there and their counts when known (``-1 ' she' x12, ' he' x3``); ``-`` for
    every position."""
    if position is None:
        return "-"
    there = tokens.get(str(position))
    return f"{position} {counted(there)}" if there else str(position)


def _lost(layer: int, position: int | None, neuron: int, rank: int, tokens: dict[str, list]) -> str:
    """A baseline node this run lacks, as :func:`~circuit_tests.model.nodes.format_node` writes it, with its rank and
    the tokens at its position when known (``L5/P-1/N9 (rank 1; ' she' x12, ' he' x3)``)."""
    there = None if position is None else tokens.get(str(position))
    return f"{format_node((layer, position, neuron))} (rank {rank}" + (f"; {counted(there)})" if there else ")")


def _rates(rates: dict[int, float]) -> str:
    return ", ".join(f"{_number(value)} at {size}" for size, value in sorted(rates.items())) or "-"


def _curve_svg(curve: CurveFigures | None, stored: BaselineFigures | None, width: int = 420, height: int = 270) -> str:
    """Faithfulness and completeness against circuit size (log scale), as inline SVG: 95% intervals as shaded bands,
    the stored baseline's faithfulness dashed. The value axis spans 0 to 1 and whatever the figures reach beyond."""
    if curve is None:
        return ""
    left, bottom, right, top = 45, height - 30, width - 25, 40
    baseline = sorted(stored.faithfulness.items()) if stored else []
    sizes = sorted({*curve.sizes, *(size for size, _ in baseline)})
    values = [v for v in _curve_values(curve, baseline) if math.isfinite(v)]
    low, high = min(0.0, *values), max(1.0, *values)
    span = math.log(sizes[-1] / sizes[0]) or 1.0

    def x(size: float) -> float:
        return left + (right - left) * math.log(size / sizes[0]) / span

    def y(value: float) -> float:
        return bottom - (bottom - top) * (value - low) / (high - low)

    def line(points: list[tuple[int, float]], colour: str, dashed: bool = False) -> str:
        drawn = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points if math.isfinite(v))
        dash = " stroke-dasharray='6 4'" if dashed else ""
        return f"<polyline fill='none' stroke='{colour}' stroke-width='2'{dash} points='{drawn}'/>"

    def band(interval: list[list[float]] | None, colour: str) -> str:
        known = [(s, lo, hi) for s, (lo, hi) in zip(curve.sizes, interval or []) if math.isfinite(lo) and math.isfinite(hi)]
        if not known:
            return ""
        outline = [(s, hi) for s, _, hi in known] + [(s, lo) for s, lo, _ in reversed(known)]
        drawn = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in outline)
        return f"<polygon fill='{colour}' fill-opacity='0.15' stroke='none' points='{drawn}'><title>95% interval</title></polygon>"

    rows = _tick_rows([x(s) for s in sizes], [str(s) for s in sizes])
    below = LABEL_ROW * max(rows)  # room under the plot for the labels of sizes too close to share a row
    ticks = "".join(f"<text x='{x(s):.1f}' y='{height - 12 + LABEL_ROW * row}' font-size='{LABEL_FONT}' text-anchor='middle'>{s}</text>"
                    for s, row in zip(sizes, rows))
    levels = "".join(
        f"<line x1='{left}' x2='{right}' y1='{y(v):.1f}' y2='{y(v):.1f}' stroke='#ddd'/>"
        f"<text x='{left - 5}' y='{y(v) + 3:.1f}' font-size='{LABEL_FONT}' text-anchor='end'>{v:.2f}</text>"
        for v in _levels([0.0, 1.0, low, high, 0.8, 0.5], y)
    )
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height + below}' role='img' "
            f"aria-label='faithfulness curve'>{levels}{ticks}"
            f"{band(curve.faithfulness_interval, '#1f6feb')}{band(curve.completeness_interval, '#d1242f')}"
            f"{line(list(zip(curve.sizes, curve.faithfulness)), '#1f6feb')}{line(list(zip(curve.sizes, curve.completeness)), '#d1242f')}"
            + (line(baseline, '#555', dashed=True) if baseline else "") + _legend(curve, stored.model if baseline else None)
            + f"<text x='{(left + right) / 2}' y='{height + below}' font-size='{LABEL_FONT}' text-anchor='middle'>nodes</text></svg>")


LABEL_FONT = 10  # px: the curve plot's axis labels
LABEL_ROW = 11  # px between two rows of size labels
LABEL_GAP = 3  # px kept clear between two labels


def label_width(label: str) -> float:
    """A generous estimate of a label's width in px: sans-serif digits advance 0.55 to 0.64 of the font size."""
    return 0.65 * LABEL_FONT * len(label)


def _tick_rows(xs: Sequence[float], labels: Sequence[str]) -> list[int]:
    """The row (0: nearest the plot) of each size's label, centred on its tick (``xs`` ascending): the first row where it
    clears that row's last label by :data:`LABEL_GAP`, so that no two overlap however close two sizes are (94 and 100)."""
    ends: list[float] = []  # the right edge of each row's last label
    rows = []
    for x, label in zip(xs, labels):
        start = x - label_width(label) / 2
        row = next((i for i, end in enumerate(ends) if start >= end + LABEL_GAP), len(ends))
        ends[row:row + 1] = [x + label_width(label) / 2]
        rows.append(row)
    return rows


def _levels(wanted: Sequence[float], y: Callable[[float], float]) -> list[float]:
    """The values on the value axis that get a line and a label, from ``wanted`` in order of importance: each where its
    label clears those kept before it (0.8 and 1.0 are 4 px apart on an axis up to 10)."""
    kept: list[float] = []
    for value in wanted:
        if all(abs(y(value) - y(other)) >= LABEL_FONT + LABEL_GAP for other in kept):
            kept.append(value)
    return kept


def _legend(curve: CurveFigures, baseline: str | None) -> str:
    """What the curve plot's colours, shading and dashes stand for."""
    shaded = curve.faithfulness_interval or curve.completeness_interval
    return ("<text x='45' y='14' font-size='11' fill='#1f6feb'>faithfulness</text>"
            "<text x='135' y='14' font-size='11' fill='#d1242f'>completeness</text>"
            + ("<text x='230' y='14' font-size='11' fill='#777'>shaded: 95% interval</text>" if shaded else "")
            + (f"<line x1='45' x2='70' y1='25' y2='25' stroke='#555' stroke-width='2' stroke-dasharray='6 4'/>"
               f"<text x='75' y='29' font-size='11' fill='#555'>{html.escape(printable(baseline, one_line=True))}'s baseline</text>"
               if baseline else ""))


def _curve_values(curve: CurveFigures, baseline: list[tuple[int, float]]) -> list[float]:
    """Every value the curve plot draws."""
    intervals = [bound for pair in (curve.faithfulness_interval or []) + (curve.completeness_interval or []) for bound in pair]
    return [*curve.faithfulness, *curve.completeness, *intervals, *(value for _, value in baseline)]
