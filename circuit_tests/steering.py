"""Steering: set chosen neurons to other values and read what the model now says.

Two experiments from ``shared/METHOD.md`` section 6:

- :func:`patch_success`: patch a circuit's neurons with their values from a source prompt (the
  counterfactual of each pair, e.g. a landmark in another country) and count how often the
  model's top answer becomes the source's answer;
- :func:`multiplier_sweep`: multiply chosen neurons by factors (0 ablates, 1 is a no-op) and
  read the probabilities of target tokens.

Both run at most ``batch_size`` prompts per forward pass (times the circuit sizes patched together).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from circuit_tests.circuits import BATCH_SIZE, Circuit, ablated_chunks, masked_last_logits, node_ranks_by_length
from circuit_tests.data import Tokenized
from circuit_tests.interventions import intervene, scale
from circuit_tests.metrics import run
from circuit_tests.sites import NeuronSites


def patch_success(
    sites: NeuronSites, data: Tokenized, circuit: Circuit, sizes: Sequence[int], *, batch_size: int = BATCH_SIZE
) -> torch.Tensor:
    """``[len(sizes), examples]``: 1 where the top answer becomes ``patch_answer`` with the top nodes patched."""
    ranks = node_ranks_by_length(sites, circuit, data)
    bounds = torch.tensor(list(sizes)).view(-1, 1, 1, 1)
    hits = []
    for batch, source in ablated_chunks(sites, data, "patch", batch_size=batch_size):
        top = masked_last_logits(sites, batch, ranks[batch.n_positions] < bounds, source, None).argmax(-1)
        hits.append(top == batch.patch_answer.to(top.device))
    return torch.cat(hits, 1).float().cpu()


@torch.no_grad()
def multiplier_sweep(
    sites: NeuronSites,
    ids: torch.Tensor,
    circuit: Circuit,
    factors: Sequence[float],
    tokens: Sequence[int],
    *,
    batch_size: int = BATCH_SIZE,
) -> torch.Tensor:
    """``[len(factors), batch, len(tokens)]``: next-token probabilities of ``tokens`` with the circuit scaled.

    The prompts run ``batch_size`` at a time.
    """
    chunks = [ids[start : start + batch_size] for start in range(0, len(ids), batch_size)]
    return torch.cat([_scaled_probabilities(sites, chunk, circuit, factors, tokens) for chunk in chunks], 1)


def _scaled_probabilities(
    sites: NeuronSites, ids: torch.Tensor, circuit: Circuit, factors: Sequence[float], tokens: Sequence[int]
) -> torch.Tensor:
    device = sites.device
    probabilities = []
    for factor in factors:
        with intervene(sites, [scale(circuit.node_set(), factor)]):
            last = run(sites.model, ids.to(device))[:, -1].float().softmax(-1)
        probabilities.append(last[:, list(tokens)])
    return torch.stack(probabilities).cpu()
