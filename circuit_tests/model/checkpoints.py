"""What is checked of a checkpoint before and after transformers reads it.

Before: the directory exists and holds a ``config.json`` (and ``tokenizer_config.json``) that is a
JSON object read within bounds; a checkpoint that would need its own Python code (``auto_map``)
is loaded with transformers' built-in class when there is one and refused otherwise, unless its
code was allowed; shard indexes and tokenizer file lists stay inside the directory; pickle-only
weights are refused; a directory a spec names holds only regular files inside the project.
After: no weight is NaN or infinite, and the tokenizer fits the embedding.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from circuit_tests.errors import BadCheckpointError, CircuitTestsError, UnknownModelError
from circuit_tests.files import CONFIG_LIMIT, file_kind, mode_of, read_text, resolved
from circuit_tests.model.references import TRUST_OPTION, ModelRef
from circuit_tests.text import printable, quoted, shown

CHECKPOINT_ENTRIES_LIMIT = 10_000  # files and directories in a checkpoint named in a spec


@dataclass(frozen=True)
class CheckedFiles:
    """What was read of a checkpoint's JSON files before transformers saw it."""

    config: dict
    tokenizer_config: dict | None
    shards: frozenset[str] = frozenset()  # the weight files that shard indexes name, relative to the directory


def check_directory(ref: ModelRef, directory: Path, roots: list[Path] | None, trust: bool, allow_pickle: bool) -> CheckedFiles:
    """Everything checked of a checkpoint directory before transformers reads it."""
    who = f"Model {quoted(ref.name)}"
    mode = mode_of(directory)
    if mode is None or not stat.S_ISDIR(mode):
        raise UnknownModelError(f"{who}: no such directory {shown(directory)}.")
    if ref.kind == "local":
        if ref.project is not None:
            _check_contained_files(who, directory, Path(ref.project))
        else:
            _check_top_level_files(who, directory)
    if not (directory / "config.json").exists():
        found = _listing(directory)
        raise BadCheckpointError(
            f"{who}: {shown(directory)} has no config.json, so it is not a checkpoint ({found}). Name a save_pretrained "
            "directory (config.json, *.safetensors, tokenizer files), or a .gguf file.")
    config = _read_json_object(who, directory / "config.json", roots)
    model_type = config.get("model_type")
    auto_map = isinstance(config.get("auto_map"), dict) and bool(config["auto_map"])
    if not trust:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if not isinstance(model_type, str) or not model_type:
            raise BadCheckpointError(
                f"{who}: {shown(directory / 'config.json')} has no model_type, so transformers cannot tell its "
                "architecture. Save the checkpoint again with save_pretrained, or add the model_type of its architecture.")
        if model_type not in CONFIG_MAPPING:
            if auto_map:
                raise BadCheckpointError(remote_code_message(ref, directory / "config.json", f"model_type {model_type!r}, "
                                                              f"which transformers {transformers.__version__} does not know,"))
            raise BadCheckpointError(
                f"{who}: {shown(directory / 'config.json')} has model_type {quoted(model_type)}, which transformers "
                f"{transformers.__version__} does not know. Upgrade transformers if it is a newer architecture, or "
                "fix config.json.")
    tokenizer_config = None
    if (directory / "tokenizer_config.json").exists():
        tokenizer_config = _read_json_object(who, directory / "tokenizer_config.json", roots)
        fast_files = tokenizer_config.get("fast_tokenizer_files")
        if fast_files is not None and not (isinstance(fast_files, list) and all(map(_plain_file_name, fast_files))):
            raise BadCheckpointError(f"{who}: {shown(directory / 'tokenizer_config.json')} lists fast_tokenizer_files "
                                     "that are not plain file names in the checkpoint directory.")
    shards: set[str] = set()
    for index in sorted(directory.glob("*.safetensors.index.json")):
        weight_map = _read_json_object(who, index, roots).get("weight_map")
        if not isinstance(weight_map, dict) or not all(map(_relative_inside, weight_map.values())):
            raise BadCheckpointError(f"{who}: {shown(index)} has no weight_map of files inside the checkpoint "
                                     "directory (each shard is a relative path without '..').")
        shards.update(weight_map.values())
    if not allow_pickle:
        _check_safetensors(directory, who)
    return CheckedFiles(config, tokenizer_config, frozenset(shards))


def _read_json_object(who: str, path: Path, roots: list[Path] | None) -> dict:
    try:
        text = read_text(path, roots, CONFIG_LIMIT)
    except CircuitTestsError as error:
        raise BadCheckpointError(f"{who}: {printable(str(error), one_line=True)}.") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise BadCheckpointError(f"{who}: {shown(path)} is not JSON ({error.msg} at line {error.lineno}, column "
                                 f"{error.colno}). Save the checkpoint again with save_pretrained.") from None
    except RecursionError:
        raise BadCheckpointError(f"{who}: {shown(path)} nests too deeply to be a configuration file.") from None
    if not isinstance(value, dict):
        raise BadCheckpointError(f"{who}: {shown(path)} holds a JSON {_json_type(value)}, not an object with the "
                                 "model's configuration. Save the checkpoint again with save_pretrained.")
    return value


def remote_code_message(ref: ModelRef, path: Path, what: str) -> str:
    if ref.kind == "hub":
        allow = f"if you trust it, run with {TRUST_OPTION}={ref.location}" + (f"@{ref.revision}" if ref.revision else "")
    elif ref.kind == "local" and ref.project is None:
        allow = f"if you trust it, run with {TRUST_OPTION}={shown(ref.location)} (only for a directory outside the project)"
    else:
        allow = ("a checkpoint a spec names is inside the project, which a pull request can change, so its code never "
                 "runs: keep it outside the project and name it with --circuit-model, or save it with a built-in "
                 "architecture")
    return (f"Model {quoted(ref.name)}: {shown(path)} declares {what} and an auto_map: loading it would import Python "
            f"files shipped with the checkpoint. circuit-tests does not run a checkpoint's code unless the person running "
            f"the suite allows that model; {allow}.")


def check_vocabulary(ref: ModelRef, tokenizer: PreTrainedTokenizerBase | None, model: PreTrainedModel) -> None:
    """A tokenizer with ids past the embedding would fail later with an IndexError deep in torch: refuse it here."""
    if tokenizer is None:
        return
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0]
    if len(tokenizer) > rows:
        raise BadCheckpointError(
            f"Model {quoted(ref.name)}: its tokenizer has {len(tokenizer)} tokens but the model's input embedding has "
            f"{rows} rows, so token ids {rows} to {len(tokenizer) - 1} would index past it. The tokenizer does not "
            "belong to these weights: save the tokenizer the model was trained with beside them.")


def _check_safetensors(path: Path, who: str = "Model") -> None:
    """A local checkpoint with only pickle weight files is refused before anything is unpickled."""
    if path.is_dir() and not any(path.glob("*.safetensors")) and (any(path.glob("*.bin")) or any(path.glob("*.pt"))):
        raise BadCheckpointError(
            f"{who}: {shown(path)} holds only pickle weight files (*.bin / *.pt), which can run code when loaded; circuit-tests "
            "loads safetensors only. Convert it once where you trust it: "
            "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)` writes model.safetensors."
        )


def check_finite(model: PreTrainedModel, who: str) -> None:
    """Weights with NaN or infinite values would make every measurement NaN: refuse them by name."""
    bad = [param_name for param_name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise BadCheckpointError(
            f"{who}: {len(bad)} weight tensor(s) hold NaN or infinite values ({listed}). The checkpoint is damaged "
            "(a diverged run or a bad conversion); test an earlier one, or fix the training run."
        )


def _check_contained_files(who: str, directory: Path, project: Path) -> None:
    """Every entry of a spec-named checkpoint, links followed, is a regular file or directory inside ``project``."""
    root = resolved(project)
    pending, seen, count = [directory], {resolved(directory)}, 0
    while pending:
        current = pending.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda entry: entry.name)
        except OSError as error:
            raise BadCheckpointError(f"{who}: cannot list {shown(current)} ({error.strerror}).") from None
        for entry in entries:
            count += 1
            if count > CHECKPOINT_ENTRIES_LIMIT:
                raise BadCheckpointError(f"{who}: {shown(directory)} holds more than {CHECKPOINT_ENTRIES_LIMIT} files "
                                         "and directories; a checkpoint directory holds the files of one checkpoint.")
            path = Path(entry.path)
            real = resolved(path)
            if real is None or root is None or not real.is_relative_to(root):
                target = f"a link to {shown(real)}" if real is not None else "a link that loops"
                raise BadCheckpointError(
                    f"{who}: {shown(path)} is {target}, outside the project {shown(root)}. A checkpoint named in a spec "
                    "must hold its own files: a link out of the project could make the run read, and print, any file "
                    "on the machine. Copy the file into the checkpoint instead.")
            mode = mode_of(path)
            if mode is None:
                raise BadCheckpointError(f"{who}: {shown(path)} is a link to {shown(real)}, which does not exist.")
            if stat.S_ISDIR(mode):
                if real not in seen:
                    seen.add(real)
                    pending.append(path)
            elif not stat.S_ISREG(mode):
                raise BadCheckpointError(f"{who}: {shown(path)} is {file_kind(mode)}, not a regular file; a checkpoint holds "
                                         "regular files only.")


def _check_top_level_files(who: str, directory: Path) -> None:
    """A FIFO would hang the run and a device exhaust memory when transformers reads it: refuse them by name."""
    try:
        entries = sorted(os.scandir(directory), key=lambda entry: entry.name)[:CHECKPOINT_ENTRIES_LIMIT]
    except OSError as error:
        raise BadCheckpointError(f"{who}: cannot list {shown(directory)} ({error.strerror}).") from None
    for entry in entries:
        mode = mode_of(Path(entry.path))
        if mode is not None and not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise BadCheckpointError(f"{who}: {shown(Path(entry.path))} is {file_kind(mode)}, not a regular file; a "
                                     "checkpoint holds regular files only.")


def _listing(directory: Path) -> str:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return "it cannot be listed"
    if not names:
        return "it is empty"
    listed = ", ".join(printable(name, one_line=True) for name in names[:5])
    return f"it holds {listed}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _plain_file_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _relative_inside(name) -> bool:
    return (isinstance(name, str) and bool(name) and not name.startswith(("/", "\\"))
            and all(part not in ("", ".", "..") for part in name.replace("\\", "/").split("/")))


def _json_type(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), "null")
