"""Integration on the embedded default model, SmolLM2-135M-Instruct, loaded offline."""

from __future__ import annotations

import pytest
import torch

from circuit_tests.model.loading import cache_dir
from circuit_tests.model.sites import NeuronSites

pytestmark = pytest.mark.slow


def next_token(smollm2, prompt: str) -> str:
    ids = smollm2.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return smollm2.tokenizer.decode(smollm2.model(ids).logits[0, -1].argmax())


def prefers(smollm2, prompt: str, answer: str, other: str) -> bool:
    ids = smollm2.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        last = smollm2.model(ids).logits[0, -1]
    token = lambda text: smollm2.tokenizer(text, add_special_tokens=False).input_ids[0]
    return bool(last[token(answer)] > last[token(other)])


def test_loads_from_the_safetensors_conversion_in_the_cache(smollm2):
    checkpoint = smollm2.path
    assert checkpoint.parent == cache_dir() / "models"
    assert (checkpoint / "model.safetensors").is_file()
    assert not any(checkpoint.glob("*.gguf"))
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"


def test_has_30_layers_of_1536_neurons(smollm2):
    sites = NeuronSites(smollm2.model)
    assert (sites.n_layers, sites.n_neurons) == (30, 1536)
    assert sites.names[0] == "model.layers.0.mlp.down_proj"


def test_agrees_the_verb_with_the_subject(smollm2):
    assert prefers(smollm2, "The author", " is", " are")
    assert prefers(smollm2, "The authors", " are", " is")


def test_answers_a_two_hop_question(smollm2):
    assert next_token(smollm2, "Fact: the capital of the country containing the Eiffel Tower is") == " Paris"
