"""Nodes and circuits: the one way a set of neurons is named.

A node is ``(layer, position, neuron)``. ``position`` counts from the end of the prompt (``-1``:
the last token; traced circuits always name positions so, whatever the prompts' lengths), from the
first token when non-negative (a position written by hand), or is ``None`` for every position; ``neuron`` is ``None`` for every neuron of the layer.
A :class:`Circuit` is an ordered set of nodes, strongest first, each with the weight (the
|score| that chose it; 1 for a node listed by hand). Interventions edit a circuit's nodes
(:meth:`Circuit.mask`), measures evaluate its top nodes in one pass (:meth:`Circuit.ranks`),
and reports print them (:func:`format_node`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

Node = tuple[int, int | None, int | None]
NODE_PATTERN = re.compile(r"[Ll](\d+)(?:/[Pp](-?\d+))?(?:/[Nn](\d+))?")


@dataclass(frozen=True)
class Circuit:
    """Nodes, strongest first, with the weight that chose each (for overlap)."""

    nodes: tuple[Node, ...]
    weights: tuple[float, ...]

    @classmethod
    def of(cls, nodes: Iterable[Sequence[int | None]], weights: Iterable[float] | None = None) -> Circuit:
        """A circuit of the given nodes; without weights, each weighs 1 (a circuit written by hand)."""
        listed = tuple((int(node[0]), _int_or_none(node[1]), _int_or_none(node[2])) for node in nodes)
        return cls(listed, tuple(weights) if weights is not None else (1.0,) * len(listed))

    @classmethod
    def from_neurons(cls, neurons: Iterable[Sequence[int]], position: int | None = None) -> Circuit:
        """(layer, neuron) pairs at one position (``None``: every position)."""
        return cls.of((layer, position, neuron) for layer, neuron in neurons)

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __contains__(self, node: object) -> bool:
        """``(layer, position, neuron) in circuit``."""
        return isinstance(node, (tuple, list)) and tuple(node) in self._members

    @cached_property
    def _members(self) -> frozenset[Node]:
        return frozenset(self.nodes)

    def top(self, k: int) -> Circuit:
        """The ``k`` strongest nodes."""
        return Circuit(self.nodes[:k], self.weights[:k])

    def neurons(self) -> set[tuple[int, int | None]]:
        """The (layer, neuron) pairs, positions dropped."""
        return {(layer, neuron) for layer, _, neuron in self.nodes}

    @cached_property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _, _ in self.nodes})

    def mask(self, layer: int, n_positions: int, n_neurons: int, device: torch.device) -> torch.Tensor:
        """A boolean ``[positions, neurons]`` mask of this circuit's nodes in ``layer``."""
        mask = torch.zeros(n_positions, n_neurons, dtype=torch.bool, device=device)
        for position, neuron in self._by_layer[layer]:
            if not in_prompt(position, n_positions):
                raise IndexError(f"Position {position} is outside a prompt of {n_positions} tokens (layer {layer}).")
            mask[every_if_none(position), every_if_none(neuron)] = True
        return mask

    def ranks(self, n_layers: int, n_positions: int, n_neurons: int) -> torch.Tensor:
        """``[layers, positions, neurons]``: each node's rank in the circuit, ``len(self)`` outside it.

        ``ranks < k`` is the mask of the top ``k`` nodes, so circuits of several sizes are masked at
        once. A node listed twice (or covered by a whole-layer entry) keeps its best rank; positions
        past the prompt are left out. Single nodes are placed in one scatter (MIB's curve ranks every
        node of the model), entries for every position or neuron one by one.
        """
        rank = torch.full((n_layers, n_positions, n_neurons), len(self), dtype=torch.long)
        single = [(index, node) for index, node in enumerate(self.nodes) if None not in node[1:]]
        if single:
            index = torch.tensor([i for i, _ in single])
            layer, position, neuron = torch.tensor([node for _, node in single]).unbind(1)
            position = position + (position < 0) * n_positions
            inside = (position >= 0) & (position < n_positions)
            flat = (layer * n_positions + position) * n_neurons + neuron
            rank.view(-1).scatter_reduce_(0, flat[inside], index[inside], reduce="amin")
        for index, (layer, position, neuron) in enumerate(self.nodes):
            if None in (position, neuron) and in_prompt(position, n_positions):
                covered = rank[layer, every_if_none(position), every_if_none(neuron)]
                covered.clamp_(max=index)
        return rank

    @cached_property
    def _by_layer(self) -> dict[int, list[tuple[int | None, int | None]]]:
        groups: dict[int, list[tuple[int | None, int | None]]] = defaultdict(list)
        for layer, position, neuron in self.nodes:
            groups[layer].append((position, neuron))
        return groups


def moved(before: Sequence[Node], after: Sequence[Node]) -> tuple[list[Node], list[Node]]:
    """The nodes that entered (in ``after`` only, in its order) and left (in ``before`` only, in its order)."""
    old, new = set(before), set(after)
    return [node for node in dict.fromkeys(after) if node not in old], [node for node in dict.fromkeys(before) if node not in new]


def format_node(node: Node) -> str:
    """``L3/P-1/N77`` (``L3/N77`` for every position, ``L3`` for the whole layer)."""
    layer, position, neuron = node
    return f"L{layer}" + ("" if position is None else f"/P{position}") + ("" if neuron is None else f"/N{neuron}")


def parse_node(text: str) -> Node:
    """The node :func:`format_node` writes: ``L3/P-1/N77``, ``L3/N77`` (every position) or ``L3`` (the whole layer)."""
    match = NODE_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a node: write L<layer>/N<neuron> or L<layer>/P<position>/N<neuron>, e.g. L26/P-1/N1071.")
    layer, position, neuron = match.groups()
    return int(layer), _int_or_none(position), _int_or_none(neuron)


def format_nodes(nodes: Sequence[Node], shown: int = 12) -> str:
    """The first ``shown`` nodes, then how many more; ``none`` for no node."""
    if not nodes:
        return "none"
    text = ", ".join(format_node(node) for node in nodes[:shown])
    return text + (f", ... {len(nodes) - shown} more" if len(nodes) > shown else "")


def _int_or_none(value: int | None) -> int | None:
    return None if value is None else int(value)


def in_prompt(position: int | None, n_positions: int) -> bool:
    """Whether a node's position is a token of a prompt of ``n_positions`` tokens (``None``, every position, always is)."""
    return position is None or -n_positions <= position < n_positions


def every_if_none(index: int | None) -> int | slice:
    """A position or neuron as a tensor index: ``None`` selects all of them."""
    return slice(None) if index is None else index
