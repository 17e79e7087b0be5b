"""A faithfulness curve's forward pass: every position of every copy, against what evaluation skips (SmolLM2, CPU).

Seven copies of 16 prompts of 8 tokens, as a curve of five sizes and its two ends has them: the
circuits hold nodes at the last position only (a trace aligned at the end), the rest mean-ablated.
``skipping`` is what evaluation runs (:func:`~circuit_tests.model.interventions.per_copy_logits`):
the seven positions before the last run once per way (ablated, or the model's own), the last once
per copy, and no MLP runs where all of its neurons are ablated. ``shared`` only shares positions;
``whole`` runs every position of every copy and every MLP. Run ``pytest tests/benchmarks
--benchmark-enable`` and see docs/benchmarks.md.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from circuit_tests.model import interventions
from circuit_tests.model.sites import NeuronSites

pytestmark = pytest.mark.slow
BATCH, POSITIONS, SIZES = 16, 8, (10, 30, 100, 300, 1000)


def _copies(sites: NeuronSites) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Prompts, the seven copies' masks (five top-k circuits at the last position, the model, the empty circuit), means."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (BATCH, POSITIONS), generator=generator)
    order = torch.randperm(sites.n_layers * sites.n_neurons, generator=generator)
    chosen = torch.zeros(len(SIZES) + 2, sites.n_layers * sites.n_neurons, POSITIONS, dtype=torch.bool)
    for copy, size in enumerate(SIZES):
        chosen[copy, order[:size], -1] = True
    chosen[len(SIZES)] = True  # the model: nothing ablated
    chosen = chosen.view(len(SIZES) + 2, sites.n_layers, sites.n_neurons, POSITIONS).transpose(2, 3)
    means = [torch.randn(1, POSITIONS, sites.n_neurons, generator=generator).expand(BATCH, -1, -1) for _ in range(sites.n_layers)]
    return ids, chosen, means


@pytest.mark.benchmark(group="evaluation-smollm2-cpu")
@pytest.mark.parametrize("run", ["whole", "shared", "skipping"])
def test_curve_pass(benchmark, smollm2, monkeypatch, run):
    sites = NeuronSites(smollm2.model)
    ids, chosen, means = _copies(sites)
    assert interventions.shared_positions(chosen)[0] == POSITIONS - 1
    if run != "skipping":
        monkeypatch.setattr(interventions, "in_place_of_mlps", lambda sites, fn: nullcontext())
    if run == "whole":
        monkeypatch.setattr(interventions, "shared_positions", lambda chosen: (0, chosen[:, 0, 0, 0]))
    logits = benchmark(interventions.per_copy_logits, sites, ids, chosen, None, means)
    assert logits.shape == ((len(SIZES) + 2) * BATCH, 1, 49152)
