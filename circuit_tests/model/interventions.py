"""Edit chosen MLP neurons during a forward pass: replace, scale, add, or patch from a cache.

Every intervention names its nodes with a :class:`~circuit_tests.model.nodes.Circuit`. Two
forms share one hook mechanism (:func:`~circuit_tests.model.sites.on_neurons`), and both remove
their hooks when the ``with`` block exits, error or not:

- :func:`intervene` applies :class:`Edit`\\ s (``new = op(old, value)`` on the circuit's nodes) to
  every forward pass inside the block;
- :func:`per_copy` runs several variants of one batch in one pass: the batch is repeated, and in
  copy ``k`` the nodes chosen for ``k`` take one set of values and the rest another. Circuits of
  several sizes, with and without ablation, are measured this way in a single forward pass;
  :func:`per_copy_logits` runs the first positions that the copies treat alike once, not once a copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from circuit_tests.model.nodes import Circuit
from circuit_tests.model.sites import NeuronSites, in_place_of_mlps, next_token_logits, on_neurons

Value = float | torch.Tensor | Sequence[torch.Tensor | None]  # a scalar, a tensor, or one tensor per layer


@dataclass(frozen=True)
class Edit:
    """An operation on the neurons of a circuit: ``new = op(old, value)`` where its mask is set."""

    nodes: Circuit
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


def replace(nodes: Circuit, value: Value) -> Edit:
    """Set the nodes to ``value`` (a scalar, or a tensor broadcastable to ``[batch, pos, neurons]``)."""
    return Edit(nodes, lambda old, value: torch.as_tensor(value, device=old.device).expand_as(old), value)


def scale(nodes: Circuit, factor: Value) -> Edit:
    """Multiply the nodes by ``factor`` (0 ablates to zero, 1 is a no-op)."""
    return Edit(nodes, lambda old, factor: old * factor, factor)


def add(nodes: Circuit, delta: Value) -> Edit:
    """Add ``delta`` to the nodes."""
    return Edit(nodes, lambda old, delta: old + delta, delta)


def patch(nodes: Circuit, source: Sequence[torch.Tensor | None]) -> Edit:
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


@contextmanager
def per_copy(
    sites: NeuronSites,
    chosen: torch.Tensor,
    inside: Sequence[torch.Tensor] | None,
    outside: Sequence[torch.Tensor] | None,
) -> Iterator[None]:
    """Inside the block, forward passes run ``copies`` stacked copies of one batch (copy-major).

    ``chosen`` is ``[copies, layers, positions, neurons]`` (bool). In copy ``k``, chosen neurons
    take the ``inside`` values and the others the ``outside`` values (per layer, ``[batch,
    positions, neurons]``); ``None`` keeps the model's own values.

    Where every neuron of a layer at a position takes given values in a copy (a circuit ablates all
    the others), the MLP's output there is the down projection of those values: it is computed from
    them, and the MLP runs only on the other positions.
    """
    copies = chosen.shape[0]
    running: dict[int, torch.Tensor] = {}  # per layer, while its MLP runs on some positions only: which, [rows, positions]

    def mix(layer: int, neurons: torch.Tensor) -> torch.Tensor:  # on the layer's device, which may be any shard
        mask = chosen[:, layer].to(neurons.device)
        if layer in running:  # neurons is [1, cells, neurons]: the MLP runs on those cells of [copies * batch, positions]
            rows, positions = running[layer].nonzero(as_tuple=True)
            batch = running[layer].shape[0] // copies
            cells = with_values(layer, mask[rows // batch, positions], neurons[0], lambda values: values[rows % batch, positions])
            return cells.unsqueeze(0)
        stacked = neurons.view(copies, -1, *neurons.shape[1:])
        return with_values(layer, mask.unsqueeze(1), stacked, lambda values: values).flatten(0, 1)

    def with_values(layer: int, mask: torch.Tensor, neurons: torch.Tensor, at: Callable[[torch.Tensor], torch.Tensor]
                    ) -> torch.Tensor:
        """``neurons`` with the ``inside`` values where ``mask`` is set and the ``outside`` values elsewhere; ``at`` picks
        those of the layer's ``[batch, positions, neurons]`` values that line up with ``neurons``."""
        if inside is not None:
            neurons = torch.where(mask, at(inside[layer].to(neurons.device, neurons.dtype)), neurons)
        if outside is not None:
            neurons = torch.where(mask, neurons, at(outside[layer].to(neurons.device, neurons.dtype)))
        return neurons

    def mlp(layer: int, own: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        mask = chosen[:, layer].to(hidden.device)
        given = [(values, where.repeat_interleave(hidden.shape[0] // copies, 0)) for values, where in (
            (outside, ~mask.any(-1)), (inside, mask.all(-1))) if values is not None]  # [rows, positions]: all given
        if not any(bool(where.any()) for _, where in given):
            return own(hidden)
        out, batch = hidden.new_empty(hidden.shape), hidden.shape[0] // copies
        for values, where in given:
            rows, positions = where.nonzero(as_tuple=True)
            out[rows, positions] = _projected(sites, layer, values[layer], hidden)[rows % batch, positions]
        rest = ~torch.stack([where for _, where in given]).any(0)
        if rest.any():
            running[layer] = rest
            try:
                out[rest] = own(hidden[rest].unsqueeze(0))[0].to(out.device)
            finally:
                del running[layer]
        return out

    with on_neurons(sites, mix), in_place_of_mlps(sites, mlp):
        yield


def _projected(sites: NeuronSites, layer: int, values: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The MLP output of ``values`` (``[batch, positions, neurons]``) given as the input of ``layer``'s down projection,
    without its hooks; values the same for every example (mean ablation) are projected once."""
    down = sites.sites[layer].down_proj
    weight = down.weight
    once = values.stride(0) == 0
    projected = down.forward((values[:1] if once else values).to(weight.device, weight.dtype).contiguous())
    return projected.to(hidden.device, hidden.dtype).expand(values.shape[0], -1, -1)


def shared_positions(chosen: torch.Tensor) -> tuple[int, torch.Tensor]:
    """How many first positions every copy in ``chosen`` (``[copies, layers, positions, neurons]``) treats alike,
    and per copy whether its neurons are chosen there.

    A copy treats those positions alike when, at every layer, all of its neurons there are chosen or none
    are, the same way at each of them. The last position is never counted: it gives the logits.
    """
    chosen_any, chosen_all = chosen.any(3).any(1), chosen.all(3).all(1)  # [copies, positions]
    alike = ((chosen_any == chosen_all) & (chosen_any == chosen_any[:, :1])).all(0)[:-1]
    return int(alike.int().cumprod(0).sum()), chosen_any[:, 0]


def _at(values: Sequence[torch.Tensor] | None, positions: slice) -> list[torch.Tensor] | None:
    return None if values is None else [layer[:, positions] for layer in values]


@torch.no_grad()
def per_copy_logits(
    sites: NeuronSites,
    ids: torch.Tensor,
    chosen: torch.Tensor,
    inside: Sequence[torch.Tensor] | None,
    outside: Sequence[torch.Tensor] | None,
) -> torch.Tensor:
    """``[copies * batch, 1, vocab]``: the next-token logits of :func:`per_copy`'s copies of ``ids`` (``[batch,
    positions]``, copy-major).

    A circuit of nodes at the last position (a trace aligned at the end) leaves every earlier position
    of a copy wholly inside (all neurons take ``inside`` values) or wholly outside it. Attention is
    causal, so those positions compute the same in every copy that treats them the same way: the first
    positions all copies treat alike (:func:`shared_positions`) run once per way (at most two), and the
    copies run the rest on a cache of their keys and values (when there are more copies than ways). The
    result equals one pass over all copies up to floating-point summation order.
    """
    copies, batch = chosen.shape[0], ids.shape[0]
    shared, kinds = shared_positions(chosen)
    ways = kinds.unique()  # the ways the shared positions are treated: none chosen, all chosen, or both
    if shared == 0 or len(ways) == copies:  # nothing to share
        with per_copy(sites, chosen, inside, outside):
            return next_token_logits(sites.model, ids.repeat(copies, 1))
    cache = DynamicCache(config=sites.model.config)
    start = ways.view(-1, 1, 1, 1).expand(len(ways), chosen.shape[1], shared, chosen.shape[3])
    with per_copy(sites, start, _at(inside, slice(shared)), _at(outside, slice(shared))):
        next_token_logits(sites.model, ids[:, :shared].repeat(len(ways), 1), cache=cache)
    way = (kinds.unsqueeze(1) == ways).int().argmax(1)  # per copy, its row block in the cache
    cache.reorder_cache((way.view(-1, 1) * batch + torch.arange(batch, device=way.device)).flatten())
    with per_copy(sites, chosen[:, :, shared:], _at(inside, slice(shared, None)), _at(outside, slice(shared, None))):
        return next_token_logits(sites.model, ids[:, shared:].repeat(copies, 1), cache=cache)
