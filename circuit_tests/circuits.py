"""Measure behaviours of a model and of its neurons on paired prompts: accuracy and flip rate."""

from __future__ import annotations

import torch

from circuit_tests.data import Tokenized
from circuit_tests.interventions import NodeSet, intervene, patch
from circuit_tests.metrics import logit_diff, run
from circuit_tests.sites import NeuronSites, capture


@torch.no_grad()
def clean_logit_diffs(sites: NeuronSites, data: Tokenized) -> torch.Tensor:
    """``logit(clean_answer) - logit(patch_answer)`` on every clean prompt."""
    return torch.cat([logit_diff(run(sites.model, batch.clean_ids.to(_device(sites))), batch) for batch in data.batches])


@torch.no_grad()
def patched_logit_diffs(sites: NeuronSites, data: Tokenized, nodes: NodeSet) -> torch.Tensor:
    """The clean logit difference when ``nodes`` take their values from each example's counterfactual prompt."""
    diffs = []
    for batch in data.batches:
        batch = batch.to(_device(sites))
        with capture(sites, layers=nodes.layers) as counterfactual:
            run(sites.model, batch.patch_ids)
        with intervene(sites, [patch(nodes, counterfactual)]):
            diffs.append(logit_diff(run(sites.model, batch.clean_ids), batch))
    return torch.cat(diffs)


def accuracy(sites: NeuronSites, data: Tokenized) -> float:
    """Fraction of clean prompts on which the model prefers the clean answer."""
    return (clean_logit_diffs(sites, data) > 0).float().mean().item()


def flip_rate(sites: NeuronSites, data: Tokenized, nodes: NodeSet) -> float:
    """Fraction of examples whose preferred answer becomes the counterfactual one when ``nodes`` are patched."""
    return (patched_logit_diffs(sites, data, nodes) < 0).float().mean().item()


def _device(sites: NeuronSites) -> torch.device:
    return sites.model.get_input_embeddings().weight.device

