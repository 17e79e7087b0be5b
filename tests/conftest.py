"""Shared fixtures: tiny random models of every supported architecture, and the real SmolLM2."""

from __future__ import annotations

import pytest
import torch

from circuit_tests.model.loading import LoadedModel, load_model
from circuit_tests.model.sites import NeuronSites
from circuit_tests.testing import TINY_ARCHITECTURES, tiny_model


@pytest.fixture(scope="session", params=TINY_ARCHITECTURES)
def tiny_sites(request) -> NeuronSites:
    """The neuron sites of a tiny, seeded, random model of one architecture."""
    return NeuronSites(tiny_model(request.param).requires_grad_(False))


@pytest.fixture(scope="session")
def tiny_ids() -> torch.Tensor:
    """A batch of two random prompts of 7 tokens for the tiny models (vocabulary 256)."""
    return torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The embedded default model, loaded offline from its cached safetensors conversion."""
    return load_model("smollm2-135m-instruct")
