"""Where a model's MLP neurons live, and hooks that read them.

A neuron is one coordinate of the input to an MLP's output projection (``down_proj`` in gated
MLPs, ``c_proj`` in GPT-2, ``dense_4h_to_h`` in GPT-NeoX), at one layer and one position.
Sites are found by the classes of the model and its MLPs, and named after the model's own
modules (``model.layers.3.mlp.down_proj``), as in nnsight and TransformerLens.

Every hook is registered inside a context manager that removes it on exit, error included.
Hooks on one module run in the order their context managers were entered, so RelP rules,
interventions and captures compose by nesting.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import Cache, PreTrainedModel

from circuit_tests.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Architecture:
    """How one transformers model family lays out its MLP."""

    model_type: str  # config.model_type
    model_class: str  # the causal-LM class, "module:Class"
    mlp_class: str  # the MLP class, "module:Class"
    down_proj: str  # attribute of the MLP whose input is the neuron vector
    activation: str  # attribute of the MLP's activation module
    gated: bool  # neurons are act(gate(x)) * up(x)
    final_norm: str = "model.norm"  # the norm before the unembedding, from the model's root

    def is_instance(self, obj: object, attribute: str) -> bool:
        """Whether ``obj`` is an instance of the class named by ``attribute``, compared by qualified name.

        Names, not class identity: a module re-imported (as pytest's ``pytester`` does) holds new
        class objects, and importing every supported family's modeling code would be slow.
        """
        module, _, name = getattr(self, attribute).partition(":")
        wanted = (f"transformers.models.{module}", name)
        return any((cls.__module__, cls.__name__) == wanted for cls in type(obj).__mro__)


def _gated(model_type: str, package: str, prefix: str, activation: str = "act_fn") -> Architecture:
    module = f"{package}.modeling_{package}"
    return Architecture(
        model_type, f"{module}:{prefix}ForCausalLM", f"{module}:{prefix}MLP", "down_proj", activation, True
    )


ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        _gated("llama", "llama", "Llama"),
        _gated("mistral", "mistral", "Mistral"),
        _gated("qwen2", "qwen2", "Qwen2"),
        _gated("qwen3", "qwen3", "Qwen3"),
        _gated("gemma", "gemma", "Gemma"),
        _gated("gemma2", "gemma2", "Gemma2"),
        _gated("gemma3_text", "gemma3", "Gemma3"),
        _gated("phi3", "phi3", "Phi3", activation="activation_fn"),
        _gated("olmo2", "olmo2", "Olmo2"),
        Architecture("gpt2", "gpt2.modeling_gpt2:GPT2LMHeadModel", "gpt2.modeling_gpt2:GPT2MLP", "c_proj", "act", False,
                     "transformer.ln_f"),
        Architecture(
            "gpt_neox",
            "gpt_neox.modeling_gpt_neox:GPTNeoXForCausalLM",
            "gpt_neox.modeling_gpt_neox:GPTNeoXMLP",
            "dense_4h_to_h",
            "act",
            False,
            "gpt_neox.final_layer_norm",
        ),
    )
}


def architecture_of(model: PreTrainedModel) -> Architecture:
    """The registered architecture of a model, checked against the model's class."""
    arch = ARCHITECTURES.get(getattr(model.config, "model_type", ""))
    if arch is None or not arch.is_instance(model, "model_class"):
        raise UnsupportedArchitectureError(
            f"Architecture {type(model).__name__} (model_type {model.config.model_type!r}) is not supported: "
            f"circuit-tests does not know where its MLP neurons are. Supported model types: "
            f"{', '.join(ARCHITECTURES)}. Add an entry to circuit_tests.model.sites.ARCHITECTURES to support it."
        )
    return arch


@dataclass(frozen=True)
class Site:
    """The neurons of one layer: the input of ``down_proj`` inside ``mlp``."""

    layer: int
    name: str  # e.g. "model.layers.3.mlp.down_proj"
    block: nn.Module  # the decoder layer holding ``mlp``, e.g. "model.layers.3"
    mlp: nn.Module
    down_proj: nn.Module
    activation: nn.Module


class NeuronSites:
    """Every neuron site of a model, in layer order."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.arch = architecture_of(model)
        self.sites: tuple[Site, ...] = tuple(
            Site(
                layer,
                f"{name}.{self.arch.down_proj}",
                model.get_submodule(name.rpartition(".")[0]),
                mlp,
                getattr(mlp, self.arch.down_proj),
                getattr(mlp, self.arch.activation),
            )
            for layer, (name, mlp) in enumerate(
                (name, module) for name, module in model.named_modules() if self.arch.is_instance(module, "mlp_class")
            )
        )
        if len(self.sites) != model.config.num_hidden_layers:
            raise UnsupportedArchitectureError(
                f"Found {len(self.sites)} {self.arch.mlp_class} modules in a model with "
                f"{model.config.num_hidden_layers} layers; circuit-tests cannot number its neuron sites."
            )

    @property
    def n_layers(self) -> int:
        return len(self.sites)

    @property
    def n_neurons(self) -> int:
        """Neurons per layer and position (the MLP's intermediate width)."""
        weight = self.sites[0].down_proj.weight
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
        return weight.shape[0] if type(self.sites[0].down_proj).__name__ == "Conv1D" else weight.shape[1]

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the first shard under ``device_map``)."""
        return self.model.get_input_embeddings().weight.device

    def layer_device(self, layer: int) -> torch.device:
        """Where a layer's neurons live (differs from :attr:`device` when accelerate shards the model)."""
        return self.sites[layer].down_proj.weight.device

    @property
    def names(self) -> list[str]:
        return [site.name for site in self.sites]

    def __repr__(self) -> str:
        return f"NeuronSites({self.arch.model_type}: {self.n_layers} layers x {self.n_neurons} neurons)"


PreHook = Callable[[int, torch.Tensor], torch.Tensor | None]


@contextmanager
def registered(handles: Iterable[RemovableHandle]) -> Iterator[None]:
    """Register hooks and remove them on exit.

    Pass a generator: it is consumed inside the ``try``, so a failure half-way through
    registration still removes the hooks registered before it.
    """
    taken: list[RemovableHandle] = []
    try:
        taken.extend(handles)
        yield
    finally:
        for handle in taken:
            handle.remove()


@contextmanager
def on_neurons(sites: NeuronSites, fn: PreHook, layers: Iterable[int] | None = None) -> Iterator[None]:
    """Call ``fn(layer, neurons)`` on the neuron vector entering each down projection.

    ``neurons`` has shape ``[batch, positions, n_neurons]``; a returned tensor replaces it.
    """

    def hook_for(layer: int) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            out = fn(layer, args[0])
            return None if out is None else (out, *args[1:])

        return pre_hook

    chosen = range(sites.n_layers) if layers is None else layers
    with registered(sites.sites[layer].down_proj.register_forward_pre_hook(hook_for(layer)) for layer in chosen):
        yield


MlpForward = Callable[[int, Callable[..., torch.Tensor], torch.Tensor], torch.Tensor]


@contextmanager
def in_place_of_mlps(sites: NeuronSites, fn: MlpForward) -> Iterator[None]:
    """Inside the block, each layer's MLP computes ``fn(layer, own, hidden)``, where ``own`` is its own forward
    (the hooks of its submodules, such as the down projection's, run when ``fn`` calls it) and ``hidden`` is
    ``[batch, positions, hidden]``: ``fn`` may run ``own`` on some of the rows, or none. The MLPs' forwards
    are put back on exit, error or not.
    """
    before = [site.mlp.__dict__.get("forward") for site in sites.sites]  # accelerate's device hooks live there

    def replacement(layer: int, own: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return lambda hidden, *args, **kwargs: fn(layer, lambda rows: own(rows, *args, **kwargs), hidden)

    try:
        for site in sites.sites:
            site.mlp.forward = replacement(site.layer, site.mlp.forward)
        yield
    finally:
        for site, forward in zip(sites.sites, before):
            if forward is None:
                site.mlp.__dict__.pop("forward", None)
            else:
                site.mlp.forward = forward


@contextmanager
def copies_from(sites: NeuronSites, layer: int, copies: int) -> Iterator[None]:
    """Forward passes inside run their batch once below ``layer``, then as ``copies`` stacked copies.

    For interventions that differ per copy only at ``layer`` and above: the layers below compute
    the same thing for every copy, so they run once. From ``layer`` on, each block's batched inputs
    (hidden states, attention masks, position embeddings) are repeated copy-major, as
    ``batch.repeat(copies)`` would have made them; the logits come out ``[copies * batch, ...]``.
    """
    batch: list[int] = []  # the batch size, read from the hidden states entering ``layer``

    def repeated(value: object) -> object:
        if isinstance(value, tuple):
            return tuple(repeated(item) for item in value)
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == batch[0]:
            return value.repeat(copies, *[1] * (value.ndim - 1))
        return value

    def expand(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if module is first:
            batch[:] = [(args[0] if args else kwargs["hidden_states"]).shape[0]]
        return tuple(repeated(arg) for arg in args), {key: repeated(value) for key, value in kwargs.items()}

    first = sites.sites[layer].block
    with registered(site.block.register_forward_pre_hook(expand, with_kwargs=True) for site in sites.sites[layer:]):
        yield


@contextmanager
def gradients_enabled(model: PreTrainedModel) -> Iterator[None]:
    """Make activations of a frozen model carry gradients, by marking the embedding output."""

    def mark(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.requires_grad_(True)

    with torch.enable_grad(), registered([model.get_input_embeddings().register_forward_hook(mark)]):
        yield


@contextmanager
def capture(sites: NeuronSites, grad: bool = False, layers: Iterable[int] | None = None) -> Iterator[list[torch.Tensor | None]]:
    """Record the neuron activations of every (or the chosen) layer during the forward passes inside.

    Yields a list indexed by layer, filled as the model runs (the last forward pass wins). With
    ``grad=True`` the tensors stay in the autograd graph, so ``torch.autograd.grad(metric, acts)``
    gives every layer's gradient from one backward pass.
    """
    acts: list[torch.Tensor | None] = [None] * sites.n_layers

    def record(layer: int, neurons: torch.Tensor) -> None:
        acts[layer] = neurons if grad else neurons.detach()

    with ExitStack() as stack:
        if grad:
            stack.enter_context(gradients_enabled(sites.model))
        stack.enter_context(on_neurons(sites, record, layers))
        yield acts


def next_token_logits(model: PreTrainedModel, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: Cache | None = None) -> torch.Tensor:
    """The model's logits at the last position only, ``[batch, 1, vocab]``.

    With a ``cache``, ``ids`` continue the positions already in it (their keys and values), and
    theirs are added to it.

    Metrics read nothing else, and skipping the vocabulary projection at the other positions
    is the largest saving for small models with big vocabularies (right-padded batches pass their
    ``attention_mask``; their last position is then padding for the shorter rows). The last position's hidden
    states reach the vocabulary projection as a strided view, which PyTorch's CPU matmul takes
    about ten times longer over than over a contiguous copy (SmolLM2: 0.35 s against 0.03 s for
    96 rows); the copy made here is most of the difference between a forward pass with and
    without the projection (docs/benchmarks.md).
    """
    head = model.get_output_embeddings()
    with registered([head.register_forward_pre_hook(_contiguous_input)] if head is not None else []):
        kept = {_cache_keyword(type(model)): cache} if cache is not None else {}
        return model(ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=cache is not None, **kept).logits


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """The forward's name for a key-value cache: later transformers 5 releases renamed ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _contiguous_input(_: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])
