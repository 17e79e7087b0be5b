"""The paper's claims on SmolLM2-135M-Instruct, with floors measured by docs/make_results.py.

Subject-verb agreement (simple subset): RelP on training pairs, mean ablation on 40 held-out
pairs. Floors sit below the measured values' 95% bootstrap intervals, so a pass is not luck and
a regression of the model or the method shows as a failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from circuit_tests.analysis import measures
from circuit_tests.analysis.attribution import AttributionOptions, attribute
from circuit_tests.analysis.measures import accuracy, faithfulness_curve, faithfulness_from, flip_rates, flips_of_each, nodes_for
from circuit_tests.analysis.selection import top_k
from circuit_tests.analysis.stats import bootstrap
from circuit_tests.model.data import read_jsonl, split, tokenize_pairs
from circuit_tests.model.sites import NeuronSites

pytestmark = pytest.mark.slow
SIMPLE = Path(__file__).resolve().parent.parent / "fixtures" / "sva" / "simple.jsonl"
SIZES = (10, 30, 100, 300, 1000)
# Measured (docs/results.md, tests' own run): faithfulness at 300 nodes 1.01 (95% lower bound 0.92),
# 79 nodes for 0.8, completeness of the top 300 0.01 [-0.05, 0.06], top-30 flip rate 1.00 [1.00, 1.00].
FLOOR_FAITHFUL_300 = 0.85
MAX_NODES_FOR_08 = 100  # the paper's claim itself: about 100 neurons for 0.8 faithfulness
MAX_COMPLETENESS_300 = 0.15
FLOOR_FLIP_30 = 0.9


@pytest.fixture(scope="module")
def simple(smollm2):
    sites = NeuronSites(smollm2.model)
    kept = tokenize_pairs(read_jsonl(SIMPLE), smollm2.tokenizer).examples
    train, test = split(kept, 40 / len(kept), seed=0)
    test_data = tokenize_pairs(test, smollm2.tokenizer)
    scores = attribute(sites, tokenize_pairs(train[:128], smollm2.tokenizer).chunks(32), AttributionOptions(method="relp"))
    circuit = top_k(scores, max(SIZES))
    return sites, test_data, circuit, faithfulness_curve(sites, test_data, circuit, SIZES)


def lower_bound(curve, index: int) -> float:
    return bootstrap(faithfulness_from, [curve.per_example[index], curve.per_example[-2], curve.per_example[-1]])[0]


def test_the_model_agrees_verbs_with_bare_subjects(simple):
    sites, test_data, _, _ = simple
    assert accuracy(sites, test_data) >= 0.95


def test_a_few_hundred_neurons_are_faithful(simple):
    sites, test_data, circuit, curve = simple
    assert lower_bound(curve, SIZES.index(300)) >= FLOOR_FAITHFUL_300
    assert nodes_for(0.8, lambda sizes: faithfulness_curve(sites, test_data, circuit, sizes, complement=False).faithfulness,
                     SIZES) <= MAX_NODES_FOR_08


def test_the_circuit_is_necessary(simple):
    *_, curve = simple
    assert curve.completeness[SIZES.index(300)] <= MAX_COMPLETENESS_300


def test_patching_30_neurons_flips_agreement(simple):
    sites, test_data, circuit, _ = simple
    flips = flip_rates(sites, test_data, circuit, [30])[0]
    assert bootstrap(lambda f: f.mean(-1), [flips])[0] >= FLOOR_FLIP_30


def test_circuits_patched_together_flip_what_each_flips_alone(simple, monkeypatch):
    """``flips_of_each`` (a null's random draws run as copies of one pass, here 3 at a time) against each circuit patched
    alone."""
    monkeypatch.setattr(measures, "COPIES", 3)
    sites, test_data, circuit, _ = simple
    circuits = [circuit.top(size) for size in (20, 2, 10, 4)]  # flip 38, 1, 15 and 2 of the 40 examples
    alone = torch.cat([flip_rates(sites, test_data, one, [len(one)]) for one in circuits])
    assert len({tuple(row.tolist()) for row in alone}) == len(circuits)  # each flips other examples: the order shows
    assert torch.equal(flips_of_each(sites, test_data, circuits), alone)
