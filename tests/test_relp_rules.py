"""Each RelP rule's gradient against the rule as written in docs/method.md section 2."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.activations import GELUTanh
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from circuit_tests.analysis.relp import RelPRules, activation_rule, norm_rule, relp_rules
from circuit_tests.model.sites import NeuronSites, registered
from circuit_tests.testing import tiny_model


def vjp(module: nn.Module, x: torch.Tensor, cotangent: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad((module(x) * cotangent).sum(), x)[0]


def inputs(shape=(3, 5, 8), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def with_weights(norm: nn.Module) -> nn.Module:
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 1.5, norm.weight.numel()))
    return norm


@pytest.mark.parametrize(
    ("norm", "reference"),
    [
        (with_weights(LlamaRMSNorm(8, eps=1e-6)), lambda m, x: m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6).detach()),
        (with_weights(Gemma3RMSNorm(8, eps=1e-6)), lambda m, x: (1 + m.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6).detach()),
        (
            with_weights(nn.LayerNorm(8)),
            lambda m, x: m.weight * (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + m.eps).detach() + m.bias,
        ),
    ],
    ids=["rmsnorm", "gemma-rmsnorm", "layernorm"],
)
def test_norm_rule_freezes_the_scale(norm, reference):
    norm.requires_grad_(False)
    x, cotangent = inputs()
    plain = vjp(norm, x, cotangent)
    with registered(norm_rule(norm)):
        relp = vjp(norm, x, cotangent)
        with torch.no_grad():
            torch.testing.assert_close(norm(x), reference(norm, x))
    expected = vjp(lambda t: reference(norm, t), x, cotangent)
    torch.testing.assert_close(relp, expected)
    assert not torch.allclose(relp, plain)


@pytest.mark.parametrize(
    ("model_type", "ratio"),
    [("llama", torch.sigmoid), ("gemma3_text", lambda z: GELUTanh()(z) / z)],
    ids=["silu", "gelu-tanh"],
)
def test_activation_rule_is_the_identity_rule(model_type, ratio):
    sites = NeuronSites(tiny_model(model_type).requires_grad_(False))
    act = sites.sites[0].activation
    z, cotangent = inputs()
    with registered(activation_rule(sites)):
        relp = vjp(act, z, cotangent)
    torch.testing.assert_close(relp, ratio(z) * cotangent)


def test_activation_rule_is_finite_at_zero():
    sites = NeuronSites(tiny_model("llama").requires_grad_(False))
    z = torch.zeros(4)
    with registered(activation_rule(sites)):
        grad = vjp(sites.sites[0].activation, z, torch.ones(4))
    assert torch.equal(grad, torch.full((4,), 0.5))


def test_half_rule_halves_the_gradient_into_gate_and_up():
    sites = NeuronSites(tiny_model("llama").requires_grad_(False))
    mlp = sites.sites[0].mlp
    x, _ = inputs((2, 3, 64))

    def factor_grads(rules: RelPRules) -> list[torch.Tensor]:
        outputs = []
        handles = [m.register_forward_hook(lambda m, a, out: outputs.append(out)) for m in (mlp.gate_proj, mlp.up_proj)]
        try:
            with torch.enable_grad(), relp_rules(sites, rules):
                value = mlp(x.clone().requires_grad_(True)).sum()
                return list(torch.autograd.grad(value, outputs))
        finally:
            for handle in handles:
                handle.remove()

    plain = factor_grads(RelPRules.none())
    halved = factor_grads(RelPRules(norm=False, activation=False, half=True))
    for p, h in zip(plain, halved):
        torch.testing.assert_close(h, p / 2)
