"""What a checkpoint's content fingerprint costs: the key of the trace and measurement cache, taken once per loaded model.

Times :func:`circuit_tests.model.fingerprints.fingerprint` over SmolLM2-135M-Instruct's converted checkpoint in the
cache (float32 safetensors, config, tokenizer: 514 MiB). ``pytest tests/benchmarks/test_fingerprint_speed.py
--benchmark-enable``; figures in docs/benchmarks.md, with an 8B-sized checkpoint's (``ci/fingerprint_benchmark.py``).
"""

from __future__ import annotations

import pytest

from circuit_tests.model.fingerprints import fingerprint
from circuit_tests.model.loading import cache_dir, checkpoint_dir
from circuit_tests.model.references import parse_model_ref

pytestmark = pytest.mark.slow


@pytest.mark.benchmark(group="fingerprint-smollm2-cpu")
def test_fingerprint_of_smollm2(benchmark):
    directory = checkpoint_dir(parse_model_ref("smollm2-135m-instruct"))
    digest = benchmark.pedantic(fingerprint, (directory, [cache_dir()]), rounds=5, iterations=1)
    assert len(digest) == 64 and digest == fingerprint(directory, [cache_dir()])
