"""Attribution cost against a plain Hugging Face forward + backward, on SmolLM2 (CPU).

Goal: ``relp`` / ``atp`` at most 1.4x the plain pass (the floor, two forwards and one backward,
is about 1.33x). Run ``pytest tests/benchmarks --benchmark-enable`` and see docs/benchmarks.md.
"""

from __future__ import annotations

import pytest
import torch

from circuit_tests.analysis.attribution import AttributionOptions, attribute
from circuit_tests.analysis.metrics import logit_diff
from circuit_tests.model.data import PairedBatch
from circuit_tests.model.sites import NeuronSites

pytestmark = pytest.mark.slow
BATCH, POSITIONS = 16, 16


@pytest.fixture(scope="module")
def batch() -> PairedBatch:
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 49152, (BATCH, POSITIONS), generator=generator)
    patch = clean.clone()
    patch[:, 3] = torch.randint(0, 49152, (BATCH,), generator=generator)
    return PairedBatch(clean, patch, torch.full((BATCH,), 314), torch.full((BATCH,), 359), tuple(range(BATCH)))


def plain_forward_backward(model, batch: PairedBatch, logits_to_keep: int) -> torch.Tensor:
    """What any gradient method costs at least: one forward with autograd, one backward to the input."""
    embeddings = model.get_input_embeddings()(batch.clean_ids).requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs_embeds=embeddings, logits_to_keep=logits_to_keep).logits
        value = logit_diff(logits, batch).sum()
        return torch.autograd.grad(value, embeddings)[0]


@pytest.mark.benchmark(group="attribution-smollm2-cpu")
@pytest.mark.parametrize("logits_to_keep", [0, 1], ids=["all-logits", "last-logits"])
def test_plain_forward_backward(benchmark, smollm2, batch, logits_to_keep):
    """``all-logits`` is the plain Hugging Face call; ``last-logits`` projects only the last position."""
    grad = benchmark(plain_forward_backward, smollm2.model, batch, logits_to_keep)
    assert grad.shape == (BATCH, POSITIONS, 576)


@pytest.mark.benchmark(group="attribution-smollm2-cpu")
@pytest.mark.parametrize("method", ["atp", "relp"])
def test_attribution(benchmark, smollm2, batch, method):
    sites = NeuronSites(smollm2.model)
    scores = benchmark(attribute, sites, [batch], AttributionOptions(method=method))
    assert scores.scores.shape == (30, POSITIONS, 1536)
    assert scores.scores[:, 3:].abs().sum() > 0 and scores.scores[:, :3].abs().sum() == 0
