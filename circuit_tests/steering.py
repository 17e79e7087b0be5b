"""Steering: set chosen neurons to other values and read what the model now says.

Two experiments from ``shared/METHOD.md`` section 6:

- :func:`patch_success`: patch a circuit's neurons with their values from a source prompt (the
  counterfactual of each pair, e.g. a landmark in another country) and count how often the
  model's top answer becomes the source's answer;
- :func:`multiplier_sweep`: multiply chosen neurons by factors (0 ablates, 1 is a no-op) and
  read the probabilities of target tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from circuit_tests.circuits import Circuit, ablation_values, masked_last_logits, node_ranks
from circuit_tests.data import Tokenized
from circuit_tests.interventions import intervene, scale
from circuit_tests.metrics import run
from circuit_tests.sites import NeuronSites


def patch_success(sites: NeuronSites, data: Tokenized, circuit: Circuit, sizes: Sequence[int]) -> torch.Tensor:
    """``[len(sizes), examples]``: 1 where the top answer becomes ``patch_answer`` with the top nodes patched."""
    sources = ablation_values(sites, data, "patch")
    bounds = torch.tensor(list(sizes)).view(-1, 1, 1, 1)
    hits = []
    for batch, source in zip(data.batches, sources):
        rank = node_ranks(sites, circuit, batch.n_positions).unsqueeze(0)
        top = masked_last_logits(sites, batch, rank < bounds, source, None).argmax(-1)
        hits.append(top == batch.patch_answer.to(top.device))
    return torch.cat(hits, 1).float().cpu()


@torch.no_grad()
def multiplier_sweep(
    sites: NeuronSites, ids: torch.Tensor, circuit: Circuit, factors: Sequence[float], tokens: Sequence[int]
) -> torch.Tensor:
    """``[len(factors), batch, len(tokens)]``: next-token probabilities of ``tokens`` with the circuit scaled."""
    device = sites.device
    probabilities = []
    for factor in factors:
        with intervene(sites, [scale(circuit.node_set(), factor)]):
            last = run(sites.model, ids.to(device))[:, -1].float().softmax(-1)
        probabilities.append(last[:, list(tokens)])
    return torch.stack(probabilities).cpu()
