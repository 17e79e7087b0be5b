"""Null controls: a circuit claim against random circuits of the same shape (as many nodes per layer and position)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
from test_subject import loaded, project  # noqa: F401 -- the tiny model and its agreement data

from circuit_tests.analysis import measures
from circuit_tests.analysis.selection import matched_random
from circuit_tests.errors import SpecError
from circuit_tests.model.nodes import Circuit
from circuit_tests.spec.baselines import BaselineStore
from circuit_tests.spec.expectations import Outcome, _against_null, check
from circuit_tests.spec.figures import Figures, NullFigures
from circuit_tests.spec.report import Row, _section
from circuit_tests.spec.schema import Null, spec_from_mapping
from circuit_tests.spec.subject import Subject


def test_random_circuits_keep_the_circuits_shape_and_are_seeded():
    circuit = Circuit.of([(0, -1, 5), (0, -1, 9), (2, -3, 1), (2, None, 4)])
    draws = matched_random(circuit, n_neurons=16, draws=50, seed=3)
    shape = Counter((layer, position) for layer, position, _ in circuit.nodes)
    for draw in draws:
        assert Counter((layer, position) for layer, position, _ in draw.nodes) == shape
        assert len(set(draw.nodes)) == len(draw.nodes) and all(0 <= neuron < 16 for _, _, neuron in draw.nodes)
    assert draws == matched_random(circuit, 16, 50, 3) and draws != matched_random(circuit, 16, 50, 4)
    assert len({draw.nodes for draw in draws}) > 40


def test_the_p_value_counts_draws_at_least_as_good():
    null = NullFigures("faithfulness", 10, 0.8, [0.1, 0.8, 0.9, 0.2])
    assert null.p == pytest.approx((1 + 2) / 5) and null.margin == pytest.approx(0.8 - 0.5)
    assert Figures.from_json(Figures("m", "r", "cpu", "float32", 1, 1, 0, nulls={"faithfulness@10": null}).to_json()).nulls == {
        "faithfulness@10": null}


def _judged(draws: list[float], circuit: float = 0.9, max_p: float = 0.1) -> Outcome:
    subject = SimpleNamespace(null=lambda figure, size, n: NullFigures(figure, size, circuit, draws))
    held = Outcome(True, "the top 10 nodes are >= 0.80 faithful", "faithfulness 0.900")
    return _against_null(subject, Null(draws=len(draws), max_p=max_p), "faithfulness", 10, held)


def test_a_claim_random_circuits_also_satisfy_fails():
    beaten = _judged([0.1 * i for i in range(9)] + [0.5] * 10)
    assert beaten.passed and "p = 0.050" in beaten.details[0] and "beats random circuits" in beaten.expected
    matched = _judged([0.95] * 3 + [0.1] * 16)
    assert not matched.passed and "p = 0.200 (at most 0.1)" in matched.details[0] and "0.100 to 0.950" in matched.details[0]


def test_a_null_that_no_circuit_could_pass_is_refused(project):  # noqa: F811
    raw = {"name": "a", "models": ["m"], "task": {"examples": [{"clean_prefix": "The author", "patch_prefix": "The authors",
           "clean_answer": " is", "patch_answer": " are"}] * 4},
           "expect": [{"sparse": {"max_nodes": 10, "min_faithfulness": 0.5, "vs_random": {"draws": 10, "max_p": 0.05}}}]}
    with pytest.raises(SpecError, match="with 10 draws the p-value is at least 0.091, above max_p 0.05.*draw at least 19"):
        spec_from_mapping(raw, project / "a.yaml", project)


@pytest.mark.parametrize("kind", ["sparse", "flips"])
def test_the_null_is_measured_like_the_claim_on_a_tiny_model(project, loaded, kind, monkeypatch):  # noqa: F811
    monkeypatch.setattr(measures, "COPIES", 3)  # the 4 draws run as two groups of copies
    claim = {"sparse": {"max_nodes": 40, "min_faithfulness": 0.01}, "flips": {"nodes": 40, "min_flip_rate": 0.01}}[kind]
    raw = {"name": "agreement", "models": [str(project / "ckpt")], "task": {"dataset": "data.jsonl", "test_fraction": 0.5},
           "trace": {"ablation": "mean"}, "expect": [{kind: claim | {"vs_random": {"draws": 4, "max_p": 0.9}}}]}
    subject = Subject(spec_from_mapping(raw, project / "agreement.yaml", project), loaded)
    outcome = check(subject, subject.spec.expectations[0], BaselineStore())
    figure = "faithfulness" if kind == "sparse" else "flip rate"
    null = subject.figures.nulls[f"{figure}@40"]
    randoms = matched_random(subject.circuit(40), subject.sites.n_neurons, 4, subject.spec.task.seed)
    alone = [subject.faithfulness_curve(random, [40], complement=False).faithfulness[0] if kind == "sparse"
             else subject.flip_rate_of(random).value for random in randoms]  # each draw measured alone, as the claim is
    # The draws share their first positions on a key-value cache; a circuit alone runs them whole: 5e-6 apart measured.
    assert null.draws == pytest.approx(alone, abs=1e-5)
    assert kind == "flips" or len(set(null.draws)) == 4  # four circuits, not one measured four times
    assert null.circuit == (subject.faithfulness(40).value if kind == "sparse" else subject.flip_rate(40).value)
    assert outcome.passed == (null.circuit >= 0.01 and null.p <= 0.9) and "random circuits" in outcome.message
    page = _section(Row("agreement", "ckpt", "agreement.yaml", "", figures=subject.figures))
    assert f"{figure} of the top 40 against 4 random circuits of its shape" in page and f"p = {null.p:.3f}" in page

