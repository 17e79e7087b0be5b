"""A spec on a tiny model through :class:`~circuit_tests.spec.subject.Subject`: figures that belong to the data and model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from circuit_tests.analysis import measures
from circuit_tests.analysis.measures import mean_counterfactuals
from circuit_tests.model.loading import load_model
from circuit_tests.model.nodes import Circuit
from circuit_tests.spec.baselines import BaselineStore
from circuit_tests.spec.expectations import _bound, _shown, check
from circuit_tests.spec.schema import spec_from_mapping
from circuit_tests.spec.subject import Subject
from circuit_tests.testing import both_ways, save_tiny_checkpoint, tiny_agreement_pairs


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    save_tiny_checkpoint(root / "ckpt", taught=True)
    (root / "data.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in tiny_agreement_pairs()))
    return root


@pytest.fixture(scope="module")
def loaded(project):
    return load_model(str(project / "ckpt"))


def subject(project: Path, loaded, *expect: dict) -> Subject:
    raw = {"name": "agreement", "models": [str(project / "ckpt")], "task": {"dataset": "data.jsonl", "test_fraction": 0.5},
           "trace": {"ablation": "mean"}, "expect": list(expect)}
    return Subject(spec_from_mapping(raw, project / "agreement.yaml", project), loaded)


def test_nodes_for_a_faithfulness_is_searched_so_it_does_not_depend_on_the_sizes_a_spec_names(project, loaded):
    found = []
    for asked in (40, 70, 500):
        measured = subject(project, loaded, {"sparse": {"max_nodes": asked, "min_faithfulness": 0.8}})
        _ = measured.curve
        found.append(measured.figures.nodes_for_08)
    n = found[0]
    assert isinstance(n, int) and found == [n, n, n]
    fresh = subject(project, loaded, {"behaves": {"min_accuracy": 0.6}})
    assert fresh.faithfulness_curve(fresh.circuit(n), [n - 1, n], complement=False).faithfulness[0] < 0.8
    assert fresh.faithfulness_curve(fresh.circuit(n), [n - 1, n], complement=False).faithfulness[1] >= 0.8


def test_an_unchanged_rerun_reads_its_measurements_from_the_cache(project, loaded, tmp_path, monkeypatch):
    from circuit_tests.spec import subject as module

    claims = ({"sparse": {"max_nodes": 40, "min_faithfulness": 0.8}}, {"behaves": {"min_accuracy": 0.6}})

    def measure(cache: Path):
        measured = Subject(subject(project, loaded, *claims).spec, loaded, cache)
        return (measured.curve.per_example, measured.figures.nodes_for_08, measured.accuracy,
                measured.flip_rate_of(measured.circuit(10)), measured.figures.timings)

    calls = []
    for where in (module, measures):
        monkeypatch.setattr(where, "mean_counterfactuals", lambda *args: calls.append(args) or mean_counterfactuals(*args))
    first = measure(tmp_path)
    assert {"trace", "faithfulness curve", "flips", "preferences"} <= set(first[-1])
    assert len(calls) == 1  # one pass over the counterfactuals, shared by the ends, the curve and every search round

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("measured again")

    for name in ("faithfulness_curve", "curve_ends", "mean_counterfactuals", "flip_rates", "preferences", "trace"):
        monkeypatch.setattr(module, name, no_forward_pass)
    again = measure(tmp_path)
    assert again[0].equal(first[0]) and again[1:4] == first[1:4]

    entries = sorted(tmp_path.glob("*.safetensors"))
    for entry in entries:  # a damaged cache is measured again, not trusted
        entry.write_bytes(b"damaged")
    monkeypatch.undo()
    damaged = measure(tmp_path)
    assert damaged[0].equal(first[0]) and damaged[1:3] == first[1:3]

    for entry in entries:  # so is an entry holding other tensors than the measurement's, of the right length
        tensors = load_file(str(entry))
        save_file({f"other {name}": tensor for name, tensor in tensors.items()}, str(entry))
    renamed = measure(tmp_path)
    assert renamed[0].equal(first[0]) and renamed[1:3] == first[1:3]


@pytest.mark.parametrize(("value", "threshold", "shown"), [
    (0.79996, 0.8, "0.79996"),  # three decimals would print 0.800 beside a failed ">= 0.8"
    (0.8004, 0.8, "0.8004"),  # and 0.800 beside a failed "<= 0.8"
    (0.8, 0.8, "0.800"),
    (0.93417, 0.8, "0.934"),
    (0.93417, None, "0.934"),
])
def test_a_figure_is_printed_with_the_digits_that_show_its_side_of_the_threshold(value, threshold, shown):
    assert _shown(value, threshold) == shown


def test_a_threshold_is_printed_as_written():
    assert [_bound(t) for t in (0.8, 0.875, 0.05, 1.0)] == ["0.80", "0.875", "0.05", "1.00"]


def test_a_flip_is_an_answer_the_model_got_right_that_the_patch_makes_wrong(project, loaded):
    # Every pair twice: as written (the taught model answers it right) and with its answers swapped (it answers it wrong).
    swapped = [pair | {"clean_answer": pair["patch_answer"], "patch_answer": pair["clean_answer"]} for pair in tiny_agreement_pairs()]
    raw = {"name": "agreement", "models": [str(project / "ckpt")], "task": {"examples": tiny_agreement_pairs() + swapped,
           "test_fraction": 0.5}, "expect": [{"flips": {"nodes": 1, "min_flip_rate": 0.5}}]}
    measured = Subject(spec_from_mapping(raw, project / "agreement.yaml", project), loaded)
    right = int(measured.right.sum())
    assert 0 < right < measured.test.n_examples  # some held-out answers are wrong before any patch
    idle = Circuit(((0, -1, 0),), (1.0,))  # one neuron, patched from the counterfactual: the answers stay as they were
    flips = measured.flip_rate_of(idle)
    assert flips.n == right and flips.value == 0.0  # a wrong answer that stays wrong is no flip


def test_circuit_claims_on_a_model_that_does_not_do_the_task_fail_and_say_so(tmp_path):
    save_tiny_checkpoint(tmp_path / "random")  # not taught: it prefers some answers whatever the prompt
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in both_ways(tiny_agreement_pairs())))
    raw = {"name": "agreement", "models": [str(tmp_path / "random")], "task": {"dataset": "data.jsonl", "test_fraction": 0.5},
           "expect": [{"behaves": {"min_accuracy": 0.51}}, {"flips": {"nodes": 30, "min_flip_rate": 0.01}},
                      {"sparse": {"max_nodes": 100, "min_faithfulness": 0.01}}, {"necessary": {"nodes": 30, "max_completeness": 0.99}}]}
    spec = spec_from_mapping(raw, tmp_path / "agreement.yaml", tmp_path)
    measured = Subject(spec, load_model(str(tmp_path / "random")))
    assert not measured.behaviour.present
    for expectation in spec.expectations:
        outcome = check(measured, expectation, BaselineStore())
        assert not outcome.passed, expectation.kind
        assert "answered right" in outcome.message and "above chance" in outcome.message
    assert "does not do the task" in check(measured, spec.expectations[1], BaselineStore()).message


def test_a_ratio_over_ends_that_are_not_apart_is_undefined_and_fails(project, loaded):
    measured = subject(project, loaded, {"sparse": {"max_nodes": 40, "min_faithfulness": 0.01}},
                       {"necessary": {"nodes": 40, "max_completeness": 0.99}})
    model = measured.ends[0]
    apart = torch.tensor([0.1, -0.1]).repeat(len(model) // 2 + 1)[: len(model)]
    measured.__dict__["ends"] = torch.stack([model, model + apart])  # F(M) - F(empty) averages about 0: the ratio is noise
    assert not measured.separated
    for expectation in measured.spec.expectations:
        outcome = check(measured, expectation, BaselineStore())
        assert not outcome.passed and "undefined" in outcome.message and "includes 0" in outcome.message
    assert all(math.isnan(value) for value in measured.figures.curve.faithfulness + measured.figures.curve.completeness)
    assert measured.nodes_for(0.8) is None
