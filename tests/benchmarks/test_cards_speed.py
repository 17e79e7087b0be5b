"""What reading a circuit costs on SmolLM2 (CPU): the corpus pass, then cards for a spec's top 100 nodes.

The corpus pass runs the model once over the shipped corpus (1,666 sentences), folding every neuron of every
layer into its running top and bottom 5; it is cached per checkpoint afterwards. Cards for 100 nodes then cost
one unembedding of 100 columns and the decoding of their contexts. Goal: under 30 s for the cards once the pass is
cached. ``pytest tests/benchmarks/test_cards_speed.py --benchmark-enable``; figures in docs/benchmarks.md. Run once as
a plain test (the suite's default, ``--benchmark-disable``), the pass reads the corpus's first 200 sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from circuit_tests.analysis.cards import CONTEXTS, corpus_extremes, read_corpus, tokenize_corpus
from circuit_tests.model.sites import NeuronSites
from circuit_tests.spec.reading import Corpus, describe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SMOKE_SENTENCES = 200  # of the corpus's 1,666, when the suite runs benchmarks once as tests (--benchmark-disable)


@pytest.fixture(scope="module")
def passed(smollm2) -> dict:
    return {}


@pytest.mark.benchmark(group="cards-smollm2-cpu")
def test_corpus_pass(benchmark, smollm2, passed):
    sites = NeuronSites(smollm2.model)
    sentences = read_corpus()
    if benchmark.disabled:  # a plain test run (no timing): the first sentences take the same pass, batch by batch
        sentences = sentences[:SMOKE_SENTENCES]
    ids = tokenize_corpus(smollm2.tokenizer, sentences)
    extremes = benchmark.pedantic(corpus_extremes, (sites, ids), rounds=1, iterations=1)
    assert extremes.top.shape == (30, 1536, CONTEXTS) and (extremes.top[..., 0] >= extremes.bottom[..., 0]).all()
    passed["corpus"] = Corpus(ids, extremes)
    print(f"corpus pass: {sum(map(len, ids))} tokens in {len(ids)} sentences")


@pytest.mark.benchmark(group="cards-smollm2-cpu")
def test_cards_for_the_top_100_nodes_of_a_spec(benchmark, smollm2, passed):
    if "corpus" not in passed:
        pytest.skip("needs test_corpus_pass's corpus (run the module)")
    stored = json.loads((ROOT / "specs" / "sva_simple.baseline.json").read_text())["models"]["smollm2-135m-instruct"]["circuit"]
    nodes = [tuple(row[:3]) for row in stored[:100]]
    sites = NeuronSites(smollm2.model)
    cards = benchmark(describe, smollm2, sites, nodes, stored=nodes, read=passed["corpus"])
    assert [card.node for card in cards] == nodes and all(len(card.positive) == CONTEXTS for card in cards)
    assert [card.baseline_rank for card in cards] == list(range(1, 101))
