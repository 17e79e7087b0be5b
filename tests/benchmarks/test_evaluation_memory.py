"""Evaluation runs in chunks: its peak memory grows with the batch, not with the held-out split.

Each measurement runs in a fresh process (peak RSS, ``ru_maxrss``): a faithfulness curve under
mean ablation at three circuit sizes, then top-30 flip rates, with batch size 8, on a random model of
SmolLM2's neuron shape (conftest.py: 30 layers x 1536 neurons, 16 wide, SmolLM2's tokenizer).
Pairs are drawn from every file of fixtures/sva in one seeded order, repeated as needed.
Holding every example's counterfactual activations (30 x 1536 neurons per token, float32, about
1 MiB for a 5-token prompt, twice over while the means were pooled) would add about 450 MiB for
the 250 extra examples of the larger run; holding only the flips' counterfactual activations adds
220 MiB (measured); chunking adds almost nothing. The circuit is the top 1000
neurons of seeded random scores: what it means does not matter here, only what evaluation holds,
and tracing one would add attribution's own peak to both runs. Figures: docs/benchmarks.md.

The processes run with the fixed glibc malloc settings of conftest.py, so that peak RSS follows
the memory in use.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "sva"
BATCH_SIZE = 8
MEASURE = """
import json, resource, sys
from pathlib import Path
import torch
from circuit_tests.analysis.attribution import Scores
from circuit_tests.analysis.measures import faithfulness_curve, flip_rates
from circuit_tests.analysis.selection import top_k
from circuit_tests.model.data import read_jsonl, tokenize_pairs
from circuit_tests.model.loading import load_model
from circuit_tests.model.sites import NeuronSites
model, folder, n_pairs, batch_size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pool = [example for path in sorted(folder.glob("*.jsonl")) for example in read_jsonl(path)]
order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0)).tolist()
loaded = load_model(model)
data = tokenize_pairs([pool[order[i % len(pool)]] for i in range(n_pairs)], loaded.tokenizer)
sites = NeuronSites(loaded.model)
random = torch.randn(sites.n_layers, 1, sites.n_neurons, generator=torch.Generator().manual_seed(0))
circuit = top_k(Scores(random, 1), 1000, aggregate=True)
curve = faithfulness_curve(sites, data, circuit, [10, 100, 1000], "mean", batch_size=batch_size)
flips = flip_rates(sites, data, circuit, [30], batch_size=batch_size)
assert curve.per_example.shape == (5, data.n_examples) and flips.shape == (1, data.n_examples)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"examples": data.n_examples, "peak_mib": peak}))
"""

@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read in KiB (ru_maxrss) with glibc's malloc settings")
def test_evaluation_peak_memory_does_not_grow_with_the_test_split(peak_rss, smollm2_shaped):
    small, large = (peak_rss(MEASURE, smollm2_shaped, FIXTURES, pairs, BATCH_SIZE) for pairs in (30, 300))
    assert large["examples"] - small["examples"] > 240
    print(f"peak RSS: {small['peak_mib']:.0f} MiB for {small['examples']} examples, {large['peak_mib']:.0f} MiB for {large['examples']}")
    assert large["peak_mib"] - small["peak_mib"] < 100
