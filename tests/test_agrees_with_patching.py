"""agrees_with_patching: a spec's attribution scores against exact activation patching of single nodes, on a tiny model."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_subject import loaded, project  # noqa: F401 -- the tiny model and its agreement data

from circuit_tests.analysis.attribution import attribute
from circuit_tests.analysis.stats import pearson
from circuit_tests.errors import SpecError
from circuit_tests.model.data import tokenize_pairs
from circuit_tests.spec.baselines import BaselineStore
from circuit_tests.spec.expectations import check
from circuit_tests.spec.schema import spec_from_mapping
from circuit_tests.spec.subject import Subject


def _subject(project, loaded, method: str, min_pearson: float, **trace) -> Subject:  # noqa: F811
    raw = {"name": "agreement", "models": [str(project / "ckpt")], "task": {"dataset": "data.jsonl", "test_fraction": 0.5},
           "trace": {"method": method, "ablation": "mean", **trace},
           "expect": [{"agrees_with_patching": {"nodes": 40, "min_pearson": min_pearson}}]}
    return Subject(spec_from_mapping(raw, project / "agreement.yaml", project), loaded)


@pytest.mark.parametrize("method", ["atp", "relp"])
def test_the_figure_is_pearson_r_of_scores_and_exact_effects_on_top_and_random_nodes(project, loaded, method):  # noqa: F811
    subject = _subject(project, loaded, method, 0.5)
    found = subject.agreement(40)
    top = [node for node, _ in subject.ranked(20)]
    train = tokenize_pairs(subject.train, loaded.tokenizer)
    exact = attribute(subject.sites, train.chunks(subject.batch_size), replace(subject.spec.trace.to_options(), method="exact"), candidates=top)
    assert found.pearson_top == pytest.approx(pearson(subject.scores.at(top), exact.at(top)), abs=1e-6)
    assert found.method == method and found.nodes == 40 and -1 <= found.pearson <= 1
    assert subject.agreement(40) is found  # measured once
    shortest = min(batch.n_positions for batch in train.batches)
    with pytest.raises(SpecError, match="agrees_with_patching.nodes': 100000 random nodes asked for"):
        subject._random_nodes(100000, set(top), shortest)
    random = subject._random_nodes(20, set(top), shortest)
    assert len(set(random)) == 20 and not set(random) & set(top) and all(-shortest <= position < 0 for _, position, _ in random)


def test_atp_agrees_with_patching_on_a_tiny_model_and_an_impossible_floor_fails(project, loaded):  # noqa: F811
    held = _subject(project, loaded, "atp", 0.5)
    outcome = check(held, held.spec.expectations[0], BaselineStore())
    assert outcome.passed, outcome.message
    assert "atp scores track exact activation patching of 40 single nodes" in outcome.expected
    strict = _subject(project, loaded, "atp", 0.9999999)
    failed = check(strict, strict.spec.expectations[0], BaselineStore())
    assert not failed.passed and "top half" in failed.measured


def test_a_trace_by_neuron_cannot_be_patched_node_by_node(project, loaded):  # noqa: F811
    subject = _subject(project, loaded, "atp", 0.5, nodes="neuron")
    with pytest.raises(SpecError, match="agrees_with_patching patches single .* trace.nodes is 'neuron'"):
        subject.agreement(40)
