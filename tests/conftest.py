"""Shared fixtures: tiny random models of every supported architecture, and the real SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

from circuit_tests.model.loading import LoadedModel, load_model
from circuit_tests.model.sites import NeuronSites
from circuit_tests.testing import TINY_ARCHITECTURES, tiny_model

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `make test` runs one worker per core: each gets its share of threads
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)  # for the suites that pytester runs in a subprocess
    torch.set_num_threads(_threads)


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
