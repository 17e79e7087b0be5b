"""What one spec measured on one model, as typed figures: what reports show and baselines store.

A :class:`~circuit_tests.spec.subject.Subject` fills a :class:`Figures` as it measures (a
figure is ``None``, or empty, until measured), expectations read their numbers from the subject,
and the report and baselines read the figures. Between pytest-xdist workers and the controller,
and in the JSON report, figures travel as :meth:`Figures.to_json`: plain data with the keys
the report has always had (``nodes_for_0.8``, circuit sizes as strings). The session adds the
stored baseline the report compares with (:class:`BaselineFigures`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


CHANCE = 0.5  # a spec's task is a choice between two answers, the clean and the counterfactual one
MAX_P = 0.05  # the behaviour exists when accuracy exceeds chance with 95% confidence (one-sided, exact)


@dataclass(frozen=True)
class BehaviourFigures:
    """Whether the model does the task on the held-out split: every circuit claim is judged only where it does.

    It does when its accuracy exceeds :data:`CHANCE` with 95% confidence (an exact one-sided binomial
    test) and the 95% bootstrap interval of its mean logit difference lies above 0.
    """

    right: int  # held-out examples whose clean answer the model prefers
    n: int  # held-out examples
    p: float  # the chance of ``right`` or more of ``n`` by guessing (analysis.stats.above_chance)
    logit_diff: float  # mean logit(clean answer) - logit(counterfactual answer)
    logit_diff_interval: list[float]

    @property
    def present(self) -> bool:
        return self.p < MAX_P and self.logit_diff_interval[0] > 0

    def __str__(self) -> str:
        low, high = self.logit_diff_interval
        return (f"{self.right} of {self.n} held-out examples answered right (accuracy {self.right / self.n:.3f}; "
                f"p = {self.p:.3g} that guessing between the two answers does as well, at most {MAX_P:g} needed); "
                f"mean logit difference {self.logit_diff:.3f} (95% CI {low:.3f} to {high:.3f}, above 0 needed)")


@dataclass(frozen=True)
class CurveFigures:
    """Faithfulness and completeness of the top-``size`` circuits, per size, with their 95% bootstrap intervals when known."""

    sizes: list[int]
    faithfulness: list[float]
    completeness: list[float]
    faithfulness_interval: list[list[float]] | None = None  # [low, high] per size
    completeness_interval: list[list[float]] | None = None  # [low, high] per size


@dataclass(frozen=True)
class AreaFigures:
    """MIB's curve (:mod:`circuit_tests.analysis.areas`) under one ranking and ablation, with CPR and CMD and their 95%
    bootstrap intervals."""

    ranking: str  # "absolute" or "signed"
    ablation: str  # the spec's trace.ablation
    fractions: list[float]  # of all nodes
    sizes: list[int]  # nodes at each fraction
    faithfulness: list[float]
    cpr: float
    cpr_interval: list[float]
    cmd: float
    cmd_interval: list[float]


@dataclass(frozen=True)
class NullFigures:
    """A claim's figure for its circuit and for random circuits of the same shape (matched per layer and position)."""

    figure: str  # "faithfulness" or "flip rate"
    size: int
    circuit: float
    draws: list[float]  # one per random circuit

    @property
    def margin(self) -> float:
        """The circuit's figure minus the mean of the draws'."""
        return self.circuit - sum(self.draws) / len(self.draws)

    @property
    def p(self) -> float:
        """(1 + draws at least as good as the circuit) / (1 + draws): how often random circuits do as well."""
        return (1 + sum(draw >= self.circuit for draw in self.draws)) / (1 + len(self.draws))


@dataclass(frozen=True)
class AgreementFigures:
    """The trace's scores against exact activation patching of single nodes (Pearson r), over the pool and its halves."""

    method: str
    nodes: int
    pearson: float
    pearson_top: float  # over the top half by score
    pearson_random: float  # over the random half


@dataclass(frozen=True)
class BaselineFigures:
    """The stored baseline a report compares this run with: whose it is, its curve, where this run's top nodes stand in it.

    ``ranks`` and ``lost`` are empty when the stored circuit cannot be compared node by node (a
    model of another shape, positions counted from the other end).
    """

    model: str
    faithfulness: dict[int, float]  # the stored faithfulness, by circuit size
    ranks: list[int | None] = field(default_factory=list)  # per node of Figures.top: rank in the stored circuit (1 first), None: absent
    lost: list[list] = field(default_factory=list)  # [layer, position, neuron, rank] of stored top-len(top) nodes that Figures.top lacks

    def to_json(self) -> dict:
        return {"model": self.model, "faithfulness": {str(size): value for size, value in sorted(self.faithfulness.items())},
                "ranks": self.ranks, "lost": self.lost}

    @classmethod
    def from_json(cls, data: dict) -> BaselineFigures:
        return cls(model=data["model"], faithfulness={int(size): value for size, value in data["faithfulness"].items()},
                   ranks=data["ranks"], lost=data["lost"])


@dataclass
class Figures:
    """Every figure of one (spec, model); measurements are added as the subject makes them."""

    model: str
    revision: str
    device: str
    dtype: str
    n_train: int
    n_test: int
    n_dropped: int
    dropped: list[str] = field(default_factory=list)  # "FILE:LINE: why", one per dropped example
    repeated: list[str] = field(default_factory=list)  # "FILE:LINE repeats FILE:LINE", one per repeated example
    accuracy: float | None = None
    behaviour: BehaviourFigures | None = None  # whether the model does the task at all, before any circuit claim
    separation: list[float] | None = None  # F(M) - F(empty) and its 95% interval: a ratio over it is undefined near 0
    curve: CurveFigures | None = None
    areas: dict[str, AreaFigures] = field(default_factory=dict)  # MIB's curve and areas, by ranking
    agreement: AgreementFigures | None = None  # agrees_with_patching
    nulls: dict[str, NullFigures] = field(default_factory=dict)  # "faithfulness@100", "flip rate@30" -> against random circuits
    nodes_for_08: float | None = None  # circuit size reaching 0.8 faithfulness; None with the curve: not reached
    flip_rate: dict[int, float] = field(default_factory=dict)  # by circuit size
    steering: dict[int, float] = field(default_factory=dict)  # by neurons patched
    sweep: dict[str, dict[str, float]] = field(default_factory=dict)  # "N neurons" -> factor -> mean P(token)
    pinned: dict[str, dict[str, float]] = field(default_factory=dict)  # what is pinned -> "flip_rate"/"faithfulness" -> value
    top: list[list] = field(default_factory=list)  # [layer, position, neuron, signed score], strongest first
    circuit: list[list] = field(default_factory=list)  # the same rows for stable's circuit, else the nodes for 0.8 (or 100)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage ("trace", "faithfulness curve", ...), cached or not
    tokens: dict[str, list] = field(default_factory=dict)  # position ("-1") -> its most frequent held-out tokens, [[text, count], ...]
    cards: dict[str, dict] = field(default_factory=dict)  # node name ("L3/P-1/N77") -> its card (Card.to_json)
    moved: dict[str, list[str]] = field(default_factory=dict)  # "entered"/"left" -> node names, when stable compared
    graph: dict | None = None  # the circuit's graph (Graph.to_json), when the run asked for one
    overlap: float | None = None  # with the stored baseline circuit (stable)
    baseline: str | None = None  # whose baseline that was
    stored_circuit_faithfulness: float | None = None  # the stored circuit's faithfulness now
    stored_baseline: BaselineFigures | None = None  # the baseline the report compares with (added by the session)

    @property
    def mib_pair(self) -> tuple[AreaFigures, AreaFigures] | None:
        """The areas as MIB pairs them in its published tables (its ``print_results.py``): CPR from the signed
        ranking's curve, CMD from the absolute ranking's, as (signed, absolute); ``None`` unless both were measured."""
        if {"signed", "absolute"} <= self.areas.keys():
            return self.areas["signed"], self.areas["absolute"]
        return None

    def to_json(self) -> dict:
        """Plain data: the figures measured so far, under the report's keys."""
        data: dict = {"model": self.model, "revision": self.revision, "device": self.device, "dtype": self.dtype,
                      "n_train": self.n_train, "n_test": self.n_test, "n_dropped": self.n_dropped}
        if self.dropped:
            data["dropped"] = self.dropped
        if self.repeated:
            data["n_repeated"], data["repeated"] = len(self.repeated), self.repeated
        if self.accuracy is not None:
            data["accuracy"] = self.accuracy
        if self.behaviour is not None:
            data["behaviour"] = asdict(self.behaviour) | {"present": self.behaviour.present}
        if self.separation is not None:
            data["separation"] = self.separation
        if self.curve is not None:
            data["curve"] = {name: value for name, value in asdict(self.curve).items() if value is not None}
            data["nodes_for_0.8"] = self.nodes_for_08
        if self.areas:
            data["areas"] = {ranking: asdict(area) for ranking, area in self.areas.items()}
        if self.agreement is not None:
            data["agreement"] = asdict(self.agreement)
        if self.nulls:
            data["nulls"] = {key: asdict(null) | {"margin": null.margin, "p": null.p} for key, null in self.nulls.items()}
        if self.flip_rate:
            data["flip_rate"] = {str(size): rate for size, rate in sorted(self.flip_rate.items())}
        if self.steering:
            data["steering"] = {str(size): rate for size, rate in self.steering.items()}
        if self.sweep:
            data["sweep"] = self.sweep
        if self.pinned:
            data["pinned"] = self.pinned
        if self.top:
            data["top"] = self.top
        if self.circuit:
            data["circuit"] = self.circuit
        if self.tokens:
            data["tokens"] = self.tokens
        if self.cards:
            data["cards"] = self.cards
        if self.moved:
            data["moved"] = self.moved
        if self.graph is not None:
            data["graph"] = self.graph
        if self.timings:
            data["timings"] = {stage: round(seconds, 3) for stage, seconds in self.timings.items()}
        for name in ("overlap", "baseline", "stored_circuit_faithfulness"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.stored_baseline is not None:
            data["stored_baseline"] = self.stored_baseline.to_json()
        return data

    def merged(self, later: Figures) -> Figures:
        """These figures with what ``later`` measured: each field ``later`` has set replaces this one's, and the
        figures kept by size or name (flip rates, steering, sweeps, timings) are joined."""
        fields = {}
        for name, mine in vars(self).items():
            theirs = getattr(later, name)
            if isinstance(mine, dict):
                fields[name] = mine | theirs
            else:
                fields[name] = mine if theirs is None or (isinstance(theirs, list) and not theirs) else theirs
        return Figures(**fields)

    @classmethod
    def from_json(cls, data: dict) -> Figures:
        """The figures :meth:`to_json` wrote (an empty mapping: a spec that could not be read)."""
        curve, stored = data.get("curve"), data.get("stored_baseline")
        return cls(
            model=data.get("model", "-"), revision=data.get("revision", "-"), device=data.get("device", "-"),
            dtype=data.get("dtype", "-"), n_train=data.get("n_train", 0), n_test=data.get("n_test", 0),
            n_dropped=data.get("n_dropped", 0), dropped=data.get("dropped", []), repeated=data.get("repeated", []),
            accuracy=data.get("accuracy"),
            behaviour=BehaviourFigures(**{key: value for key, value in data["behaviour"].items() if key != "present"})
            if data.get("behaviour") else None, separation=data.get("separation"),
            curve=CurveFigures(**curve) if curve else None,
            areas={ranking: AreaFigures(**area) for ranking, area in data.get("areas", {}).items()},
            agreement=AgreementFigures(**data["agreement"]) if data.get("agreement") else None,
            nulls={key: NullFigures(null["figure"], null["size"], null["circuit"], null["draws"])
                   for key, null in data.get("nulls", {}).items()}, nodes_for_08=data.get("nodes_for_0.8"),
            flip_rate={int(size): rate for size, rate in data.get("flip_rate", {}).items()},
            steering={int(size): rate for size, rate in data.get("steering", {}).items()},
            sweep=data.get("sweep", {}), pinned=data.get("pinned", {}), top=data.get("top", []), circuit=data.get("circuit", []), tokens=data.get("tokens", {}),
            cards=data.get("cards", {}), moved=data.get("moved", {}), graph=data.get("graph"), timings=data.get("timings", {}), overlap=data.get("overlap"),
            baseline=data.get("baseline"), stored_circuit_faithfulness=data.get("stored_circuit_faithfulness"),
            stored_baseline=BaselineFigures.from_json(stored) if stored else None,
        )
