"""Model references, load options, GGUF conversion (locking, atomicity) and offline loading."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from circuit_tests import models
from circuit_tests.errors import BadCheckpointError, ModelNotAvailableError, UnknownModelError
from circuit_tests.models import LoadOptions, ModelCache, convert_gguf, load_model, parse_model_ref
from circuit_tests.tiny import tiny_model


def test_registered_names_parse_as_registered():
    for name in models.REGISTRY:
        assert parse_model_ref(name).kind == "registered"


def test_hub_id_with_revision():
    ref = parse_model_ref("meta-llama/Llama-3.1-8B-Instruct@main")
    assert (ref.kind, ref.location, ref.revision) == ("hub", "meta-llama/Llama-3.1-8B-Instruct", "main")
    assert parse_model_ref("gpt2-org/gpt2").revision is None


def test_local_directory_and_gguf_file(tmp_path: Path):
    assert parse_model_ref(str(tmp_path)).kind == "local"
    assert parse_model_ref(str(tmp_path / "m.gguf")).kind == "gguf"


def test_unknown_name_lists_registered_models():
    with pytest.raises(UnknownModelError) as error:
        parse_model_ref("no-such-model")
    for name in models.REGISTRY:
        assert name in str(error.value)


def test_default_dtype_depends_on_device():
    assert LoadOptions("cpu").torch_dtype() == torch.float32
    assert LoadOptions("cuda").torch_dtype() == torch.bfloat16
    assert LoadOptions("cpu", "bfloat16").torch_dtype() == torch.bfloat16
    with pytest.raises(ValueError, match="Unknown dtype"):
        LoadOptions("cpu", "int3").torch_dtype()


def test_missing_hub_model_is_not_available_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv(models.ALLOW_DOWNLOAD_ENV, raising=False)
    with pytest.raises(ModelNotAvailableError, match="not in the local Hugging Face cache"):
        load_model("circuit-tests/does-not-exist@main")


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="Unknown device"):
        load_model("smollm2-135m-instruct", LoadOptions(device="tpu"))


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama saved as safetensors, with a tokenizer-free directory, and one saved as pickle."""
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny_model("llama")
    model.save_pretrained(root / "safetensors", safe_serialization=True)
    # transformers 5 always writes safetensors, so the pickle checkpoint is written by hand.
    model.config.save_pretrained(root / "pickle")
    torch.save(model.state_dict(), root / "pickle" / "pytorch_model.bin")
    return root


def _load_without_tokenizer(monkeypatch, path: Path, options: LoadOptions = LoadOptions()):
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    return load_model(str(path), options)


def test_local_checkpoint_loads_frozen_in_eval_mode(monkeypatch, local_checkpoint):
    loaded = _load_without_tokenizer(monkeypatch, local_checkpoint / "safetensors")
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.model.dtype == torch.float32
    assert loaded.model.config._attn_implementation == "eager"


def test_pickle_only_checkpoint_needs_explicit_permission(monkeypatch, local_checkpoint):
    with pytest.raises(BadCheckpointError, match="only pickle weight files"):
        _load_without_tokenizer(monkeypatch, local_checkpoint / "pickle")
    loaded = _load_without_tokenizer(monkeypatch, local_checkpoint / "pickle", LoadOptions(allow_pickle=True))
    assert loaded.model.config.model_type == "llama"


def test_model_cache_loads_each_model_once(monkeypatch):
    calls = []
    monkeypatch.setattr(models, "load_model", lambda name, options: calls.append(name) or object())
    cache = ModelCache()
    first = cache.get("a")
    assert cache.get("a") is first
    cache.get("b")
    assert calls == ["a", "b"]


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
