"""The trace and measurement cache is keyed by the content of a checkpoint, never by names, sizes or times.

Each edit here keeps the file's size and puts its modification time back (``os.utime``), which is
what a cache keyed by name, size and time could not see: two embedding rows swapped in
``model.safetensors``, ``rms_norm_eps`` in ``config.json``, two token ids in ``tokenizer.json``.
The GGUF conversions in the cache are named by the GGUF's content the same way, and the key holds
the content of circuit-tests' own source.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from circuit_tests.errors import BadCheckpointError
from circuit_tests.model import loading as models
from circuit_tests.model.fingerprints import fingerprint
from circuit_tests.model.loading import load_model
from circuit_tests.model.registry import RegisteredModel, assembled
from circuit_tests.spec import traces
from circuit_tests.spec.traces import TraceCache, source_digest
from circuit_tests.testing import save_tiny_checkpoint, tiny_tokenizer

pytest_plugins = ["pytester"]

GOOD_SEED = 2  # a tiny Llama that prefers " is" after "The author" and " are" after "The authors" (test_bad_checkpoints)


def _keeping_size_and_time(path: Path, edit: Callable[[Path], None]) -> None:
    """``edit`` the file at ``path``, then check it kept its size and give it back its access and modification times."""
    before = path.stat()
    edit(path)
    assert path.stat().st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns


def _swap_embedding_rows(path: Path) -> None:
    """Swap the input embeddings of ``author`` and ``authors``: the model reads each as the other."""
    ids = tiny_tokenizer().convert_tokens_to_ids(["author", "authors"])
    tensors = load_file(path)
    rows = tensors["model.embed_tokens.weight"]
    rows[ids] = rows[ids[::-1]].clone()
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_rms_norm_eps(path: Path) -> None:
    path.write_text(path.read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-02'))


def _swap_token_ids(path: Path) -> None:
    """``author`` and ``authors`` trade ids in tokenizer.json (12 and 13: the same number of digits)."""
    swapped = {"12": "13", "13": "12"}
    text = re.sub(r'"(authors?)": (1[23])\b', lambda m: f'"{m[1]}": {swapped[m[2]]}', path.read_text())
    assert text != path.read_text()
    path.write_text(text)


EDITS = {
    "two embedding rows swapped": ("model.safetensors", _swap_embedding_rows),
    "rms_norm_eps edited": ("config.json", _edit_rms_norm_eps),
    "two token ids swapped": ("tokenizer.json", _swap_token_ids),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", seed=GOOD_SEED, taught=True)


@pytest.fixture
def ckpt(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "ckpt"))


def _next_token_logits(ckpt: Path, cache: TraceCache, runs: list) -> torch.Tensor:
    """The last position's logits after "The author", through the measurement cache; ``runs`` counts forward passes."""
    loaded = load_model(str(ckpt))

    def compute() -> dict[str, torch.Tensor]:
        runs.append(1)
        ids = loaded.tokenizer("The author", return_tensors="pt").input_ids
        with torch.no_grad():
            return {"logits": loaded.model(ids).logits[0, -1:].T.contiguous()}

    return cache.measured(loaded, {"measure": "next token"}, {"logits"}, compute, 1)["logits"]


@pytest.mark.parametrize("change", EDITS)
def test_a_checkpoint_edited_with_its_size_and_time_kept_misses_the_cache(ckpt, tmp_path, change):
    cache, runs = TraceCache(tmp_path / "traces"), []
    before = _next_token_logits(ckpt, cache, runs)
    name, edit = EDITS[change]
    _keeping_size_and_time(ckpt / name, edit)
    after = _next_token_logits(ckpt, cache, runs)
    assert len(runs) == 2 and not torch.equal(before, after)


def test_an_unchanged_checkpoint_hits_the_cache_with_no_forward_pass(ckpt, tmp_path):
    cache, runs = TraceCache(tmp_path / "traces"), []
    before = _next_token_logits(ckpt, cache, runs)
    assert torch.equal(_next_token_logits(ckpt, cache, runs), before) and len(runs) == 1
    copied = Path(shutil.copytree(ckpt, tmp_path / "elsewhere"))  # new times, another name: the same content
    assert torch.equal(_next_token_logits(copied, cache, runs), before) and len(runs) == 1


def test_a_change_to_circuit_tests_own_code_misses_the_cache(ckpt, tmp_path, monkeypatch):
    """Its version stays 0.1.0 while its code changes: the key holds the content of its source."""
    package = Path(shutil.copytree(Path(traces.__file__).parent.parent, tmp_path / "circuit_tests"))
    first = source_digest(package)
    measures = package / "analysis" / "measures.py"
    _keeping_size_and_time(measures, lambda path: path.write_text(path.read_text().replace("def ", "def_", 1)))
    assert source_digest(package) != first
    cache, runs = TraceCache(tmp_path / "traces"), []
    _next_token_logits(ckpt, cache, runs)
    monkeypatch.setattr(traces, "_library_source", lambda: "other code")
    _next_token_logits(ckpt, cache, runs)
    assert len(runs) == 2


def test_the_fingerprint_is_the_files_content_and_names(ckpt, tmp_path):
    first = fingerprint(ckpt, [ckpt])
    assert first == fingerprint(Path(shutil.copytree(ckpt, tmp_path / "copy")), None)  # content, not where it lies
    (ckpt / "generation_config.json").rename(ckpt / "generation_config.jsonx")
    assert fingerprint(ckpt, [ckpt]) != first  # names count
    (ckpt / "generation_config.jsonx").rename(ckpt / "generation_config.json")
    assert fingerprint(ckpt, [ckpt]) == first


def test_the_fingerprint_hashes_what_transformers_reads_and_no_other_directory(ckpt):
    first = fingerprint(ckpt, [ckpt])
    (ckpt / "checkpoint-500").mkdir()
    (ckpt / "checkpoint-500" / "model.safetensors").write_bytes(b"an earlier step of the run")
    assert fingerprint(ckpt, [ckpt]) == first
    (ckpt / "additional_chat_templates").mkdir()
    (ckpt / "additional_chat_templates" / "tools.jinja").write_text("{{ messages }}")
    with_template = fingerprint(ckpt, [ckpt])
    assert with_template != first
    (ckpt / "weights").mkdir()
    (ckpt / "weights" / "shard.safetensors").write_bytes(b"one")
    assert fingerprint(ckpt, [ckpt]) == with_template
    with_shard = fingerprint(ckpt, [ckpt], ["weights/shard.safetensors"])
    assert with_shard != with_template
    (ckpt / "weights" / "shard.safetensors").write_bytes(b"two")
    assert fingerprint(ckpt, [ckpt], ["weights/shard.safetensors"]) != with_shard


def test_the_fingerprint_reads_no_link_out_of_its_roots_and_no_fifo(ckpt, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    (ckpt / "notes.txt").symlink_to(secret)
    with pytest.raises(BadCheckpointError, match=r"notes.txt \(a link to .*secret.txt\) is outside") as error:
        fingerprint(ckpt, [ckpt], who="Model 'ckpt'")
    assert "TOP-SECRET" not in str(error.value) and "\n" not in str(error.value)
    (ckpt / "notes.txt").unlink()
    (ckpt / "additional_chat_templates").mkdir()
    os.mkfifo(ckpt / "additional_chat_templates" / "pipe.jinja")
    with pytest.raises(BadCheckpointError, match="pipe.jinja is a FIFO, not a regular file"):
        fingerprint(ckpt, [ckpt])


def test_a_local_checkpoint_revision_comes_from_its_content(ckpt):
    loaded = load_model(str(ckpt))
    assert loaded.fingerprint == fingerprint(ckpt, None) and loaded.revision == loaded.fingerprint[:16]
    _keeping_size_and_time(ckpt / "config.json", _edit_rms_norm_eps)
    assert load_model(str(ckpt)).revision != loaded.revision


def test_a_gguf_is_converted_again_when_its_content_changes_with_size_and_time_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    converted = []
    monkeypatch.setattr(models, "convert_gguf", lambda gguf, target: converted.append(target) or target)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF one")
    first = models.checkpoint_dir(models.parse_model_ref(str(gguf)))
    _keeping_size_and_time(gguf, lambda path: path.write_bytes(b"GGUF two"))
    second = models.checkpoint_dir(models.parse_model_ref(str(gguf)))
    assert first != second and converted == [first, second]
    gguf.write_bytes(b"GGUF one")
    assert models.checkpoint_dir(models.parse_model_ref(str(gguf))) == first


def test_a_registered_model_is_converted_again_when_its_package_ships_other_weights(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    parts = [tmp_path / "model.gguf.part00", tmp_path / "model.gguf.part01"]
    for part in parts:
        part.write_bytes(b"GGUF half")
    monkeypatch.setitem(models.REGISTRY, "tiny", RegisteredModel("tiny", "a test", ("tiny==1",), lambda: parts))
    first = models.registered_checkpoint("tiny")
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("tiny-")
    _keeping_size_and_time(parts[1], lambda path: path.write_bytes(b"GGUF HALF"))
    assert models.registered_checkpoint("tiny") != first
    parts[1].write_bytes(b"GGUF half")
    assert models.registered_checkpoint("tiny") == first
    assert assembled(parts, tmp_path).read_bytes() == b"GGUF halfGGUF half"
    parts[1].unlink()
    with pytest.raises(BadCheckpointError, match=r"the installed package that ships it is damaged \(.*part01 does not exist\); "
                                                 "reinstall its package: `circuit-tests fetch tiny`"):
        models.registered_checkpoint("tiny")


# --------------------------------------------------------------------------- end to end, in a pytest run

AUTHOR_PAIRS = "".join(  # every pair turns on author/authors, which the edit below swaps
    f'    - {{clean_prefix: "The {a} {prep} the {obj}", patch_prefix: "The {b} {prep} the {obj}", clean_answer: "{x}", '
    f'patch_answer: "{y}"}}\n'
    for prep in ("near", "by", "of", "on") for obj in ("key", "cabinets")
    for a, b, x, y in (("author", "authors", " is", " are"), ("authors", "author", " are", " is")))
SPEC = f"name: x\nmodels: [./ckpt]\ntask:\n  test_fraction: 0.5\n  examples:\n{AUTHOR_PAIRS}expect:\n  - behaves: {{min_accuracy: 0.6}}\n"


def test_a_spec_fails_when_its_checkpoint_changes_with_size_and_time_kept(pytester, tiny, tmp_path, monkeypatch):
    """The pull request of issue 32: a re-run on a runner that keeps its cache judges the new weights, not the cached ones."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    shutil.copytree(tiny, pytester.path / "ckpt")
    pytester.path.joinpath("circuit_x.yaml").write_text(SPEC)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    _keeping_size_and_time(pytester.path / "ckpt" / "model.safetensors", _swap_embedding_rows)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*accuracy*"])
    pytester.runpytest("-p", "no:cacheprovider", "--circuit-no-cache").assert_outcomes(failed=1)
