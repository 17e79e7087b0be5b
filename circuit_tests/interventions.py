"""Edit chosen MLP neurons during a forward pass: replace, scale, add, or patch from a cache.

Nodes are ``(layer, position, neuron)`` triples. ``position`` may be negative (counted from the
end of the prompt) or ``None`` for every position; ``neuron`` may be ``None`` for every neuron of
the layer. An :class:`Edit` pairs a :class:`NodeSet` with an operation; :func:`intervene` applies
edits inside a ``with`` block and removes its hooks on exit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch

from circuit_tests.sites import NeuronSites, on_neurons

Node = tuple[int, int | None, int | None]
Value = float | torch.Tensor | Sequence[torch.Tensor | None]  # a scalar, a tensor, or one tensor per layer


@dataclass(frozen=True)
class NodeSet:
    """A set of (layer, position, neuron) nodes, grouped by layer for fast masking."""

    nodes: tuple[Node, ...]

    @classmethod
    def of(cls, nodes: Iterable[Sequence[int | None]]) -> NodeSet:
        return cls(tuple((int(n[0]), _opt_int(n[1]), _opt_int(n[2])) for n in nodes))

    @cached_property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _, _ in self.nodes})

    def mask(self, layer: int, seq_len: int, n_neurons: int, device: torch.device) -> torch.Tensor:
        """A boolean ``[seq_len, n_neurons]`` mask of this set's nodes in ``layer``."""
        mask = torch.zeros(seq_len, n_neurons, dtype=torch.bool, device=device)
        for position, neuron in self._by_layer[layer]:
            if position is not None and not -seq_len <= position < seq_len:
                raise IndexError(f"Position {position} is outside a prompt of {seq_len} tokens (layer {layer}).")
            mask[slice(None) if position is None else position, slice(None) if neuron is None else neuron] = True
        return mask

    @cached_property
    def _by_layer(self) -> dict[int, list[tuple[int | None, int | None]]]:
        groups: dict[int, list[tuple[int | None, int | None]]] = defaultdict(list)
        for layer, position, neuron in self.nodes:
            groups[layer].append((position, neuron))
        return groups

    def __len__(self) -> int:
        return len(self.nodes)


def _opt_int(value: int | None) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class Edit:
    """An operation on the neurons of a node set: ``new = op(old, value)`` where the mask is set."""

    nodes: NodeSet
    op: Callable[[torch.Tensor, torch.Tensor | float], torch.Tensor]
    value: Value

    def apply(self, layer: int, neurons: torch.Tensor) -> torch.Tensor:
        mask = self.nodes.mask(layer, neurons.shape[-2], neurons.shape[-1], neurons.device)
        new = self.op(neurons, self._value_for(layer, neurons))
        return torch.where(mask, new.to(neurons.dtype), neurons)

    def _value_for(self, layer: int, neurons: torch.Tensor) -> torch.Tensor | float:
        value = self.value[layer] if isinstance(self.value, Sequence) else self.value
        if value is None:
            raise ValueError(f"No value given for layer {layer}.")
        return value.to(neurons.device) if isinstance(value, torch.Tensor) else value


def replace(nodes: NodeSet, value: Value) -> Edit:
    """Set the nodes to ``value`` (a scalar, or a tensor broadcastable to ``[batch, pos, neurons]``)."""
    return Edit(nodes, lambda old, value: torch.as_tensor(value, device=old.device).expand_as(old), value)


def scale(nodes: NodeSet, factor: Value) -> Edit:
    """Multiply the nodes by ``factor`` (0 ablates to zero, 1 is a no-op)."""
    return Edit(nodes, lambda old, factor: old * factor, factor)


def add(nodes: NodeSet, delta: Value) -> Edit:
    """Add ``delta`` to the nodes."""
    return Edit(nodes, lambda old, delta: old + delta, delta)


def patch(nodes: NodeSet, source: Sequence[torch.Tensor | None]) -> Edit:
    """Set the nodes to their values in ``source``: per-layer activations captured on another prompt."""
    return replace(nodes, source)


@contextmanager
def intervene(sites: NeuronSites, edits: Iterable[Edit]) -> Iterator[None]:
    """Apply ``edits`` to every forward pass inside the block, in order."""
    edits = list(edits)
    layers = sorted({layer for edit in edits for layer in edit.nodes.layers})

    def apply(layer: int, neurons: torch.Tensor) -> torch.Tensor:
        for edit in edits:
            if layer in edit.nodes.layers:
                neurons = edit.apply(layer, neurons)
        return neurons

    with on_neurons(sites, apply, layers):
        yield
