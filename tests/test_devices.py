"""Every measurement gives the same numbers on one device, on a CUDA device, and sharded by accelerate.

A sharded model (``--circuit-device auto``, or any ``device_map``) runs its layers on different
devices, with accelerate's hooks moving activations between them. Neuron hooks then see tensors
on the layer's own device, and gradients flow back across devices. :func:`measure_everything`
runs every path that touches neurons (attribution by every method and baseline, exact patching,
faithfulness curves under every ablation and their ends, flips, steering, multiplier sweeps, and
what reads a circuit: edge estimates and exact edges, the output lens, corpus extremes) so a tensor left
on the wrong device fails here. On a CPU-only machine the "shards" are both the CPU, with
accelerate's hooks forced on; on a runner with two GPUs the same test splits the model over them.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model

from circuit_tests.analysis.attribution import AttributionOptions, attribute
from circuit_tests.analysis.cards import corpus_extremes, output_lens
from circuit_tests.analysis.edges import edge_weights, exact_edge_weights
from circuit_tests.analysis.measures import (
    curve_ends,
    faithfulness_curve,
    flip_rates,
    multiplier_sweep,
    patch_success,
    preferences,
)
from circuit_tests.analysis.selection import top_k
from circuit_tests.model import loading as models
from circuit_tests.model.data import PairedBatch, Tokenized
from circuit_tests.model.loading import LoadOptions, load_model
from circuit_tests.model.sites import NeuronSites
from circuit_tests.testing import tiny_model

ARCHITECTURES = ("llama", "gemma3_text")
N_GPUS = torch.cuda.device_count()
needs_one_gpu = pytest.mark.skipif(N_GPUS < 1, reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(N_GPUS < 2, reason=f"needs two CUDA devices to shard over ({N_GPUS} visible)")


def measure_everything(sites: NeuronSites, data: Tokenized) -> dict[str, torch.Tensor]:
    """Every neuron-level measurement of the library on ``data``, as CPU tensors keyed by name."""
    out: dict[str, torch.Tensor] = {"clean": preferences(sites, data)}
    for method in ("relp", "atp", "ig"):
        for baseline in ("counterfactual", "zero", "mean"):
            options = AttributionOptions(method=method, baseline=baseline, steps=3)
            out[f"{method}/{baseline}"] = attribute(sites, data.batches, options).scores
    circuit = top_k(attribute(sites, data.batches), 30)
    candidates = [(layer, position, neuron) for layer, position, neuron in circuit.nodes[:12]]
    out["exact"] = attribute(sites, data.batches, AttributionOptions(method="exact"), candidates).scores
    for ablation in ("mean", "zero", "resample", "patch"):
        curve = faithfulness_curve(sites, data, circuit, [3, 30], ablation)
        out[f"curve/{ablation}"], out[f"completeness/{ablation}"] = curve.per_example, curve.complement
    out["flips"] = flip_rates(sites, data, circuit, [3, 30])
    out["steering"] = patch_success(sites, data, circuit, [3, 30])
    out["sweep"] = multiplier_sweep(sites, data.batches[0].clean_ids, circuit, [0.0, 2.0], [5, 6])
    out["ends"] = curve_ends(sites, data)
    for method in ("relp", "atp"):
        out[f"edges/{method}"] = edge_weights(sites, data, candidates, AttributionOptions(method=method))
    out["edges/exact"] = exact_edge_weights(sites, data, candidates)
    out["lens"] = output_lens(sites, [(layer, neuron) for layer, _, neuron in candidates])
    corpus = data.batches[0].clean_ids.tolist()
    out |= {f"extremes/{name}": tensor for name, tensor in corpus_extremes(sites, [ids[: 2 + i % 4] for i, ids in enumerate(corpus)],
                                                                              k=3, batch_size=4).tensors().items()}
    return out


def shard(model: torch.nn.Module, first: str, second: str) -> torch.nn.Module:
    """Embeddings, the output head and layer 0 on ``first``; the other layers and the final norm on ``second``."""
    device_map = {f"model.{name}": first for name, _ in model.model.named_children() if name not in ("layers", "norm")}
    device_map |= {"model.layers.0": first, "lm_head": first, "model.norm": second}
    device_map |= {f"model.layers.{layer}": second for layer in range(1, model.config.num_hidden_layers)}
    return dispatch_model(model, device_map=device_map, force_hooks=True)


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], tolerance: float) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=tolerance, atol=tolerance, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def data() -> Tokenized:
    generator = torch.Generator().manual_seed(2)
    clean = torch.randint(3, 256, (6, 5), generator=generator)
    counterfactual = clean.clone()
    counterfactual[:, 1] = torch.randint(3, 256, (6,), generator=generator)
    answers = torch.randint(3, 256, (2, 6), generator=generator)
    return Tokenized((PairedBatch(clean, counterfactual, answers[0], answers[1], tuple(range(6))),))


def frozen(arch: str, device: str) -> NeuronSites:
    return NeuronSites(tiny_model(arch).requires_grad_(False).to(device))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("first, second", [("cpu", "cpu"), pytest.param("cuda:0", "cuda:1", marks=needs_two_gpus)])
def test_a_sharded_model_gives_the_numbers_of_an_unsharded_one(arch, first, second, data):
    expected = measure_everything(frozen(arch, first), data)
    sharded = NeuronSites(shard(tiny_model(arch).requires_grad_(False), first, second))
    assert {site.down_proj.weight.device.type for site in sharded.sites} == {torch.device(first).type}
    assert sharded.layer_device(0) == torch.device(first) and sharded.layer_device(1) == torch.device(second)
    assert_same(measure_everything(sharded, data), expected, tolerance=1e-5)


@needs_one_gpu
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cuda_gives_the_numbers_of_the_cpu(arch, data):
    assert_same(measure_everything(frozen(arch, "cuda"), data), measure_everything(frozen(arch, "cpu"), data), tolerance=1e-3)


def test_device_auto_loads_through_accelerate_and_measures_the_same(tmp_path, monkeypatch, data):
    """``--circuit-device auto``: accelerate places the model (every GPU, else the CPU) and nothing changes."""
    tiny_model("llama").save_pretrained(tmp_path)
    expected = measure_everything(frozen("llama", "cpu"), data)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: None)  # ids are given
    loaded = load_model(str(tmp_path), LoadOptions(device="auto", dtype="float32"))
    assert loaded.device.type == ("cuda" if N_GPUS else "cpu")
    assert_same(measure_everything(NeuronSites(loaded.model), data), expected, tolerance=1e-3 if N_GPUS else 1e-5)
