"""How well each attribution method predicts exact patching on SmolLM2 (subject-verb agreement).

Exact patching of all 46,080 x 2 nodes is too slow for CI, so the ground truth is computed on a
pool: the top 300 nodes of each method, plus 300 random nodes at the subject position (the only
position where the two prompts differ). Figures are printed and recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import pytest
import torch

from circuit_tests.analysis.attribution import AttributionOptions, attribute
from circuit_tests.analysis.stats import pearson
from circuit_tests.model.data import PairedExample, tokenize_pairs
from circuit_tests.model.sites import NeuronSites

pytestmark = pytest.mark.slow

NOUNS = (
    "author teacher doctor student farmer player writer officer manager friend driver artist pilot singer "
    "lawyer nurse dancer guard worker"
).split()
METHODS = ("atp", "relp", "ig")
POOL_PER_METHOD = 300
SUBJECT = -1  # the noun, the last token ("The" is the first, and identical in both prompts)


@pytest.fixture(scope="module")
def agreement(smollm2):
    examples = [PairedExample(f"The {noun}", f"The {noun}s", " is", " are") for noun in NOUNS]
    data = tokenize_pairs(examples, smollm2.tokenizer)
    assert (data.n_examples, len(data.dropped)) == (19, 0)
    sites = NeuronSites(smollm2.model)
    scores = {method: attribute(sites, data.batches, AttributionOptions(method=method)) for method in METHODS}
    generator = torch.Generator().manual_seed(0)
    random_nodes = sorted(
        {(int(l), SUBJECT, int(n)) for l, n in zip(torch.randint(30, (300,), generator=generator), torch.randint(1536, (300,), generator=generator))}
    )
    pool = sorted({node for s in scores.values() for node, _ in s.ranked(POOL_PER_METHOD)} | set(random_nodes))
    exact = attribute(sites, data.batches, AttributionOptions(method="exact"), candidates=pool)
    return scores, exact, pool, random_nodes


@pytest.fixture(scope="module")
def correlations(agreement, request):
    scores, exact, pool, random_nodes = agreement
    truth = exact.at(pool)
    top = [pool[i] for i in truth.abs().topk(200).indices.tolist()]
    table = {
        method: {"top200": pearson(s.at(top), exact.at(top)), "random200": pearson(s.at(random_nodes[:200]), exact.at(random_nodes[:200]))}
        for method, s in scores.items()
    }
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    rows = ", ".join(f"{m}: top200 {r['top200']:.3f} random200 {r['random200']:.3f}" for m, r in table.items())
    reporter.write_line(f"\nPearson r with exact patching (SmolLM2-135M, 19 SVA pairs): {rows}")
    return table


def test_relp_tracks_exact_patching_on_the_strongest_nodes(correlations):
    # Measured 0.762 (float32, CPU). The RelP paper's 0.99 is for GPT-2 MLP outputs, not single neurons.
    assert correlations["relp"]["top200"] >= 0.65


def test_atp_tracks_exact_patching_on_the_strongest_nodes(correlations):
    assert correlations["atp"]["top200"] >= 0.65  # measured 0.769


def test_integrated_gradients_beat_atp_on_the_strongest_nodes(correlations):
    assert correlations["ig"]["top200"] >= 0.9  # measured 0.963
    assert correlations["ig"]["top200"] > correlations["atp"]["top200"]


def test_random_nodes_are_ranked_sensibly(correlations):
    # Measured: atp 0.997, ig 0.979, relp 0.625 (RelP's half rule rescales paths through later MLPs).
    assert correlations["atp"]["random200"] >= 0.95
    assert correlations["relp"]["random200"] >= 0.5
