"""A spec on a tiny model through :class:`~circuit_tests.spec.subject.Subject`: figures that belong to the data and model."""

from __future__ import annotations

import html
import itertools
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from circuit_tests.analysis import measures
from circuit_tests.analysis.cards import counted
from circuit_tests.analysis.measures import mean_counterfactuals
from circuit_tests.model.loading import load_model
from circuit_tests.model.nodes import format_node
from circuit_tests.spec.baselines import BaselineStore, baseline_path, entry_for, model_key
from circuit_tests.spec.expectations import _bound, _shown, check
from circuit_tests.spec.report import Row, _section
from circuit_tests.spec.schema import spec_from_mapping
from circuit_tests.spec.subject import Subject
from circuit_tests.testing import save_tiny_checkpoint


def agreement_pairs() -> list[dict]:
    """Subject-verb agreement in the tiny tokenizer's words, in two templates of different lengths."""
    nouns = ("author", "baker", "farmer", "doctor", "pilot")
    prepositions = ("near", "by", "of", "on")
    pairs = [{"clean_prefix": f"The {noun} {prep} the {obj}", "patch_prefix": f"The {noun}s {prep} the {obj}",
              "clean_answer": " is", "patch_answer": " are"}
             for noun, prep, obj in itertools.product(nouns, prepositions, ("key", "cabinets"))]
    return pairs + [{"clean_prefix": f"The {noun}", "patch_prefix": f"The {noun}s", "clean_answer": clean,
                     "patch_answer": patch} for noun in nouns for clean, patch in ((" was", " were"), (" is", " are"))]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    save_tiny_checkpoint(root / "ckpt")
    (root / "data.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in agreement_pairs()))
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
    fresh = subject(project, loaded, {"behaves": {"min_accuracy": 0.5}})
    assert fresh.faithfulness_curve(fresh.circuit(n), [n - 1, n], complement=False).faithfulness[0] < 0.8
    assert fresh.faithfulness_curve(fresh.circuit(n), [n - 1, n], complement=False).faithfulness[1] >= 0.8


def test_an_unchanged_rerun_reads_its_measurements_from_the_cache(project, loaded, tmp_path, monkeypatch):
    from circuit_tests.spec import subject as module

    claims = ({"sparse": {"max_nodes": 40, "min_faithfulness": 0.8}}, {"behaves": {"min_accuracy": 0.5}})

    def measure(cache: Path):
        measured = Subject(subject(project, loaded, *claims).spec, loaded, cache)
        return (measured.curve.per_example, measured.figures.nodes_for_08, measured.accuracy,
                measured.flips(measured.circuit(10)), measured.figures.timings)

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
    assert again[0].equal(first[0]) and again[1:3] == first[1:3] and again[3].equal(first[3])

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


@pytest.mark.parametrize("fall", [-0.5, 0.04, 0.06])
def test_stable_lets_faithfulness_rise_and_fall_by_its_tolerance_and_says_it_is_one_sided(project, loaded, fall):
    measured = subject(project, loaded, {"stable": {"nodes": 10, "min_overlap": 0.5, "faithfulness_tolerance": 0.05}})
    now = measured.faithfulness_curve(measured.circuit(10), [10], complement=False).faithfulness[0]
    entry = entry_for(measured)
    entry["metrics"]["faithfulness"]["10"] = now + fall  # the stored value: now is `fall` below it (a rise when negative)
    store = BaselineStore()
    store.preload({baseline_path(measured.spec.path): {"models": {model_key(measured): entry}}})
    outcome = check(measured, measured.spec.expectations[0], store)
    assert outcome.passed == (fall <= 0.05)
    assert outcome.expected.endswith("and its faithfulness not more than 0.05 below the stored value")


def test_the_top_nodes_table_counts_the_tokens_at_each_position_as_the_nodes_cards_do(project, loaded):
    measured = subject(project, loaded, {"behaves": {"min_accuracy": 0.5}})
    _ = measured.scores
    assert len(measured.figures.tokens["-1"]) > 1  # two templates lined up at their last token: several words there
    page = html.unescape(_section(Row("agreement", "ckpt", "agreement.yaml", figures=measured.figures)))
    for layer, position, neuron, _ in measured.figures.top:
        there = measured.figures.cards[format_node((layer, position, neuron))]["at_position"]
        assert [tuple(pair) for pair in measured.figures.tokens[str(position)]] == [tuple(pair) for pair in there]
        assert f"<td>{layer}</td><td>{position} {counted(there)}</td><td>{neuron}</td>" in page
