"""A spec's figures across a checkpoint series: one point per checkpoint, and the first one each expectation failed at.

Built from the report's rows alone (so it works under pytest-xdist too) for the terminal table, the
JSON, HTML and Markdown reports. Each point holds what the spec measured on that checkpoint:
accuracy, nodes for 0.8 faithfulness, the baseline circuit's faithfulness now, CPR where measured, the flip rate and
steering success of the largest circuit measured, and the weighted overlap of its circuit
(:attr:`~circuit_tests.spec.figures.Figures.circuit`: the circuit ``stable`` compared, of the baseline's size,
else the nodes for 0.8) with the stored baseline's and with the previous checkpoint's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from circuit_tests.analysis.selection import overlap
from circuit_tests.model.nodes import Circuit
from circuit_tests.model.series import Checkpoint, axis
from circuit_tests.spec.figures import Figures
from circuit_tests.spec.schema import Area, Behaves, Expectation, Flips, Sparse, Stable, Steers

FIGURES = {  # key in a point's figures -> what the reports call it
    "accuracy": "accuracy",
    "nodes_for_0.8": "nodes for 0.8",
    "stored_circuit_faithfulness": "baseline circuit's faithfulness",
    "cpr": "CPR, the area under MIB's curve (absolute ranking)",
    "flip_rate": "flip rate",
    "steering": "steering success",
    "overlap": "overlap with the baseline",
    "overlap_previous": "overlap with the previous checkpoint",
}


def watched(expectation: Expectation) -> dict[str, float | None]:
    """The trend figures an expectation judges, each with the threshold line it draws (None: judged, no line):
    ``behaves`` accuracy, ``sparse`` at 0.8 nodes for 0.8, ``area`` (absolute ranking) CPR, ``flips`` the flip rate, ``steers`` steering success,
    ``stable`` the overlap with the baseline and the baseline circuit's faithfulness."""
    params = expectation.params
    if isinstance(params, Behaves):
        return {"accuracy": params.min_accuracy}
    if isinstance(params, Sparse) and params.min_faithfulness == 0.8:
        return {"nodes_for_0.8": params.max_nodes}
    if isinstance(params, Area) and params.ranking == "absolute":
        return {"cpr": params.min_cpr}
    if isinstance(params, Flips):
        return {"flip_rate": params.min_flip_rate}
    if isinstance(params, Steers):
        return {"steering": params.min_success}
    if isinstance(params, Stable):
        return {"overlap": params.min_overlap, "stored_circuit_faithfulness": None}
    return {}


@dataclass
class Point:
    """One checkpoint of the series for one spec."""

    checkpoint: str
    x: int  # the step, or the checkpoint's place when steps are not known
    figures: dict[str, float | None]
    failed: list[str] = field(default_factory=list)  # expectations that failed here
    ran: bool = True  # False: the spec did not run in full on this checkpoint (interrupted or deselected, say)


@dataclass
class Trend:
    """A spec's points over the series, in order."""

    spec: str
    path: str
    points: list[Point]
    watches: dict[str, dict[str, float | None]] = field(default_factory=dict)  # expectation -> :func:`watched`
    matrix: list[list[float | None]] | None = None  # [a][b]: checkpoint a's circuit's faithfulness on checkpoint b

    def threshold(self, key: str) -> float | None:
        """The line an expectation draws on the figure ``key``, if one does."""
        return next((lines[key] for lines in self.watches.values() if lines.get(key) is not None), None)

    def failed_at(self, point: Point, key: str) -> bool:
        """Whether an expectation that judges the figure ``key`` failed at ``point``."""
        return any(key in self.watches.get(label, {}) for label in point.failed)

    def first_failures(self) -> dict[str, Point]:
        """Each expectation that failed somewhere -> the first checkpoint it failed at."""
        first: dict[str, Point] = {}
        for point in self.points:
            for expectation in point.failed:
                first.setdefault(expectation, point)
        return first

    def to_json(self) -> dict:
        return {"spec": self.spec, "path": self.path, "watches": self.watches,
                "first_failure": {label: point.checkpoint for label, point in self.first_failures().items()},
                "points": [{"checkpoint": p.checkpoint, "x": p.x, "ran": p.ran, "failed": p.failed, **p.figures}
                           for p in self.points]} | ({"matrix": self.matrix} if self.matrix is not None else {})


def trends(rows: Iterable, series: Sequence[Checkpoint], matrices: dict[str, list[list[float | None]]] | None = None) -> list[Trend]:
    """One trend per spec file among the report's ``rows`` (:class:`~circuit_tests.spec.report.Row`) that ran on the series,
    with the spec's cross-checkpoint faithfulness where ``matrices`` (by spec path) has it."""
    xs = dict(zip((checkpoint.name for checkpoint in series), axis(series)))
    by_spec: dict[str, dict[str, object]] = {}
    for row in rows:
        if row.model in xs:
            by_spec.setdefault(row.path, {})[row.model] = row
    found = []
    for path, runs in by_spec.items():
        points, previous = [], None
        for checkpoint in series:
            row = runs.get(checkpoint.name)
            figures = row.figures if row is not None and row.figures else None
            points.append(Point(checkpoint.name, xs[checkpoint.name], values(figures, previous),
                                [r.expectation for r in row.results if r.outcome == "failed"] if row else [],
                                row is not None and row.complete))
            previous = figures or previous
        watches = {label: lines for row in runs.values() for label, lines in row.watches.items()}
        found.append(Trend(next(iter(runs.values())).spec, path, points, watches, (matrices or {}).get(path)))
    return found


def values(figures: Figures | None, previous: Figures | None) -> dict[str, float | None]:
    """A point's figures (None where the spec did not measure one)."""
    if figures is None:
        return dict.fromkeys(FIGURES)
    return {
        "accuracy": figures.accuracy,
        "nodes_for_0.8": figures.nodes_for_08,
        "stored_circuit_faithfulness": figures.stored_circuit_faithfulness,
        "cpr": figures.areas["absolute"].cpr if "absolute" in figures.areas else None,
        "flip_rate": _largest(figures.flip_rate),
        "steering": _largest(figures.steering),
        "overlap": figures.overlap,
        "overlap_previous": overlap(circuit_of(figures), circuit_of(previous))[1] if figures.circuit and previous and previous.circuit else None,
    }


def _largest(rates: dict[int, float]) -> float | None:
    return rates[max(rates)] if rates else None


def circuit_of(figures: Figures) -> Circuit:
    """The circuit the figures hold (:attr:`~circuit_tests.spec.figures.Figures.circuit`), weighted by |score|."""
    return Circuit.of((row[:3] for row in figures.circuit), (abs(row[3]) for row in figures.circuit))


# --------------------------------------------------------------------------- tables

SHORT = {"accuracy": "acc", "nodes_for_0.8": "n@0.8", "stored_circuit_faithfulness": "base-faith", "cpr": "cpr", "flip_rate": "flip",
         "steering": "steer", "overlap": "ov-base", "overlap_previous": "ov-prev"}


def table(trend: Trend) -> list[list[str]]:
    """The trend as rows of cells, a header first: checkpoint, step, each figure, the expectations that failed."""
    header = ["checkpoint", "step", *SHORT.values(), "failed"]
    rows = [[p.checkpoint, str(p.x), *(cell(key, p.figures[key]) for key in SHORT),
             ", ".join([*p.failed, *([] if p.ran else ["(not run)"])])] for p in trend.points]
    return [header, *rows]


def cell(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if key == "nodes_for_0.8" else f"{value:.2f}"


def matrix_table(trend: Trend) -> list[list[str]]:
    """The cross-checkpoint faithfulness as rows of cells: the circuit of each checkpoint (rows) on each (columns)."""
    steps = [str(point.x) for point in trend.points]
    return [["circuit from", *steps]] + [[step, *(cell("faithfulness", value) for value in row)]
                                             for step, row in zip(steps, trend.matrix or [])]


def first_failure_line(trend: Trend) -> str:
    """``first failure: stable at ckpts/step-6 (step 6); flips at ...``, then the checkpoints not run in full; that every
    expectation held only when none failed and every checkpoint ran in full."""
    first = trend.first_failures()
    missing = [point.checkpoint for point in trend.points if not point.ran]
    if not first and not missing:
        return f"{trend.spec}: every expectation held at every checkpoint"
    parts = ["first failure: " + "; ".join(f"{label} at {point.checkpoint} (step {point.x})" for label, point in first.items())
             if first else "no failure where it ran"]
    parts += [f"not run in full at {len(missing)} of {len(trend.points)} checkpoints: {', '.join(missing)}"] if missing else []
    return f"{trend.spec}: " + "; ".join(parts)
