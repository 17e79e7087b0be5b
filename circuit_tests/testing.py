"""Models for testing, built offline: tiny random models of every supported architecture, and the shape of Llama-3.1-8B.

circuit-tests' own tests use these in place of real weights, and so can the tests of anyone who
extends it (which is why they ship with the package, as ``numpy.testing`` does):

- :func:`tiny_model`: 3 layers, hidden 64, MLP width 96, 4 attention heads of size 16, vocabulary
  256, eager attention, built from a ``transformers`` config. It keeps what is characteristic of
  its architecture (Gemma's ``1 + weight`` RMSNorm and soft-capping, sliding windows, q/k norms,
  Phi-3's fused ``gate_up_proj``, GPT-2's ``Conv1D``, GPT-NeoX's parallel residual and partial
  rotary embeddings). Every floating parameter, norm weights included, gets a seeded
  perturbation after the usual initialisation, so that no weight is left at exactly 0 or 1.
- :func:`tiny_tokenizer` and :func:`save_tiny_checkpoint`: a word-level tokenizer and a checkpoint
  directory that loads like any other, for tests that go through loading. A random model does no
  task, and circuit-tests judges no circuit claim where the model does not do its task: with
  ``taught=True`` the checkpoint is first fine-tuned on :func:`tiny_agreement_pairs` (subject-verb
  agreement in the tiny tokenizer's words), which it then answers right.
- :func:`interpolated_checkpoint`: a checkpoint between two of the same shape, ``(1 - t) * a + t * b``: a
  training run's series, built offline.
- :data:`LLAMA_31_8B` and :func:`scaled_llama_31_8b`: Llama-3.1-8B's layers and neurons (32 x
  14,336) around a narrow residual stream, so that specs written for the real model run end to
  end on a CPU, and ``ci/gpu_benchmark.py`` can time the real size on a GPU.
"""

from __future__ import annotations

import functools
import itertools

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


# meta-llama/Llama-3.1-8B's config.json: the fields that shape the model and its neurons.
LLAMA_31_8B: dict = {
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": 128001,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}


def scaled_llama_31_8b(vocab_size: int, hidden_size: int = 16, seed: int = 0, *, layers: int = LLAMA_31_8B["num_hidden_layers"],
                       dtype: torch.dtype = torch.float32, device: str = "cpu") -> transformers.PreTrainedModel:
    """A random Llama with Llama-3.1-8B's layers and neurons (32 x 14336) around a residual stream of ``hidden_size``.

    Narrow (the default, 16 wide, two heads, eager attention): specs written for the real model
    (pinned neurons, layer numbers) run on it end to end on a CPU. At the real width (4096) it is
    Llama-3.1-8B's exact shape, heads included, for timing on a GPU. ``vocab_size`` is that of the
    tokenizer saved beside it; ``layers`` fewer than 32 make a smoke test's model.
    """
    shape = {"vocab_size": vocab_size, "hidden_size": hidden_size, "num_hidden_layers": layers,
             "bos_token_id": None, "eos_token_id": None}
    if hidden_size != LLAMA_31_8B["hidden_size"]:
        shape |= {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": hidden_size // 2, "attn_implementation": "eager"}
    config = AutoConfig.for_model("llama", **{**LLAMA_31_8B, **shape})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


# --------------------------------------------------------------------------- tiny tokenizer and checkpoint

TINY_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0-3, as in the tiny configs
TINY_CHAT_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TINY_WORDS: tuple[str, ...] = (
    "The", "the", "A", "a", "author", "authors", "baker", "bakers", "farmer", "farmers", "doctor", "doctors",
    "pilot", "pilots", "key", "keys", "cabinet", "cabinets", "near", "by", "of", "on", "in", "and",
    "is", "are", "was", "were", "here", "there", "yes", "no", "Answer", "Question",
    ".", ",", ":", "?", "!",
)
# A chat template in the usual shape (system, user and assistant turns, generation prompt) over the chat tokens.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer built offline: every word of :data:`TINY_WORDS` is one token, whatever space precedes it.

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then the chat tokens, then the words in order; any other
    word is ``<unk>``. Text is split on whitespace and punctuation (``"The authors is"`` is three words), every
    encoding starts with ``<bos>`` (``add_special_tokens=False`` leaves it out), and ``" is"`` is the single token
    ``is``. Its 47 tokens fit the tiny models' 256-row embedding.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: index for index, token in enumerate(TINY_SPECIAL_TOKENS + TINY_CHAT_TOKENS + TINY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B:1", special_tokens=[("<bos>", vocab["<bos>"])])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=list(TINY_CHAT_TOKENS))
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_agreement_pairs() -> list[dict]:
    """Subject-verb agreement in the tiny tokenizer's words, in two templates of different lengths (50 pairs)."""
    nouns = ("author", "baker", "farmer", "doctor", "pilot")
    prepositions = ("near", "by", "of", "on")
    pairs = [{"clean_prefix": f"The {noun} {prep} the {obj}", "patch_prefix": f"The {noun}s {prep} the {obj}",
              "clean_answer": " is", "patch_answer": " are"}
             for noun, prep, obj in itertools.product(nouns, prepositions, ("key", "cabinets"))]
    return pairs + [{"clean_prefix": f"The {noun}", "patch_prefix": f"The {noun}s", "clean_answer": clean,
                     "patch_answer": patch} for noun in nouns for clean, patch in ((" was", " were"), (" is", " are"))]


def both_ways(pairs: list[dict]) -> list[dict]:
    """``pairs`` and each pair the other way round (the counterfactual as the clean prompt): half the clean answers are
    then each answer, so a model that always prefers one of them is at chance, as an untaught tiny model is."""
    return pairs + [{"clean_prefix": pair["patch_prefix"], "patch_prefix": pair["clean_prefix"],
                     "clean_answer": pair["patch_answer"], "patch_answer": pair["clean_answer"]} for pair in pairs]


TEACHING_STEPS = 100  # full-batch Adam steps that make a tiny llama answer every agreement prompt right


@functools.cache
def _taught_state(model_type: str, seed: int) -> dict[str, torch.Tensor]:
    """The weights of :func:`tiny_model` fine-tuned to give each agreement prompt its own answer (made once per process)."""
    model, tokenizer = tiny_model(model_type, seed=seed), tiny_tokenizer()
    by_length: dict[int, list[tuple[list[int], int]]] = {}
    for pair in tiny_agreement_pairs():
        for prefix, answer in ((pair["clean_prefix"], pair["clean_answer"]), (pair["patch_prefix"], pair["patch_answer"])):
            ids = tokenizer(prefix).input_ids
            by_length.setdefault(len(ids), []).append((ids, tokenizer(answer, add_special_tokens=False).input_ids[0]))
    batches = [(torch.tensor([ids for ids, _ in rows]), torch.tensor([answer for _, answer in rows])) for rows in by_length.values()]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(TEACHING_STEPS):
        loss = sum(torch.nn.functional.cross_entropy(model(ids).logits[:, -1], answers, reduction="sum") for ids, answers in batches)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def save_tiny_checkpoint(directory, model_type: str = "llama", seed: int = 0, *, taught: bool = False, **overrides):
    """Write a tiny model of ``model_type`` and :func:`tiny_tokenizer` to ``directory`` (``save_pretrained``, safetensors).

    ``taught``: fine-tuned on :func:`tiny_agreement_pairs` first, so that it does that task (the default config only).
    ``overrides`` go to the config (``vocab_size=8`` makes an embedding smaller than the tokenizer). Gives the
    directory as a :class:`pathlib.Path`. Not for ``qwen2``: transformers loads its own Qwen2 tokenizer class for
    that model type whatever the checkpoint saved, which does not read this tokenizer back.
    """
    from pathlib import Path

    if model_type == "qwen2":
        raise ValueError("save_tiny_checkpoint: transformers reads a qwen2 checkpoint's tokenizer with its own Qwen2 "
                         "class, which does not load the tiny tokenizer back; use another model type")
    if taught and overrides:
        raise ValueError("save_tiny_checkpoint: a taught checkpoint has the default tiny config; give no overrides")
    directory = Path(directory)
    model = tiny_model(model_type, seed=seed, **overrides)
    if taught:
        model.load_state_dict(_taught_state(model_type, seed))
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def interpolated_checkpoint(a, b, t: float, directory):
    """Write ``(1 - t) * a + t * b`` of two safetensors checkpoint directories of one shape to ``directory``, with ``a``'s
    other files (config, tokenizer); gives the directory as a :class:`pathlib.Path`."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    a, b, directory = Path(a), Path(b), Path(directory)
    directory.mkdir(parents=True)
    for path in a.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            directory.joinpath(path.name).write_bytes(path.read_bytes())
    for path in sorted(a.glob("*.safetensors")):
        start, end = load_file(path), load_file(b / path.name)
        mixed = {name: (start[name].double() * (1 - t) + end[name].double() * t).to(start[name].dtype)
                 if start[name].is_floating_point() else start[name] for name in start}
        save_file(mixed, directory / path.name, metadata={"format": "pt"})
    return directory
