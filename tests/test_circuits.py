"""Circuit selection, ablation, faithfulness, flips, overlap and bootstrap, on tiny models."""

from __future__ import annotations

import pytest
import torch

from circuit_tests.attribution import AttributionOptions, Scores, attribute
from circuit_tests.circuits import (
    Circuit,
    Curve,
    ablation_values,
    above,
    bootstrap,
    faithfulness_curve,
    faithfulness_from,
    flip_rates,
    masked_logit_diffs,
    node_ranks,
    overlap,
    ranked,
    share,
    top_k,
)
from circuit_tests.data import PairedBatch, Tokenized
from circuit_tests.interventions import intervene, patch
from circuit_tests.metrics import logit_diff, run
from circuit_tests.sites import NeuronSites
from circuit_tests.tiny import tiny_model

SCORES = Scores(torch.tensor([[[0.1, -0.5], [0.3, 0.0]], [[-0.2, 0.05], [0.0, 0.4]]]), 3)


def test_ranking_and_selection():
    assert [node for node, _ in ranked(SCORES)] == [(0, 0, 1), (1, 1, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0), (1, 0, 1)]
    assert top_k(SCORES, 2).nodes == ((0, 0, 1), (1, 1, 1))
    assert top_k(SCORES, 2).weights == (0.5, pytest.approx(0.4))
    assert above(SCORES, 0.25).nodes == ((0, 0, 1), (1, 1, 1), (0, 1, 0))
    assert share(SCORES, 0.5).nodes == ((0, 0, 1), (1, 1, 1))  # 0.5 + 0.4 of 1.55 passes half
    assert top_k(SCORES, 9, layers=range(1, 2)).nodes == ((1, 1, 1), (1, 0, 0), (1, 0, 1))
    # Aggregated over positions: (0, 0) = 0.4, (0, 1) = -0.5, (1, 0) = -0.2, (1, 1) = 0.45
    assert top_k(SCORES, 3, aggregate=True).nodes == ((0, None, 1), (1, None, 1), (0, None, 0))


def test_overlap():
    a = Circuit.from_neurons([[0, 1], [2, 3]])
    assert overlap(a, a) == (1.0, 1.0)
    assert overlap(a, Circuit.from_neurons([[5, 5]])) == (0.0, 0.0)
    b = Circuit(((0, 4, 1), (7, 0, 7)), (3.0, 1.0))
    assert overlap(a, b) == (pytest.approx(1 / 3), pytest.approx(1 / (3 + 1 + 1)))


def test_node_ranks_keep_the_best_rank_and_expand_none():
    sites = _sites()
    circuit = Circuit(((1, 2, 5), (0, None, 3), (1, 2, 5), (2, -1, None)), (1.0,) * 4)
    rank = node_ranks(sites, circuit, n_positions=4)
    assert rank[1, 2, 5] == 0 and (rank[0, :, 3] == 1).all() and (rank[2, 3] == 3).all()
    assert (rank == 4).sum() == rank.numel() - 1 - 4 - sites.n_neurons


def test_full_circuit_is_fully_faithful_and_empty_is_not(data):
    sites = _sites()
    everything = Circuit(tuple((l, None, None) for l in range(sites.n_layers)), (1.0,) * sites.n_layers)
    curve = faithfulness_curve(sites, data, everything, [1, 2, 3], ablation="mean")
    assert curve.faithfulness[-1] == pytest.approx(1.0, abs=1e-6)
    assert curve.completeness[-1] == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(curve.per_example[-2], _clean(sites, data))  # M: nothing ablated


def test_curve_sizes_evaluated_together_match_one_at_a_time(data):
    sites = _sites()
    circuit = top_k(attribute(sites, data.batches, AttributionOptions()), 200)
    together = faithfulness_curve(sites, data, circuit, [5, 50, 200])
    for index, size in enumerate([5, 50, 200]):
        alone = faithfulness_curve(sites, data, circuit, [size])
        assert together.faithfulness[index] == pytest.approx(alone.faithfulness[0], rel=1e-4, abs=1e-6)
        assert together.completeness[index] == pytest.approx(alone.completeness[0], rel=1e-4, abs=1e-6)


def test_flips_match_patching_with_interventions(data):
    sites = _sites()
    circuit = top_k(attribute(sites, data.batches, AttributionOptions()), 40)
    batch = data.batches[0]
    counterfactual = ablation_values(sites, data, "patch")[0]
    with torch.no_grad(), intervene(sites, [patch(circuit.node_set(), counterfactual)]):
        expected = logit_diff(run(sites.model, batch.clean_ids), batch)
    rank = node_ranks(sites, circuit, batch.n_positions).unsqueeze(0)
    got = masked_logit_diffs(sites, batch, rank < 40, counterfactual, None)[0]
    torch.testing.assert_close(got, expected)
    assert torch.equal(flip_rates(sites, data, circuit, [40])[0], (expected < 0).float())


def test_ablation_values(data):
    sites = _sites()
    counterfactual = ablation_values(sites, data, "patch")[0]
    mean = ablation_values(sites, data, "mean")[0]
    torch.testing.assert_close(mean[0][1], counterfactual[0].mean(0))
    assert all((z == 0).all() for z in ablation_values(sites, data, "zero")[0])
    first, again = ablation_values(sites, data, "resample", seed=3)[0], ablation_values(sites, data, "resample", seed=3)[0]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    pool = counterfactual[0]
    assert all(any(torch.equal(row, p) for p in pool) for row in first[0])
    with pytest.raises(ValueError, match="Unknown ablation"):
        ablation_values(sites, data, "melt")


def test_nodes_for_interpolates_in_log_size():
    per_example = torch.tensor([[0.2], [0.6], [1.0], [1.0], [0.0]])  # sizes 10, 100, 1000; then M, empty
    curve = Curve((10, 100, 1000), per_example, torch.zeros(3, 1))
    assert curve.faithfulness == pytest.approx([0.2, 0.6, 1.0])
    assert curve.nodes_for(0.8) == pytest.approx(10 ** 2.5)
    assert curve.nodes_for(0.1) == 10 and curve.nodes_for(1.01) is None


def test_bootstrap_interval_is_seeded_and_covers_the_estimate():
    values = torch.linspace(0, 1, 50)
    low, high = bootstrap(lambda v: v.mean(), [values], seed=1)
    assert low < values.mean() < high
    assert (low, high) == bootstrap(lambda v: v.mean(), [values], seed=1)
    wide = bootstrap(lambda v: v.mean(), [values[::10]], seed=1)
    assert wide[1] - wide[0] > high - low
    f = bootstrap(faithfulness_from, [values + 1, values + 2, values])
    assert f[0] <= 0.5 <= f[1]


@pytest.fixture(scope="module")
def data() -> Tokenized:
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(3, 256, (6, 5), generator=generator)
    counterfactual = torch.randint(3, 256, (6, 5), generator=generator)
    answers = torch.randint(3, 256, (2, 6), generator=generator)
    return Tokenized((PairedBatch(clean, counterfactual, answers[0], answers[1], tuple(range(6))),))


def _clean(sites: NeuronSites, data: Tokenized) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([logit_diff(run(sites.model, b.clean_ids), b) for b in data.batches])


_SITES: list[NeuronSites] = []


def _sites() -> NeuronSites:
    if not _SITES:
        _SITES.append(NeuronSites(tiny_model("llama").requires_grad_(False)))
    return _SITES[0]
