"""Attribution on tiny random models: exactness where it must hold, RelP's rules, invariances."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from circuit_tests.analysis.attribution import AttributionOptions, Scores, attribute, neuron_values
from circuit_tests.analysis.metrics import logit_diff
from circuit_tests.analysis.relp import RelPRules, relp_rules
from circuit_tests.model.data import PairedBatch
from circuit_tests.model.interventions import intervene, patch
from circuit_tests.model.nodes import Circuit
from circuit_tests.model.sites import NeuronSites, capture
from circuit_tests.testing import tiny_model

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True)
ALL_RULES_OFF = AttributionOptions(method="relp", norm_rule=False, activation_rule=False, half_rule=False)


def paired_batch(n: int = 4, length: int = 6, seed: int = 0) -> PairedBatch:
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, 256, (n, length), generator=generator)
    patch = torch.randint(3, 256, (n, length), generator=generator)
    answers = torch.randint(3, 256, (2, n), generator=generator)
    return PairedBatch(clean, patch, answers[0], answers[1], tuple(range(n)))


def split(batch: PairedBatch, sizes: list[int]) -> list[PairedBatch]:
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [_rows(batch, torch.arange(a, b)) for a, b in zip(bounds, bounds[1:])]


def _rows(batch: PairedBatch, rows: torch.Tensor) -> PairedBatch:
    return PairedBatch(
        batch.clean_ids[rows], batch.patch_ids[rows], batch.clean_answer[rows], batch.patch_answer[rows],
        tuple(batch.examples[i] for i in rows.tolist()),
    )


def prompts_swapped(batch: PairedBatch) -> PairedBatch:
    """The same metric, patched the other way: from the counterfactual prompt towards the clean one."""
    return PairedBatch(batch.patch_ids, batch.clean_ids, batch.clean_answer, batch.patch_answer, batch.examples)


def answers_swapped(batch: PairedBatch) -> PairedBatch:
    """The same patch, measured by the negated metric."""
    return PairedBatch(batch.clean_ids, batch.patch_ids, batch.patch_answer, batch.clean_answer, batch.examples)


def values(scores: Scores, nodes: list) -> torch.Tensor:
    index = torch.tensor(nodes)
    return scores.scores[index[:, 0], index[:, 1], index[:, 2]]


@pytest.fixture(scope="module")
def linear_sites() -> NeuronSites:
    """A tiny Llama whose final norm is removed: the logits are linear in the last layer's neurons."""
    model = tiny_model("llama").requires_grad_(False)
    model.model.norm = nn.Identity()
    return NeuronSites(model)


def test_atp_equals_exact_patching_where_the_metric_is_linear(linear_sites):
    batch = paired_batch()
    last = linear_sites.n_layers - 1
    nodes = [(last, p, n) for p in range(-batch.n_positions, 0) for n in range(linear_sites.n_neurons)]
    atp = attribute(linear_sites, [batch], AttributionOptions(method="atp"))
    exact = attribute(linear_sites, [batch], AttributionOptions(method="exact"), candidates=nodes)
    torch.testing.assert_close(values(atp, nodes), values(exact, nodes), rtol=1e-3, atol=1e-7)
    assert values(exact, nodes).abs().max() > 1e-4  # the patch matters, so the equality is not 0 == 0


def test_relp_leaves_the_forward_pass_unchanged(tiny_sites, tiny_ids):
    with torch.no_grad():
        plain = tiny_sites.model(tiny_ids).logits
        with relp_rules(tiny_sites, RelPRules(detach_attention=True)), capture(tiny_sites) as relp_neurons:
            relp = tiny_sites.model(tiny_ids).logits
        with capture(tiny_sites) as plain_neurons:
            tiny_sites.model(tiny_ids)
    assert torch.equal(relp, plain)
    assert all(torch.equal(a, b) for a, b in zip(relp_neurons, plain_neurons))


def test_relp_with_every_rule_off_is_attribution_patching(tiny_sites):
    batch = paired_batch()
    atp = attribute(tiny_sites, [batch], AttributionOptions(method="atp"))
    assert torch.equal(attribute(tiny_sites, [batch], ALL_RULES_OFF).scores, atp.scores)


@pytest.mark.parametrize("rule", ["norm_rule", "activation_rule", "half_rule"])
def test_each_relp_rule_changes_the_scores(rule):
    sites = NeuronSites(tiny_model("gemma3_text").requires_grad_(False))
    batch = paired_batch()
    only = dataclasses.replace(ALL_RULES_OFF, **{rule: True})
    assert not torch.allclose(attribute(sites, [batch], only).scores, attribute(sites, [batch], ALL_RULES_OFF).scores)


def test_detached_attention_pattern_gets_no_gradient(tiny_sites, tiny_ids):
    for detach, expected in ((False, True), (True, False)):
        with relp_rules(tiny_sites, RelPRules(detach_attention=detach)), capture(tiny_sites, grad=True):
            attentions = tiny_sites.model(tiny_ids, output_attentions=True).attentions
        assert attentions[-1].requires_grad is expected


def test_integrated_gradients_are_complete_per_layer(tiny_sites):
    """Summed over a layer, IG tends to the exact effect of patching the whole layer, closer than AtP."""
    batch = paired_batch(n=2)
    layer = 1
    with torch.no_grad():
        before = logit_diff(tiny_sites.model(batch.clean_ids).logits, batch)
        whole_layer = patch(Circuit.of([(layer, None, None)]), neuron_values(tiny_sites, batch.patch_ids))
        with intervene(tiny_sites, [whole_layer]):
            after = logit_diff(tiny_sites.model(batch.clean_ids).logits, batch)
    exact = (after - before).mean()
    atp = attribute(tiny_sites, [batch], AttributionOptions(method="atp")).scores[layer].sum()
    ig = attribute(tiny_sites, [batch], AttributionOptions(method="ig", steps=32)).scores[layer].sum()
    assert abs(ig - exact) < abs(atp - exact) or abs(ig - exact) < 1e-5


@SETTINGS
@given(sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4), seed=st.integers(0, 100))
def test_scores_do_not_depend_on_batching_or_order(sizes, seed):
    sites = _sites("qwen3")
    batch = paired_batch(n=sum(sizes), seed=seed)
    whole = attribute(sites, [batch]).scores
    torch.testing.assert_close(attribute(sites, split(batch, sizes)).scores, whole, rtol=1e-4, atol=1e-6)
    order = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(attribute(sites, [_rows(batch, order)]).scores, whole, rtol=1e-4, atol=1e-6)


@SETTINGS
@given(seed=st.integers(0, 100), method=st.sampled_from(["atp", "relp"]))
def test_swapping_the_answers_flips_the_sign(seed, method):
    sites = _sites("gemma2")
    batch = paired_batch(seed=seed)
    options = AttributionOptions(method=method)
    flipped = attribute(sites, [answers_swapped(batch)], options).scores
    assert torch.equal(flipped, -attribute(sites, [batch], options).scores)


@SETTINGS
@given(seed=st.integers(0, 100))
def test_swapping_clean_and_counterfactual_flips_the_sign_where_linear(linear_sites, seed):
    batch = paired_batch(seed=seed)
    last = linear_sites.n_layers - 1
    forward = attribute(linear_sites, [batch], AttributionOptions(method="atp")).scores[last]
    backward = attribute(linear_sites, [prompts_swapped(batch)], AttributionOptions(method="atp")).scores[last]
    torch.testing.assert_close(backward, -forward, rtol=0, atol=2e-6)


def test_zero_and_mean_baselines(tiny_sites):
    batch = paired_batch()
    zero = attribute(tiny_sites, [batch], AttributionOptions(method="atp", baseline="zero"))
    with capture(tiny_sites, grad=True) as acts:
        value = logit_diff(tiny_sites.model(batch.clean_ids).logits, batch).sum()
    grads = torch.autograd.grad(value, acts)
    expected = torch.stack([(-a.detach() * g).mean(0) for a, g in zip(acts, grads)])
    torch.testing.assert_close(zero.scores, expected, rtol=1e-5, atol=1e-7)
    mean = attribute(tiny_sites, [batch], AttributionOptions(method="atp", baseline="mean"))
    assert mean.scores.shape == zero.scores.shape and not torch.equal(mean.scores, zero.scores)


def test_the_first_k_ranked_nodes_are_the_first_k_of_the_whole_ranking_ties_and_nans_included():
    generator = torch.Generator().manual_seed(0)
    for trial in range(50):
        table = torch.randint(-3, 4, (3, 4, 50), generator=generator).float()  # few distinct magnitudes: many ties
        table[torch.rand(table.shape, generator=generator) < 0.3] = 0.0
        if trial % 3 == 0:
            table[0, 0, torch.randint(50, (3,), generator=generator)] = float("nan")
        scores = Scores(table, 1)
        everything = scores.ranked()
        for limit in (1, 2, 5, 17, 100, 599, 600, 1000):
            assert [node for node, _ in scores.ranked(limit)] == [node for node, _ in everything[:limit]], (trial, limit)


def test_scores_round_trip_and_rank_by_magnitude(tmp_path):
    scores = Scores(torch.tensor([[[0.1, -0.5], [0.3, 0.0]], [[-0.2, 0.05], [0.0, 0.4]]]), 7, {"model": "m", "method": "relp"})
    assert scores.ranked(3) == [((0, -2, 1), -0.5), ((1, -1, 1), pytest.approx(0.4)), ((0, -1, 0), pytest.approx(0.3))]
    torch.testing.assert_close(scores.by_neuron(), torch.tensor([[0.4, -0.5], [-0.2, 0.45]]))
    scores.save(tmp_path / "s.safetensors")
    loaded = Scores.load(tmp_path / "s.safetensors")
    assert torch.equal(loaded.scores, scores.scores)
    assert (loaded.n_examples, loaded.metadata) == (7, {"model": "m", "method": "relp"})


@pytest.mark.parametrize("align", ["end", "start"])
def test_prompts_of_several_lengths_add_up_at_the_end_they_are_aligned_by(tiny_sites, align):
    """align=end: the last tokens of a 3-token and a 6-token prompt are one node (-1); align=start: their first (0)."""
    short, long = paired_batch(length=3, seed=1), paired_batch(n=5, length=6, seed=2)
    options = AttributionOptions(method="atp", align=align)
    apart = [attribute(tiny_sites, [batch], options) for batch in (short, long)]
    together = attribute(tiny_sites, [short, long], options)
    expected = apart[1].scores * len(long)
    expected[:, slice(-3, None) if align == "end" else slice(0, 3)] += apart[0].scores * len(short)
    torch.testing.assert_close(together.scores, expected / (len(short) + len(long)), rtol=1e-5, atol=1e-7)
    positions = {position for (_, position, _), _ in together.ranked()}
    assert positions and positions <= (set(range(-6, 0)) if align == "end" else set(range(6)))  # named from that end


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="Unknown method 'gradcam'"):
        AttributionOptions(method="gradcam")
    with pytest.raises(ValueError, match="Unknown metric"):
        AttributionOptions(metric="bleu")
    with pytest.raises(ValueError, match="needs candidate nodes"):
        attribute(_sites("llama"), [paired_batch()], AttributionOptions(method="exact"))


_CACHE: dict[str, NeuronSites] = {}


def _sites(model_type: str) -> NeuronSites:
    if model_type not in _CACHE:
        _CACHE[model_type] = NeuronSites(tiny_model(model_type).requires_grad_(False))
    return _CACHE[model_type]
