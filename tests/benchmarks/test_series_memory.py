"""A checkpoint series holds one checkpoint at a time: peak memory does not grow with the series' length.

Each measurement runs in a fresh process (peak RSS, ``ru_maxrss``) that checks a spec (``behaves`` and
``flips``, so every checkpoint is loaded, traced and measured) on the first 2, then all 5 checkpoints of
a series of tiny Llamas widened to 3 x 4096 MLP neurons around a residual stream of 512 (about 100 MiB
of float32 weights each). Holding every checkpoint would add about 300 MiB for the 3 extra ones.
Figures: docs/benchmarks.md; the allocator settings of the measuring process: conftest.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from circuit_tests.testing import save_tiny_checkpoint, tiny_agreement_pairs

CHECKPOINTS = 5
MEASURE = """
import json, resource, sys
from pathlib import Path
from circuit_tests.model.series import expand_series
from circuit_tests.spec.schema import load_spec
from circuit_tests.spec.session import CircuitSession, RunOptions
root, n = Path(sys.argv[1]), int(sys.argv[2])
series = expand_series([str(root / "series" / "step-*")], root)[:n]
session = CircuitSession(RunOptions(project=root, series=series))
spec = load_spec(root / "spec.yaml", root)
verdicts = [session.check(spec, c.name, e, from_command_line=True).status for c in series for e in spec.expectations]
assert "skipped" not in verdicts, verdicts
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"checkpoints": len(series), "held": len(session.models), "peak_mib": peak}))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("series")
    first = save_tiny_checkpoint(root / "series" / "step-0", hidden_size=512, intermediate_size=4096)
    for step in range(1, CHECKPOINTS):
        shutil.copytree(first, root / "series" / f"step-{step}")
    (root / "data.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in tiny_agreement_pairs()))
    (root / "spec.yaml").write_text("name: widened\nmodels: [series/step-0]\ntask: {dataset: data.jsonl, test_fraction: 0.5}\n"
                                    "expect:\n  - behaves: {min_accuracy: 0.6}\n  - flips: {nodes: 5, min_flip_rate: 0.01}\n")
    return root


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS is read in KiB (ru_maxrss) with glibc's malloc settings")
def test_peak_memory_does_not_grow_with_the_length_of_the_series(peak_rss, project):
    short, long = peak_rss(MEASURE, project, 2), peak_rss(MEASURE, project, CHECKPOINTS)
    assert (short["checkpoints"], long["checkpoints"]) == (2, CHECKPOINTS) and short["held"] == long["held"] == 1
    print(f"peak RSS: {short['peak_mib']:.0f} MiB over 2 checkpoints, {long['peak_mib']:.0f} MiB over {CHECKPOINTS}")
    assert long["peak_mib"] - short["peak_mib"] < 100
