"""Bad checkpoints in one pytest session: each fails its own item with a clear message, no traceback,
and a good checkpoint beside them still passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from circuit_tests.models import load_model
from circuit_tests.tiny import tiny_model

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.slow  # borrows SmolLM2's tokenizer

EXAMPLES = """\
    - {clean_prefix: "The author", patch_prefix: "The authors", clean_answer: " is", patch_answer: " are"}
    - {clean_prefix: "The authors", patch_prefix: "The author", clean_answer: " are", patch_answer: " is"}
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """good/, nan/ (one NaN weight), pickle/ (pytorch_model.bin only), bloom/ (an architecture we do not support)."""
    tokenizer = load_model("smollm2-135m-instruct").tokenizer
    root = tmp_path_factory.mktemp("checkpoints")
    good = tiny_model("llama", vocab_size=len(tokenizer))
    good.save_pretrained(root / "good")
    with torch.no_grad():
        good.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    good.save_pretrained(root / "nan")
    good.config.save_pretrained(root / "pickle")
    torch.save(good.state_dict(), root / "pickle" / "pytorch_model.bin")
    BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=len(tokenizer))).save_pretrained(root / "bloom")
    for name in ("good", "nan", "pickle", "bloom"):
        tokenizer.save_pretrained(root / name)
    return root


def test_each_bad_checkpoint_fails_alone_with_its_reason(pytester, checkpoints):
    models = ", ".join(str(checkpoints / name) for name in ("nan", "pickle", "bloom", "good"))
    pytester.path.joinpath("circuit_x.yaml").write_text(
        f"name: x\nmodels: [{models}]\ntask:\n  examples:\n{EXAMPLES}expect:\n  - behaves: {{min_accuracy: 0.0}}\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines(["*1 weight tensor(s) hold NaN or infinite values (model.layers.1.mlp.up_proj.weight)*"])
    result.stdout.fnmatch_lines(["*holds only pickle weight files*loads safetensors only*"])
    result.stdout.fnmatch_lines(["*BloomForCausalLM*"])
    result.stdout.no_fnmatch_line("*Traceback*")
    result.stdout.no_fnmatch_line("*INTERNALERROR*")
