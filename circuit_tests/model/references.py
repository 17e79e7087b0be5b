"""Model names: what a name refers to (a registered model, a .gguf file, a directory, a hub id), and who may run its code.

:func:`parse_model_ref` decides which, without loading anything. A name that exists as a
directory (relative to ``base``: a spec's own directory, or the current directory) is that
directory; a name that looks like a path and exists nowhere is an error, never a hub id. A model
named in a spec (``project`` given) is pull-request input: a directory or ``.gguf`` must resolve
inside the project. Only the person running the suite allows a model to run code shipped with its
checkpoint (:func:`check_trusted`, :func:`remote_code_allowed`), and never a directory inside the project.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from circuit_tests.errors import BadCheckpointError, BadOptionError, ModelOutsideProjectError, UnknownModelError
from circuit_tests.files import file_kind, mode_of, resolved
from circuit_tests.model.registry import REGISTRY
from circuit_tests.text import has_control, quoted, shown

TRUST_OPTION = "--circuit-trust-remote-code"


_HUB_ID = re.compile(r"([A-Za-z0-9][\w.\-]*/[\w.\-]+)(?:@([\w.\-/]+))?")


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
    named = quoted(name)
    if not isinstance(name, str) or not name.strip() or has_control(name) or len(name) > 1000:
        raise UnknownModelError(f"Model name {named} is not usable: a model name is one line of printable text. "
                                + _NAMING_HELP)
    if name in REGISTRY:
        return ModelRef(name, "registered", name, project=_absolute(project))
    base_dir = Path(base).absolute() if base is not None else Path.cwd()
    try:
        path = _join(base_dir, name)
    except (RuntimeError, OSError, ValueError):  # "~user" with no such user
        raise UnknownModelError(f"Model {named}: cannot expand the home directory in this path. " + _NAMING_HELP) from None
    fields = dict(base=str(base_dir), project=_absolute(project))
    if name.endswith(".gguf"):
        mode = mode_of(path)
        if mode is None:
            raise UnknownModelError(f"Model {named}: no such file {shown(path)}. Check the path of the .gguf file.")
        real = contained(name, path, project)
        if not stat.S_ISREG(mode):
            raise BadCheckpointError(f"Model {named}: {shown(path)} is {file_kind(mode)}, not a .gguf file.")
        return ModelRef(name, "gguf", str(real), **fields)
    mode = mode_of(path)
    if mode is not None and stat.S_ISDIR(mode):
        real = contained(name, path, project)
        return ModelRef(name, "local", str(real), **fields)
    if mode is not None:
        raise UnknownModelError(
            f"Model {named}: {shown(path)} is {file_kind(mode)}, not a checkpoint directory or a .gguf file. Name the "
            "directory that holds config.json and the weights (a save_pretrained directory).")
    if _looks_like_path(name):
        raise UnknownModelError(
            f"Model {named}: no such directory {shown(path)}. Check the path; a local checkpoint is a "
            "save_pretrained directory holding config.json and the weights.")
    match = _HUB_ID.fullmatch(name)
    if match is None:
        raise UnknownModelError(f"Unknown model {named}, and no directory {shown(path)} exists. " + _NAMING_HELP)
    repo, revision = match.groups()
    problem = _hub_id_problem(repo, revision)
    if problem:
        raise UnknownModelError(f"Model {named} is not a valid Hugging Face id ({problem}), and no directory "
                                f"{shown(path)} exists. " + _NAMING_HELP)
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


def contained(name: str, path: Path, project: Path | None) -> Path:
    """``path`` with links resolved; for a model named in a spec, it must lie inside ``project``."""
    real = resolved(path)
    if project is None:
        return real
    root = resolved(Path(project))
    if real is None or not real.is_relative_to(root):
        link = f" (a link to {shown(real)})" if real is not None and real != path.absolute() else ""
        raise ModelOutsideProjectError(
            f"Model {quoted(name)} in a spec names {shown(path)}{link}, outside the project {shown(root)}. A spec may "
            "only name checkpoints inside the project, so that a pull request cannot make the run read other files; "
            "a checkpoint outside the project is named on the command line instead: --circuit-model=PATH.")
    return real


def check_trusted(allowed: Sequence[str], project: Path, base: Path | None = None) -> tuple[str, ...]:
    """The ``--circuit-trust-remote-code`` entries, checked once at start-up; a bad one is :class:`BadOptionError`.

    An entry of the form ``org/model`` or ``org/model@revision`` (not path-like, see
    :func:`parse_model_ref`) is a hub id. Any other entry is a directory (relative to ``base``,
    default the current directory) that must exist and lie outside ``project``: a pull request
    can change what is inside the project, so its code is never run.
    """
    for entry in allowed:
        option = f"{TRUST_OPTION}={quoted(entry)}"
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
        root = resolved(Path(project))
        if root is not None and directory.is_relative_to(root):
            raise BadOptionError(
                f"{option} names {shown(directory)}, a directory inside the project {shown(root)}. A pull request can "
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
            location = resolved(Path(ref.location))
            root = resolved(Path(project)) if project is not None else None
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
    mode = mode_of(path)
    return resolved(path) if mode is not None and stat.S_ISDIR(mode) else None


def _absolute(path: Path | None) -> str | None:
    return None if path is None else str(Path(path).absolute())
