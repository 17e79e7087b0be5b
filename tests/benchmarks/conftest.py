"""What the memory benchmarks share: measuring a script's peak RSS in a fresh process.

glibc's malloc keeps freed blocks and raises its mmap threshold as it goes, so with its defaults
the same run's peak RSS varied by 70 MiB (1223 to 1293 MiB) and CI once saw 119 MiB between two
runs of one size. A fixed mmap threshold hands large blocks back to the system when they are
freed, so peak RSS follows the memory in use: nine runs of each size peaked between 1087 and
1091 MiB. The script prints one JSON line last (``examples``, ``peak_mib``).

The evaluation and attribution benchmarks measure a random Llama of SmolLM2-135M's neuron shape (30 layers x
1536 neurons) around a residual stream 16 wide, saved with SmolLM2's tokenizer: per example, what those stages
would hold (neuron activations, their gradients) is SmolLM2's, for a fraction of its arithmetic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from circuit_tests.model.loading import checkpoint_dir
from circuit_tests.model.references import parse_model_ref
from circuit_tests.testing import tiny_model

ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


@pytest.fixture
def peak_rss() -> Callable[..., dict]:
    """``peak_rss(script, *args)``: the JSON line ``python -c script args...`` prints last, under the fixed allocator."""

    def measure(script: str, *args: object) -> dict:
        command = [sys.executable, "-c", script, *map(str, args)]
        run = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, **ALLOCATOR})
        return json.loads(run.stdout.strip().splitlines()[-1])

    return measure


@pytest.fixture(scope="session")
def smollm2_shaped(tmp_path_factory) -> Path:
    """A checkpoint directory: a random Llama with SmolLM2-135M's layers and neurons, 16 wide, and SmolLM2's tokenizer."""
    smollm2 = checkpoint_dir(parse_model_ref("smollm2-135m-instruct"))
    config, tokenizer = AutoConfig.from_pretrained(smollm2), AutoTokenizer.from_pretrained(smollm2)
    directory = tmp_path_factory.mktemp("smollm2-shaped")
    tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=config.num_hidden_layers, intermediate_size=config.intermediate_size,
               hidden_size=16, num_attention_heads=2, num_key_value_heads=2, head_dim=8).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
