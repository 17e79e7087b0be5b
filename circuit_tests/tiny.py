"""Tiny, seeded, randomly initialised causal LMs, one per supported architecture.

Unit tests use them in place of real weights: each is built offline from a ``transformers``
config (3 layers, hidden 64, MLP width 96, 4 attention heads of size 16, vocabulary 256,
eager attention) and keeps what is characteristic of its architecture (Gemma's ``1 + weight``
RMSNorm and soft-capping, sliding windows, q/k norms, Phi-3's fused ``gate_up_proj``, GPT-2's
``Conv1D``, GPT-NeoX's parallel residual and partial rotary embeddings).

Every floating parameter, norm weights included, gets a seeded perturbation after the usual
initialisation, so that no weight is left at exactly 0 or 1.
"""

from __future__ import annotations

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

_TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_DECODER = {
    **_TOKENS,
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
    "attention_dropout": 0.0,
}
_GEMMA2 = {**_DECODER, "sliding_window": 8, "query_pre_attn_scalar": 16}

_CONFIGS: dict[str, dict] = {
    "llama": _DECODER,
    "mistral": {**_DECODER, "sliding_window": 8},
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": _GEMMA2,
    "gemma3_text": {**_GEMMA2, "sliding_window_pattern": 2},  # layers alternate sliding / full attention
    "phi3": {**_DECODER, "original_max_position_embeddings": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    "olmo2": _DECODER,
    "gpt2": {
        **_TOKENS,
        "vocab_size": 256,
        "n_embd": 64,
        "n_inner": 96,
        "n_layer": 3,
        "n_head": 4,
        "n_positions": 128,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "summary_first_dropout": 0.0,
    },
    "gpt_neox": {
        **_TOKENS,
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "classifier_dropout": 0.0,
    },
}

TINY_ARCHITECTURES: tuple[str, ...] = tuple(_CONFIGS)


def tiny_config(model_type: str, **overrides) -> transformers.PretrainedConfig:
    """The tiny config of ``model_type`` (one of :data:`TINY_ARCHITECTURES`), with ``overrides`` applied."""
    if model_type not in _CONFIGS:
        raise ValueError(f"no tiny model for model_type {model_type!r}; supported: {', '.join(TINY_ARCHITECTURES)}")
    kwargs = {**_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, attn_implementation="eager", **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A float32 causal LM in eval mode with random weights fixed by ``seed``; the global RNG is left untouched."""
    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for param in model.parameters():
                if param.is_floating_point():
                    param.add_(0.02 * torch.randn_like(param))
    return model.eval()
