"""Steering experiments on a tiny model, checked against the plain intervention API."""

from __future__ import annotations

import torch

from circuit_tests.analysis.attribution import AttributionOptions, attribute, neuron_values
from circuit_tests.analysis.measures import multiplier_sweep, patch_success
from circuit_tests.analysis.selection import top_k
from circuit_tests.model.data import PairedBatch, Tokenized
from circuit_tests.model.interventions import intervene, patch
from circuit_tests.model.sites import NeuronSites, next_token_logits
from circuit_tests.testing import tiny_model


def setup(seed: int = 2) -> tuple[NeuronSites, torch.Tensor, torch.Tensor]:
    sites = NeuronSites(tiny_model("gemma3_text").requires_grad_(False))
    generator = torch.Generator().manual_seed(seed)
    return sites, torch.randint(3, 256, (6, 5), generator=generator), torch.randint(3, 256, (6, 5), generator=generator)


def test_patch_success_counts_top_answers_that_become_the_sources():
    sites, clean, source = setup()
    probe = Tokenized((PairedBatch(clean, source, torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long), tuple(range(6))),))
    circuit = top_k(attribute(sites, probe.batches, AttributionOptions(metric="top_k_logits")), 150)
    with torch.no_grad(), intervene(sites, [patch(circuit, neuron_values(sites, source))]):
        steered_top = next_token_logits(sites.model, clean)[:, -1].argmax(-1)
    targets = torch.where(torch.arange(6) % 2 == 0, steered_top, (steered_top + 1) % 256)  # even rows hit, odd rows miss
    data = Tokenized((PairedBatch(clean, source, torch.zeros(6, dtype=torch.long), targets, tuple(range(6))),))
    assert patch_success(sites, data, circuit, [150])[0].tolist() == [1.0, 0.0] * 3


def test_multiplier_one_is_a_no_op_and_zero_is_not():
    sites, clean, _ = setup()
    circuit = top_k(attribute(sites, [PairedBatch(clean, clean.flip(0), torch.ones(6, dtype=torch.long), torch.ones(6, dtype=torch.long), tuple(range(6)))],
                              AttributionOptions(metric="top_k_logits", baseline="zero")), 50)
    with torch.no_grad():
        plain = next_token_logits(sites.model, clean)[:, -1].softmax(-1)[:, [5, 9]]
    sweep = multiplier_sweep(sites, clean, circuit, [0.0, 1.0, 2.0], [5, 9])
    assert sweep.shape == (3, 6, 2)
    torch.testing.assert_close(sweep[1], plain)
    assert not torch.allclose(sweep[0], plain) and not torch.allclose(sweep[2], plain)
