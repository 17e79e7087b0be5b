"""Attribution streams: its peak memory grows with the batch, not with the number of examples.

Each measurement runs in a fresh process (peak RSS, ``ru_maxrss``), on a random model of SmolLM2's
neuron shape (conftest.py: 30 layers x 1536 neurons, 16 wide, SmolLM2's tokenizer). Holding every
example's activations and gradients would add about 400 MiB for the 218 extra examples of the larger
run (5 positions x 46,080 neurons x 4 bytes x 2 per example); holding only each batch's counterfactual
activations adds 172 MiB (measured); streaming adds almost nothing.
Figures: docs/benchmarks.md; the allocator settings of the measuring process: conftest.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "fixtures" / "sva" / "nounpp.jsonl"
MEASURE = """
import json, resource, sys
from pathlib import Path
from circuit_tests.analysis.attribution import trace
from circuit_tests.model.data import read_jsonl
from circuit_tests.model.loading import load_model
examples = read_jsonl(Path(sys.argv[2]))[: int(sys.argv[3])]
scores, data = trace(load_model(sys.argv[1]), examples, batch_size=32)
print(json.dumps({"examples": data.n_examples, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read in KiB (ru_maxrss) with glibc's malloc settings")
def test_peak_memory_does_not_grow_with_the_number_of_examples(peak_rss, smollm2_shaped):
    small, large = (peak_rss(MEASURE, smollm2_shaped, DATA, pairs) for pairs in (64, 300))
    assert large["examples"] - small["examples"] > 200
    print(f"peak RSS: {small['peak_mib']:.0f} MiB for {small['examples']} examples, {large['peak_mib']:.0f} MiB for {large['examples']}")
    assert large["peak_mib"] - small["peak_mib"] < 100
