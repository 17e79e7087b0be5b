"""Checkpoints that exist but cannot be used, code a checkpoint ships, and hub ids read from a fake Hugging Face cache.

Every failure is one short paragraph of the right class (never a library's traceback), and no Python file of a
checkpoint is ever imported unless remote code was allowed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import transformers

from circuit_tests.errors import (
    BadCheckpointError,
    CircuitTestsError,
    ModelNotAvailableError,
    ModelOutsideProjectError,
    UnknownModelError,
)
from circuit_tests.model import loading as models
from circuit_tests.model.loading import LoadOptions, load_model
from circuit_tests.model.references import ModelRef, parse_model_ref
from circuit_tests.testing import save_tiny_checkpoint, tiny_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def one_paragraph(error: BaseException, limit: int = 600) -> str:
    """The message of a user-facing error: one short paragraph, no traceback (each path counted as one word,
    so that the temporary folder's depth does not count)."""
    message = str(error)
    assert isinstance(error, CircuitTestsError)
    assert "\n" not in message and "Traceback" not in message and len(re.sub(r"/[^\s']+", "/PATH", message)) < limit, message
    return message


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny Llama with the tiny tokenizer, copied by each test that damages it."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture
def copy(tiny, tmp_path):
    def make(name: str = "ckpt") -> Path:
        return Path(shutil.copytree(tiny, tmp_path / name))

    return make


@pytest.fixture(autouse=True)
def own_caches(tmp_path, monkeypatch):
    """Conversions and hub lookups go to this test's own directories; nothing is downloaded."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "circuit-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.delenv(models.ALLOW_DOWNLOAD_ENV, raising=False)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- directories that are not checkpoints


def test_an_empty_directory_is_a_bad_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadCheckpointError) as error:
        load_model(str(tmp_path / "empty"))
    message = one_paragraph(error.value)
    assert "has no config.json" in message and "it is empty" in message


def test_a_directory_of_other_files_lists_what_it_holds(tmp_path):
    (tmp_path / "run").mkdir()
    for name in ("events.out", "train.log"):
        (tmp_path / "run" / name).write_text("x")
    with pytest.raises(BadCheckpointError, match="has no config.json.*it holds events.out, train.log"):
        load_model(str(tmp_path / "run"))


@pytest.mark.parametrize("text, words", [
    ("{not json", "is not JSON"),
    ("[1, 2, 3]", "holds a JSON list, not an object"),
    ('"llama"', "holds a JSON string"),
    ("\xff\xfe", "not UTF-8"),
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
])
def test_a_config_that_is_not_a_json_object(copy, text, words):
    ckpt = copy()
    (ckpt / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(BadCheckpointError) as error:
        load_model(str(ckpt))
    assert words in one_paragraph(error.value)


def test_a_huge_config_is_not_read(copy):
    ckpt = copy()
    with (ckpt / "config.json").open("ab") as handle:
        handle.truncate(5 * 1024 * 1024)
    with pytest.raises(BadCheckpointError, match="more than the 4.0 MiB allowed"):
        load_model(str(ckpt))


def test_a_config_without_or_with_an_unknown_model_type(copy):
    ckpt = copy()
    config = json.loads((ckpt / "config.json").read_text())
    del config["model_type"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadCheckpointError, match="has no model_type"):
        load_model(str(ckpt))
    _edit_json(ckpt / "config.json", model_type="llama-9000")
    with pytest.raises(BadCheckpointError) as error:
        load_model(str(ckpt))
    assert "model_type 'llama-9000', which transformers" in one_paragraph(error.value)


def test_garbage_safetensors(copy):
    ckpt = copy()
    (ckpt / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    with pytest.raises(BadCheckpointError) as error:
        load_model(str(ckpt))
    message = one_paragraph(error.value)
    assert "could not load the model" in message and "SafetensorError" in message and "save_pretrained" in message


def test_a_checkpoint_without_weights(copy):
    ckpt = copy()
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(BadCheckpointError, match="could not load the model"):
        load_model(str(ckpt))


def test_a_shard_index_pointing_out_of_the_checkpoint(copy):
    ckpt = copy()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../../secret.safetensors"}}))
    with pytest.raises(BadCheckpointError, match="weight_map of files inside the checkpoint"):
        load_model(str(ckpt))


def test_a_tokenizer_bigger_than_the_embedding(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "small", vocab_size=8)
    with pytest.raises(BadCheckpointError) as error:
        load_model(str(ckpt))
    message = one_paragraph(error.value)
    assert f"tokenizer has {len(tiny_tokenizer())} tokens" in message and "embedding has 8 rows" in message


def test_a_fifo_in_a_checkpoint_is_refused_before_anything_reads_it(copy):
    ckpt = copy()
    (ckpt / "tokenizer.json").unlink()
    os.mkfifo(ckpt / "tokenizer.json")
    with pytest.raises(BadCheckpointError) as error:
        load_model(str(ckpt))
    assert "is a FIFO, not a regular file" in one_paragraph(error.value)


# --------------------------------------------------------------------------- GGUF files


def test_a_missing_gguf_is_unknown(tmp_path):
    with pytest.raises(UnknownModelError) as error:
        load_model(str(tmp_path / "model.gguf"))
    assert "no such file" in one_paragraph(error.value)


@pytest.mark.parametrize("content", [b"garbage" * 100, b"GGUF\x03\x00\x00\x00" + b"\xff" * 64, b""])
def test_a_garbage_gguf_is_a_bad_checkpoint(tmp_path, content):
    (tmp_path / "model.gguf").write_bytes(content)
    with pytest.raises(BadCheckpointError) as error:
        load_model(str(tmp_path / "model.gguf"))
    assert "could not be read as a GGUF model" in one_paragraph(error.value)
    assert not list((tmp_path / "circuit-cache" / "gguf").glob("model-*/config.json"))


def test_a_gguf_that_is_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "model.gguf")
    with pytest.raises(BadCheckpointError, match="is a FIFO, not a .gguf file"):
        parse_model_ref("model.gguf", base=tmp_path)


def test_a_gguf_is_converted_in_a_directory_of_its_own(tmp_path, monkeypatch):
    """Files beside the GGUF (a tokenizer_config.json with an auto_map) are never read by the conversion."""
    seen = []
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained",
                        lambda path, **kwargs: seen.append((sorted(os.listdir(path)), kwargs)) or 1 / 0)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["x.Y", null]}}')
    with pytest.raises(BadCheckpointError, match="ZeroDivisionError"):
        load_model(str(tmp_path / "model.gguf"))
    assert seen == [(["model.gguf"], {"gguf_file": "model.gguf", "trust_remote_code": False, "local_files_only": True})]
    (tmp_path / "model.gguf").write_bytes(b"junk")
    monkeypatch.undo()
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "circuit-cache"))
    with pytest.raises(BadCheckpointError) as error:
        load_model(str(tmp_path / "model.gguf"))
    assert f"ValueError: {tmp_path / 'model.gguf'} does not start with the GGUF magic bytes" in one_paragraph(error.value)


# --------------------------------------------------------------------------- code shipped with a checkpoint


def _ship_code(ckpt: Path, marker: Path, model_type: str) -> None:
    """Python files that write ``marker`` when imported, and the auto_map entries that point transformers at them."""
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (ckpt / f"{module}.py").write_text(
            f"import pathlib\npathlib.Path({str(marker)!r}).write_text('imported {module}')\n"
            "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
            "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
            "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
            "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    _edit_json(ckpt / "config.json", model_type=model_type, auto_map={
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    _edit_json(ckpt / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})


def test_an_unknown_architecture_with_code_is_refused_without_running_it(copy, tmp_path):
    ckpt, marker = copy(), tmp_path / "marker"
    _ship_code(ckpt, marker, "evil")
    with pytest.raises(BadCheckpointError) as error:
        load_model(str(ckpt))
    message = one_paragraph(error.value)
    assert "config.json" in message and "auto_map" in message and "model_type 'evil'" in message
    assert f"--circuit-trust-remote-code={ckpt}" in message
    assert not marker.exists()


def test_a_known_architecture_with_code_loads_the_built_in_class(copy, tmp_path):
    ckpt, marker = copy(), tmp_path / "marker"
    _ship_code(ckpt, marker, "llama")
    loaded = load_model(str(ckpt))
    assert type(loaded.model) is transformers.LlamaForCausalLM
    assert type(loaded.tokenizer).__module__.startswith("transformers.")
    assert not marker.exists()


def test_a_tokenizer_that_needs_its_code_is_refused_by_name(copy, tmp_path):
    ckpt, marker = copy(), tmp_path / "marker"
    _ship_code(ckpt, marker, "llama")
    _edit_json(ckpt / "tokenizer_config.json", tokenizer_class="EvilTokenizer")
    _edit_json(ckpt / "config.json", auto_map={})
    with pytest.raises(BadCheckpointError) as error:
        load_model(str(ckpt))
    message = one_paragraph(error.value)
    assert "tokenizer_config.json declares a tokenizer class" in message and "auto_map" in message
    assert "--circuit-trust-remote-code=" in message
    assert not marker.exists()


def test_a_spec_named_checkpoint_never_runs_code_even_when_asked(copy, tmp_path):
    ckpt, marker = copy(), tmp_path / "marker"
    _ship_code(ckpt, marker, "evil")
    ref = parse_model_ref("ckpt", base=tmp_path, project=tmp_path)
    with pytest.raises(BadCheckpointError) as error:
        load_model(ref, LoadOptions(trust_remote_code=True))
    assert "never runs" in one_paragraph(error.value)
    assert not marker.exists()


def test_allowed_remote_code_does_run(copy, tmp_path, monkeypatch):
    """The control: with remote code allowed, transformers imports the shipped files, so the marker is a real probe."""
    ckpt, marker = copy(), tmp_path / "marker"
    _ship_code(ckpt, marker, "evil")
    monkeypatch.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        try:
            load_model(str(ckpt), LoadOptions(trust_remote_code=True))
        except BadCheckpointError:
            pass  # what happens after the import does not matter here
        assert marker.exists()
    finally:
        for name in [name for name in sys.modules if name.startswith("transformers_modules")]:
            del sys.modules[name]


# --------------------------------------------------------------------------- checkpoints named in a spec


def test_a_spec_named_checkpoint_with_a_link_out_of_the_project(tiny, tmp_path):
    project = tmp_path / "project"
    ckpt = Path(shutil.copytree(tiny, project / "ckpt"))
    secret = tmp_path / "secret.json"  # a file whose text would end up in the tokenizer's vocabulary
    secret.write_text((ckpt / "tokenizer.json").read_text().replace('"bakers"', '"TOP-SECRET"'))
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "tokenizer.json").symlink_to(secret)
    ref = parse_model_ref("ckpt", base=project, project=project)
    with pytest.raises(BadCheckpointError) as error:
        load_model(ref)
    message = one_paragraph(error.value)
    assert "tokenizer.json is a link to" in message and "outside the project" in message
    assert "TOP-SECRET" not in message
    # Named on the command line, the runner's own choice, the link is followed: this is what the check prevents.
    assert "TOP-SECRET" in load_model(parse_model_ref("ckpt", base=project)).tokenizer.get_vocab()


def test_a_spec_named_checkpoint_with_links_inside_the_project_loads(tiny, tmp_path):
    project = tmp_path / "project"
    ckpt = Path(shutil.copytree(tiny, project / "ckpt"))
    (project / "shared").mkdir()
    (ckpt / "tokenizer.json").rename(project / "shared" / "tokenizer.json")
    (ckpt / "tokenizer.json").symlink_to(project / "shared" / "tokenizer.json")
    (ckpt / "templates").symlink_to(project / "shared")
    assert load_model(parse_model_ref("ckpt", base=project, project=project)).model is not None


def test_a_spec_named_checkpoint_with_a_linked_directory_out_of_the_project(tiny, tmp_path):
    project = tmp_path / "project"
    ckpt = Path(shutil.copytree(tiny, project / "ckpt"))
    (ckpt / "additional_chat_templates").symlink_to(tmp_path)
    with pytest.raises(BadCheckpointError, match="additional_chat_templates is a link to .* outside the project"):
        load_model(parse_model_ref("ckpt", base=project, project=project))


def test_a_spec_named_checkpoint_outside_the_project(tiny, tmp_path):
    (tmp_path / "project").mkdir()
    with pytest.raises(ModelOutsideProjectError) as error:
        parse_model_ref(str(tiny), base=tmp_path / "project", project=tmp_path / "project")
    assert "--circuit-model=PATH" in one_paragraph(error.value)


# --------------------------------------------------------------------------- hub ids from a fake Hugging Face cache


def _fake_hub(cache: Path, repo: str, commit: str = COMMIT, branch: str | None = "main", **overrides) -> Path:
    """``repo`` in a Hugging Face cache laid out as huggingface_hub writes it: snapshot files link to blobs."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    staged = save_tiny_checkpoint(repo_dir / "staging", **overrides)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    for file in staged.iterdir():
        blob = repo_dir / "blobs" / f"{commit[:8]}-{file.name}"
        file.rename(blob)
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / blob.name)
    staged.rmdir()
    if branch:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / branch).write_text(commit)
    return snapshot


def test_a_hub_id_loads_from_its_cached_snapshot_with_the_commit_as_revision(tmp_path):
    snapshot = _fake_hub(tmp_path / "hf-hub", "org/tiny")
    for name in ("org/tiny", "org/tiny@main", f"org/tiny@{COMMIT}"):
        loaded = load_model(parse_model_ref(name, base=tmp_path))
        assert loaded.path == snapshot and loaded.commit == COMMIT and loaded.revision == COMMIT
        assert loaded.ref.name == name and loaded.model.config.num_hidden_layers == 3


def test_a_branch_not_in_the_cache_is_not_available(tmp_path):
    _fake_hub(tmp_path / "hf-hub", "org/tiny")
    with pytest.raises(ModelNotAvailableError) as error:
        load_model(parse_model_ref("org/tiny@v2", base=tmp_path))
    message = one_paragraph(error.value)
    assert "no snapshot of org/tiny at v2" in message and "hf download org/tiny --revision v2" in message


def test_a_directory_named_like_the_hub_id_in_the_current_directory_is_never_read(tmp_path, monkeypatch):
    """transformers would read ./org/tiny for the bare id "org/tiny": it is given the snapshot's absolute path instead."""
    snapshot = _fake_hub(tmp_path / "hf-hub", "org/tiny")
    decoy = save_tiny_checkpoint(tmp_path / "cwd" / "org" / "tiny", num_hidden_layers=2)
    marker = tmp_path / "marker"
    _ship_code(decoy, marker, "evil")
    monkeypatch.chdir(tmp_path / "cwd")
    (tmp_path / "specs").mkdir()
    ref = parse_model_ref("org/tiny", base=tmp_path / "specs")  # a spec elsewhere names the hub id
    assert ref.kind == "hub"
    loaded = load_model(ref)
    assert loaded.path == snapshot and loaded.model.config.num_hidden_layers == 3 and not marker.exists()
    # A hand-built ref (no base) is read from the cache too.
    assert load_model(ModelRef("org/tiny", "hub", "org/tiny")).path == snapshot


def test_a_hub_snapshot_with_code_is_refused_with_the_hub_id_to_allow(tmp_path):
    snapshot = _fake_hub(tmp_path / "hf-hub", "org/evil")
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").write_text(json.dumps({**config, "model_type": "evil", "auto_map": {"AutoConfig": "x.Y"}}))
    with pytest.raises(BadCheckpointError) as error:
        load_model(parse_model_ref("org/evil@main", base=tmp_path))
    assert "--circuit-trust-remote-code=org/evil@main" in one_paragraph(error.value)


def test_downloads_fetch_no_code_and_no_pickle(tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, revision=None, cache_dir=None, allow_patterns=None):
        calls.append((repo_id, revision, Path(cache_dir), allow_patterns))
        return str(_fake_hub(Path(cache_dir), repo_id, branch=None))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setenv(models.ALLOW_DOWNLOAD_ENV, "1")
    loaded = load_model(parse_model_ref("org/fresh", base=tmp_path))
    assert loaded.commit == COMMIT
    [(repo, revision, cache, patterns)] = calls
    assert (repo, revision, cache) == ("org/fresh", None, tmp_path / "hf-hub")
    assert "*.safetensors" in patterns and "config.json" in patterns
    assert not any(p.endswith((".py", ".bin", ".pt", ".pth", ".pkl", "*")) or p == "*" for p in patterns)
