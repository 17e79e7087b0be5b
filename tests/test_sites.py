"""Neuron sites and hooks on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from circuit_tests.errors import UnsupportedArchitectureError
from circuit_tests.model.interventions import intervene, per_copy_logits, replace, scale, shared_positions
from circuit_tests.model.nodes import Circuit
from circuit_tests.model.sites import ARCHITECTURES, NeuronSites, capture, copies_from, in_place_of_mlps, on_neurons
from circuit_tests.testing import TINY_ARCHITECTURES

SETTINGS = settings(max_examples=15, deadline=None, derandomize=True)


def logits(sites: NeuronSites, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sites.model(ids).logits


def hook_count(sites: NeuronSites) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in sites.model.modules())


def test_every_supported_architecture_has_a_tiny_model():
    assert set(TINY_ARCHITECTURES) == set(ARCHITECTURES)


def test_sites_are_named_after_the_models_modules(tiny_sites):
    modules = dict(tiny_sites.model.named_modules())
    assert tiny_sites.n_layers == tiny_sites.model.config.num_hidden_layers == 3
    assert tiny_sites.n_neurons == 96
    for site in tiny_sites.sites:
        assert modules[site.name] is site.down_proj


def test_captured_neurons_are_what_the_down_projection_receives(tiny_sites, tiny_ids):
    outputs = {}
    handles = [
        site.mlp.register_forward_hook(lambda m, a, out, layer=site.layer: outputs.__setitem__(layer, out))
        for site in tiny_sites.sites
    ]
    try:
        with capture(tiny_sites) as acts:
            logits(tiny_sites, tiny_ids)
    finally:
        for handle in handles:
            handle.remove()
    for site in tiny_sites.sites:
        assert acts[site.layer].shape == (2, 7, tiny_sites.n_neurons)
        with torch.no_grad():
            torch.testing.assert_close(site.down_proj(acts[site.layer]), outputs[site.layer], rtol=0, atol=0)


@SETTINGS
@given(data=st.data())
def test_no_op_interventions_leave_logits_unchanged(tiny_sites, tiny_ids, data):
    nodes = data.draw(node_sets(tiny_sites, seq_len=7))
    base = logits(tiny_sites, tiny_ids)
    with capture(tiny_sites) as own:
        logits(tiny_sites, tiny_ids)
    with intervene(tiny_sites, [scale(nodes, 1.0), replace(nodes, own)]):
        assert torch.equal(logits(tiny_sites, tiny_ids), base)


@SETTINGS
@given(data=st.data())
def test_edits_touch_exactly_the_chosen_nodes(tiny_sites, tiny_ids, data):
    nodes = data.draw(node_sets(tiny_sites, seq_len=7, max_layers=1))
    layer = nodes.layers[0]
    with capture(tiny_sites) as before:
        logits(tiny_sites, tiny_ids)
    with intervene(tiny_sites, [replace(nodes, 7.0)]), capture(tiny_sites) as after:
        logits(tiny_sites, tiny_ids)
    mask = nodes.mask(layer, 7, tiny_sites.n_neurons, torch.device("cpu"))
    assert torch.equal(after[layer], torch.where(mask, torch.tensor(7.0), before[layer]))
    for earlier in range(layer):
        assert torch.equal(after[earlier], before[earlier])


def test_zeroing_a_layer_removes_its_mlp_contribution(tiny_sites, tiny_ids):
    for site in tiny_sites.sites:
        bias = getattr(site.down_proj, "bias", None)

        def without_mlp(module, args, out):
            return torch.zeros_like(out) if bias is None else torch.zeros_like(out) + bias

        handle = site.mlp.register_forward_hook(without_mlp)
        try:
            removed = logits(tiny_sites, tiny_ids)
        finally:
            handle.remove()
        with intervene(tiny_sites, [scale(Circuit.of([(site.layer, None, None)]), 0.0)]):
            torch.testing.assert_close(logits(tiny_sites, tiny_ids), removed)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_copies_branched_at_a_layer_equal_copies_run_from_the_start(tiny_sites, tiny_ids, layer):
    """Exact patching runs the layers below its lowest patched one once; the logits must not change."""
    copies, batch, hooks = 3, len(tiny_ids), hook_count(tiny_sites)

    def scale_each_copy(at: int, neurons: torch.Tensor) -> torch.Tensor:
        factors = torch.tensor([0.0, 1.0, 2.5]).repeat_interleave(batch).view(-1, 1, 1)
        return neurons * factors

    with on_neurons(tiny_sites, scale_each_copy, layers=range(layer, 3)):
        expected = logits(tiny_sites, tiny_ids.repeat(copies, 1))
        with copies_from(tiny_sites, layer, copies):
            branched = logits(tiny_sites, tiny_ids)
    torch.testing.assert_close(branched, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[:batch], expected[batch : 2 * batch])  # the copies do differ
    assert hook_count(tiny_sites) == hooks


def _masks(layers: int, positions: int, neurons: int, last_differing: int) -> torch.Tensor:
    """Five copies: none chosen, a circuit at the last position, all chosen, a circuit reaching back to position
    ``last_differing``, all chosen but one node at the last position."""
    chosen = torch.zeros(5, layers, positions, neurons, dtype=torch.bool)
    chosen[1, :, -1, :7] = True
    chosen[2] = True
    chosen[3, 1, last_differing:, 3] = True
    chosen[4] = True
    chosen[4, 0, -1, 0] = False
    return chosen


def test_shared_positions_are_those_every_copy_treats_alike():
    shared, chosen_there = shared_positions(_masks(3, 9, 16, last_differing=4))
    assert shared == 4 and chosen_there.tolist() == [False, False, True, False, True]
    assert shared_positions(_masks(3, 9, 16, last_differing=0))[0] == 0  # a node at the first position: nothing shared
    assert shared_positions(torch.ones(2, 3, 9, 16, dtype=torch.bool))[0] == 8  # the last position always runs per copy


def _mixed(chosen: torch.Tensor, inside: list[torch.Tensor] | None, outside: list[torch.Tensor] | None):
    """per_copy's values written out plainly, every MLP run whole: chosen neurons take ``inside``, the others ``outside``."""
    def mix(layer: int, neurons: torch.Tensor) -> torch.Tensor:
        neurons = neurons.view(chosen.shape[0], -1, *neurons.shape[1:])
        mask = chosen[:, layer].unsqueeze(1)
        neurons = neurons if inside is None else torch.where(mask, inside[layer], neurons)
        return (neurons if outside is None else torch.where(mask, neurons, outside[layer])).flatten(0, 1)
    return mix


@pytest.mark.parametrize("last_differing", [0, 4, 8])
def test_copies_sharing_their_first_positions_equal_copies_run_whole(tiny_sites, last_differing):
    """Evaluation runs the positions that all copies treat alike once per way (a key-value cache), and no MLP where all of a
    layer's neurons take given values; the logits must not change."""
    hooks, generator = hook_count(tiny_sites), torch.Generator().manual_seed(0)
    ids = torch.randint(4, 200, (3, 9), generator=generator)
    chosen = _masks(tiny_sites.n_layers, 9, tiny_sites.n_neurons, last_differing)
    values = [[torch.randn(3, 9, tiny_sites.n_neurons, generator=generator) for _ in range(tiny_sites.n_layers)] for _ in range(2)]
    means = [torch.randn(1, 9, tiny_sites.n_neurons, generator=generator).expand(3, -1, -1) for _ in range(tiny_sites.n_layers)]
    for inside, outside in [(None, values[0]), (values[1], None), values, (None, means)]:
        with on_neurons(tiny_sites, _mixed(chosen, inside, outside)):
            expected = logits(tiny_sites, ids.repeat(5, 1))[:, -1:]
        torch.testing.assert_close(per_copy_logits(tiny_sites, ids, chosen, inside, outside), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(expected[:3], expected[3:6])  # the copies do differ
    assert hook_count(tiny_sites) == hooks
    assert not any("forward" in vars(site.mlp) for site in tiny_sites.sites)  # the MLPs' own forwards are back


def test_mlps_get_their_own_forwards_back_after_an_error(tiny_sites, tiny_ids):
    before = logits(tiny_sites, tiny_ids)

    def boom(layer: int, own, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), in_place_of_mlps(tiny_sites, boom):
        logits(tiny_sites, tiny_ids)
    assert not any("forward" in vars(site.mlp) for site in tiny_sites.sites)
    torch.testing.assert_close(logits(tiny_sites, tiny_ids), before)


def test_hooks_are_removed_on_exit_and_on_error(tiny_sites, tiny_ids):
    base = logits(tiny_sites, tiny_ids)
    before = hook_count(tiny_sites)
    nodes = Circuit.of([(0, None, None)])
    with intervene(tiny_sites, [replace(nodes, 3.0)]), capture(tiny_sites, grad=True):
        assert hook_count(tiny_sites) > before
    assert hook_count(tiny_sites) == before
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(tiny_sites, [replace(nodes, 3.0)]), capture(tiny_sites):
            raise RuntimeError("boom")
    assert hook_count(tiny_sites) == before
    assert torch.equal(logits(tiny_sites, tiny_ids), base)


def test_a_failing_hook_is_removed_too(tiny_sites, tiny_ids):
    before = hook_count(tiny_sites)

    def explode(layer, neurons):
        raise ValueError("hook failed")

    with pytest.raises(ValueError, match="hook failed"), on_neurons(tiny_sites, explode):
        logits(tiny_sites, tiny_ids)
    assert hook_count(tiny_sites) == before


def test_gradient_capture_gives_every_layer_in_one_backward(tiny_sites, tiny_ids):
    with capture(tiny_sites, grad=True) as acts:
        out = tiny_sites.model(tiny_ids).logits[:, -1, 0].sum()
    grads = torch.autograd.grad(out, acts)
    assert all(g.shape == a.shape for g, a in zip(grads, acts))
    assert grads[0].abs().sum() > 0


def test_unsupported_architecture_names_itself_and_the_supported_list():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=32))
    with pytest.raises(UnsupportedArchitectureError) as error:
        NeuronSites(model)
    assert "BloomForCausalLM" in str(error.value)
    assert all(model_type in str(error.value) for model_type in ARCHITECTURES)


@st.composite
def node_sets(draw, sites: NeuronSites, seq_len: int, max_layers: int = 3) -> Circuit:
    """Random (layer, position or None, neuron or None) node sets within the model's shape."""
    layers = draw(st.lists(st.integers(0, sites.n_layers - 1), min_size=1, max_size=max_layers, unique=True))
    node = st.tuples(
        st.sampled_from(layers),
        st.none() | st.integers(-seq_len, seq_len - 1),
        st.none() | st.integers(0, sites.n_neurons - 1),
    )
    return Circuit.of(draw(st.lists(node, min_size=1, max_size=20)))
