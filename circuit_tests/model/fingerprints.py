"""A checkpoint's fingerprint: the sha256 of the files that decide its outputs, what cached traces are keyed by.

What is hashed, in a checkpoint directory:

- every file at its top level, whatever its name: the weights (``*.safetensors``, shards and
  their index, pickle files where allowed), ``config.json``, ``generation_config.json``, the
  tokenizer files, chat templates, and any code the checkpoint ships;
- the files of its ``additional_chat_templates`` directory;
- the shards a ``*.safetensors.index.json`` places in a subdirectory.

Other subdirectories are not hashed: transformers reads none of them (a training run keeps its
``checkpoint-N`` directories beside the final weights). Each file is hashed on its own, 16 MiB at
a time and never whole in memory, files in parallel threads; the fingerprint is the sha256 of the
list of (path relative to the directory, the file's sha256), sorted by path. Names, sizes and
modification times decide nothing: a file rewritten with the same size and time changes the
fingerprint. Files are read by the loader's rules (:func:`circuit_tests.files.sha256_of`): links
are followed only to where the loader lets transformers read (the project, for a checkpoint a
spec names; the repository's own directory in the Hugging Face cache; the cache of converted
models), and only regular files are read.

:func:`circuit_tests.model.loading.load_model` takes the fingerprint once per loaded model, just
before transformers reads the files, and every spec of the run shares it through ``LoadedModel``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from circuit_tests.errors import BadCheckpointError, CircuitTestsError
from circuit_tests.files import sha256_of
from circuit_tests.text import printable, shown

TEMPLATES = "additional_chat_templates"


def fingerprint(directory: Path, roots: Sequence[Path] | None, shards: Iterable[str] = (), who: str = "Model") -> str:
    """The sha256 (hex) of the files of the checkpoint in ``directory`` that decide its outputs (see the module).

    ``roots``: where those files may lie, links followed (``None``: anywhere); ``shards``: the weight files that
    shard indexes name, relative to ``directory``. A file that cannot be read is :class:`BadCheckpointError`.
    """
    names = sorted(_hashed(directory, shards, who))
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1))) as pool:
            digests = list(pool.map(lambda name: sha256_of(directory / name, roots), names))
    except CircuitTestsError as error:
        raise BadCheckpointError(f"{who}: {printable(str(error), one_line=True)}; circuit-tests hashes every file "
                                 "that decides the model's outputs, so each must be a readable file.") from None
    return hashlib.sha256(json.dumps(list(zip(names, digests))).encode()).hexdigest()


def _hashed(directory: Path, shards: Iterable[str], who: str) -> set[str]:
    """The paths, relative to ``directory``, of the files :func:`fingerprint` hashes."""
    names = {shard.replace("\\", "/") for shard in shards}
    try:
        for entry in os.scandir(directory):
            if not entry.is_dir():
                names.add(entry.name)
            elif entry.name == TEMPLATES:
                names.update(f"{TEMPLATES}/{inner.name}" for inner in os.scandir(entry.path) if not inner.is_dir())
    except OSError as error:
        raise BadCheckpointError(f"{who}: cannot list {shown(directory)} to hash its files ({error.strerror}).") from None
    return names
