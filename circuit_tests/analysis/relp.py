"""RelP: LRP propagation rules, as gradient edits that leave every forward value unchanged.

Inside :func:`relp_rules` a backward pass computes RelP relevances instead of plain gradients
(Rezaei Jafari et al. 2025; docs/method.md section 2):

- ``norm``: RMSNorm and LayerNorm treat their normalising scale as a constant
  (LayerNorm's centring stays linear), including Gemma's ``1 + weight`` form and its extra
  pre/post-feedforward and q/k norms;
- ``activation``: the MLP activation (SiLU, GELU) follows the identity rule, ``z * (act(z)/z)``
  with the ratio held constant;
- ``half``: in gated MLPs the gradient through ``act(gate) * up`` is halved for both factors;
- ``detach_attention`` (off by default, a named variant): no gradient through the attention pattern.

Each rule is a hook that returns ``value.detach() + linear_map(x - x.detach())``: the added
term is exactly zero in the forward pass and carries the rule's gradient in the backward pass.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from circuit_tests.model.sites import NeuronSites, on_neurons, registered

DETACHED_ATTENTION = "circuit_tests_detached_pattern"


@dataclass(frozen=True)
class RelPRules:
    """Which LRP rules apply; all off is plain attribution patching."""

    norm: bool = True
    activation: bool = True
    half: bool = True
    detach_attention: bool = False

    @classmethod
    def none(cls) -> RelPRules:
        return cls(norm=False, activation=False, half=False, detach_attention=False)


def _frozen_rms(module: nn.Module, x: torch.Tensor, offset: float) -> torch.Tensor:
    """The RMSNorm map with the scale ``1/rms(x)`` frozen, applied to a zero-valued copy of ``x``."""
    xf = x.float()
    scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _eps(module)).detach()
    return (xf - xf.detach()) * scale * (module.weight.float() + offset)


def _frozen_layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """The LayerNorm map with ``1/sigma`` frozen (centring stays linear), on a zero-valued copy of ``x``."""
    xf = x.float()
    sigma = torch.sqrt(xf.var(-1, unbiased=False, keepdim=True) + module.eps).detach()
    delta = xf - xf.detach()
    out = (delta - delta.mean(-1, keepdim=True)) / sigma
    return out if module.weight is None else out * module.weight.float()


def _eps(module: nn.Module) -> float:
    return module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps


def norm_rule(model: PreTrainedModel) -> Iterator:
    """Forward hooks that freeze the scale of every RMSNorm / LayerNorm in the model."""
    for module in model.modules():
        linear = _norm_linearisation(module)
        if linear is not None:

            def hook(module, args, output, linear=linear):
                return output.detach() + linear(module, args[0]).to(output.dtype)

            yield module.register_forward_hook(hook)


def _norm_linearisation(module: nn.Module) -> Callable[[nn.Module, torch.Tensor], torch.Tensor] | None:
    if isinstance(module, nn.LayerNorm):
        return _frozen_layer_norm
    name = type(module).__name__
    if name.endswith("RMSNorm"):
        # Gemma, Gemma 2 and Gemma 3 scale by (1 + weight); the other families by weight.
        offset = 1.0 if name.startswith("Gemma") else 0.0
        return lambda module, x: _frozen_rms(module, x, offset)
    return None


def activation_rule(sites: NeuronSites) -> Iterator:
    """Forward hooks giving each MLP activation the identity rule: gradient ``act(z)/z``."""

    def hook(module, args, output):
        z = args[0]
        nonzero = z != 0
        # act(z)/z tends to 1/2 at z = 0 for SiLU and GELU alike.
        ratio = torch.where(nonzero, output / torch.where(nonzero, z, 1), 0.5).detach()
        return output.detach() + ratio * (z - z.detach())

    return (site.activation.register_forward_hook(hook) for site in sites.sites)


def half_rule(layer: int, neurons: torch.Tensor) -> torch.Tensor:
    """Halve the gradient into both factors of ``act(gate) * up``; the value is unchanged exactly."""
    half = 0.5 * neurons
    return half + half.detach()


def _detached_pattern_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, *args, **kwargs):
    """The model's own eager attention with queries and keys detached, so the pattern gets no gradient."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query.detach(), key.detach(), *args, **kwargs)


@contextmanager
def detached_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run the model with the attention pattern detached (requires eager attention).

    The variant is registered with transformers' attention registries the first time it is used,
    never at import: importing circuit-tests changes nothing in transformers.
    """
    if model.config._attn_implementation != "eager":
        raise ValueError("detach_attention needs a model loaded with attn_implementation='eager'.")
    if DETACHED_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(DETACHED_ATTENTION, _detached_pattern_attention)
        AttentionMaskInterface.register(DETACHED_ATTENTION, eager_mask)
    model.config._attn_implementation = DETACHED_ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = "eager"


@contextmanager
def relp_rules(sites: NeuronSites, rules: RelPRules = RelPRules()) -> Iterator[None]:
    """Apply the chosen rules to every forward pass inside the block.

    Enter this before :func:`~circuit_tests.model.sites.capture`, so that captured neurons are the
    values after the half rule and their gradients are the gradients the rules produce.
    """
    with ExitStack() as stack:
        if rules.norm:
            stack.enter_context(registered(norm_rule(sites.model)))
        if rules.activation:
            stack.enter_context(registered(activation_rule(sites)))
        if rules.half and sites.arch.gated:
            stack.enter_context(on_neurons(sites, half_rule))
        if rules.detach_attention:
            stack.enter_context(detached_attention(sites.model))
        yield
