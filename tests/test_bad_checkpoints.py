"""Bad checkpoints in one pytest session: each fails its own item with a clear message, no traceback,
and a good checkpoint beside them still passes.

The checkpoints are tiny models with the tiny tokenizer (no real weights needed), inside the
pytester project and named in the spec relative to it, as a pull request would bring them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from circuit_tests.testing import save_tiny_checkpoint, tiny_model, tiny_tokenizer

pytest_plugins = ["pytester"]

EXAMPLES = "".join(f'    - {{clean_prefix: "The {noun}", patch_prefix: "The {noun}s", clean_answer: " was", patch_answer: " were"}}\n'
                   f'    - {{clean_prefix: "The {noun}s", patch_prefix: "The {noun}", clean_answer: " were", patch_answer: " was"}}\n'
                   for noun in ("author", "baker", "farmer", "doctor", "pilot"))
GOOD_SEED = 2  # the good checkpoints are taught the agreement task (save_tiny_checkpoint(taught=True)) from this seed


def _spec(pytester: pytest.Pytester, models: list[str]) -> None:
    pytester.path.joinpath("circuit_x.yaml").write_text(
        f"name: x\nmodels: [{', '.join(models)}]\ntask:\n  test_fraction: 0.5\n  examples:\n{EXAMPLES}expect:\n  - behaves: {{min_accuracy: 0.6}}\n")


def _write_checkpoints(root: Path, marker: Path) -> None:
    """good, nan (one NaN weight), pickle (pytorch_model.bin only), bloom (an architecture without known neurons),
    empty, notjson (config.json is not JSON), small (tokenizer bigger than the embedding), evil (ships code)."""
    tokenizer = tiny_tokenizer()
    save_tiny_checkpoint(root / "good", seed=GOOD_SEED, taught=True)
    nan = tiny_model("llama")
    with torch.no_grad():
        nan.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    nan.save_pretrained(root / "nan")
    nan.config.save_pretrained(root / "pickle")
    torch.save(tiny_model("llama").state_dict(), root / "pickle" / "pytorch_model.bin")
    BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=len(tokenizer))).save_pretrained(root / "bloom")
    for name in ("nan", "pickle", "bloom"):
        tokenizer.save_pretrained(root / name)
    (root / "empty").mkdir()
    save_tiny_checkpoint(root / "notjson")
    (root / "notjson" / "config.json").write_text("{not json")
    save_tiny_checkpoint(root / "small", vocab_size=8)
    save_tiny_checkpoint(root / "evil")
    (root / "evil" / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    config = json.loads((root / "evil" / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "modeling_evil.C", "AutoModelForCausalLM": "modeling_evil.M"})
    (root / "evil" / "config.json").write_text(json.dumps(config))


def test_each_bad_checkpoint_fails_alone_with_its_reason(pytester, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.delenv("CIRCUIT_TESTS_ALLOW_DOWNLOAD", raising=False)
    marker = tmp_path / "marker"
    _write_checkpoints(pytester.path / "checkpoints", marker)
    bad = ["nan", "pickle", "bloom", "empty", "notjson", "small", "evil", "missing"]
    _spec(pytester, [f"./checkpoints/{name}" for name in bad] + ["./checkpoints/good", "org/not-in-the-cache"])
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=1, failed=len(bad), skipped=1)
    result.stdout.fnmatch_lines(["*1 weight tensor(s) hold NaN or infinite values (model.layers.1.mlp.up_proj.weight)*"])
    result.stdout.fnmatch_lines(["*holds only pickle weight files*loads safetensors only*"])
    result.stdout.fnmatch_lines(["*BloomForCausalLM*"])
    result.stdout.fnmatch_lines(["*checkpoints/empty has no config.json, so it is not a checkpoint (it is empty)*"])
    result.stdout.fnmatch_lines(["*checkpoints/notjson/config.json is not JSON*"])
    result.stdout.fnmatch_lines(["*its tokenizer has 47 tokens but the model's input embedding has 8 rows*"])
    result.stdout.fnmatch_lines(["*checkpoints/evil/config.json declares model_type 'evil'*auto_map*"])
    result.stdout.fnmatch_lines(["*./checkpoints/missing': no such directory*"])
    result.stdout.fnmatch_lines(["SKIPPED*not in the local Hugging Face cache*no directory 'org/not-in-the-cache' exists in*"])
    result.stdout.no_fnmatch_line("*Traceback*")
    result.stdout.no_fnmatch_line("*INTERNALERROR*")
    result.stdout.no_fnmatch_line("*trust_remote_code=True*")  # transformers' own advice never reaches the user
    assert not marker.exists()


def test_a_spec_cannot_name_checkpoints_outside_the_project(pytester, tmp_path):
    """Needs the plugin to resolve spec models with ``project`` (parse_model_ref(name, spec dir, rootpath))."""
    outside = save_tiny_checkpoint(tmp_path / "outside", seed=GOOD_SEED, taught=True)
    secret = tmp_path / "secret.json"
    inside = save_tiny_checkpoint(pytester.path / "checkpoints" / "linked")
    secret.write_text((inside / "tokenizer.json").read_text().replace('"bakers"', '"TOP-SECRET"'))
    os.remove(inside / "tokenizer.json")
    (inside / "tokenizer.json").symlink_to(secret)
    _spec(pytester, [str(outside), "./checkpoints/linked"])
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([f"*Model '{outside}' in a spec names {outside}*outside the project*--circuit-model=PATH*"])
    result.stdout.fnmatch_lines(["*checkpoints/linked/tokenizer.json is a link to*outside the project*"])
    result.stdout.no_fnmatch_line("*TOP-SECRET*")
    # The runner may still name the outside checkpoint on the command line.
    result = pytester.runpytest("-p", "no:cacheprovider", f"--circuit-model={outside}")
    result.assert_outcomes(passed=1)
