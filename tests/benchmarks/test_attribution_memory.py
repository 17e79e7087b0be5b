"""Attribution streams: its peak memory grows with the batch, not with the number of examples.

Each measurement runs in a fresh process (peak RSS, ``ru_maxrss``). Holding every example's
activations and gradients would add about 400 MiB for the 218 extra examples of the larger run
(5 positions x 46,080 neurons x 4 bytes x 2 per example); streaming adds almost nothing.
Figures: docs/benchmarks.md.

glibc's malloc keeps freed blocks and raises its mmap threshold as it goes, so with its defaults
the same run's peak RSS varied by 70 MiB (1223 to 1293 MiB) and CI once saw 119 MiB between the
two runs. A fixed mmap threshold hands large blocks back to the system when they are freed, so
peak RSS follows the memory in use: nine runs of each size peaked between 1087 and 1091 MiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "fixtures" / "sva" / "nounpp.jsonl"
MEASURE = """
import json, resource, sys
from pathlib import Path
from circuit_tests.attribution import trace
from circuit_tests.data import read_jsonl
from circuit_tests.models import load_model
examples = read_jsonl(Path(sys.argv[1]))[: int(sys.argv[2])]
scores, data = trace(load_model("smollm2-135m-instruct"), examples, batch_size=32)
print(json.dumps({"examples": data.n_examples, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def peak(n_examples: int) -> dict:
    env = {**os.environ, **ALLOCATOR}
    run = subprocess.run([sys.executable, "-c", MEASURE, str(DATA), str(n_examples)], capture_output=True, text=True, check=True, env=env)
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read in KiB (ru_maxrss) with glibc's malloc settings")
def test_peak_memory_does_not_grow_with_the_number_of_examples():
    small, large = peak(64), peak(300)
    assert large["examples"] - small["examples"] > 200
    print(f"peak RSS: {small['peak_mib']:.0f} MiB for {small['examples']} examples, {large['peak_mib']:.0f} MiB for {large['examples']}")
    assert large["peak_mib"] - small["peak_mib"] < 100
