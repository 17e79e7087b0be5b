"""Traces and measurements cached on disk, so a re-run with nothing changed skips the forward and backward passes.

A trace is keyed by everything that determines it: the content of the checkpoint's files
(``LoadedModel.fingerprint``, :mod:`circuit_tests.model.fingerprints`: weights, config, generation
config, tokenizer files; never their names, sizes or times), the model class that ran them (built
in, or the checkpoint's own code where allowed), dtype and device type, the training
data, the attribution options, circuit-tests' version and the content of its Python source (a
version stays 0.1.0 while its code changes), and the versions of torch and transformers. A
measurement (the per-example results of a faithfulness curve, flips, steering, a sweep, the
model's preferences) is keyed by the same model fields, the held-out data, and what was measured
(the circuit's nodes, the sizes, the ablation and its seed, the batch size). Entries are written
atomically; one that cannot be read, or has the wrong shape or non-finite scores, is a cache miss
and is computed again (the cache may sit where others can write, so it is checked).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

import circuit_tests
from circuit_tests.analysis.attribution import AttributionOptions, Scores, data_hash
from circuit_tests.files import replace_atomically
from circuit_tests.model.data import PairedExample
from circuit_tests.model.loading import LoadedModel, cache_dir


def default_trace_cache() -> Path:
    return cache_dir() / "traces"


class TraceCache:
    """A directory of cached traces (``None``: no cache, always trace)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def scores(self, loaded: LoadedModel, train: list[PairedExample], options: AttributionOptions,
               shape: tuple[int, int], trace: Callable[[], Scores]) -> Scores:
        """The cached trace of this model, data and options if there is a usable one, else ``trace()`` (then cached)."""
        path = self._path(loaded, {"data": data_hash(train), "options": asdict(options)})
        cached = _read(path, shape)
        if cached is not None:
            return cached
        scores = trace()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, scores.save)
        return scores

    def measured(self, loaded: LoadedModel, what: dict, names: set[str], compute: Callable[[], dict[str, torch.Tensor]],
                 examples: int, valid: Callable[[dict[str, torch.Tensor]], bool] = lambda tensors: True) -> dict[str, torch.Tensor]:
        """The cached tensors of the measurement ``what`` describes (held-out data included) if usable, else ``compute()``.

        Usable: the tensors ``names`` that ``compute()`` returns, each one's last dimension holding the ``examples`` measured,
        and whatever else ``valid`` checks of them.
        """
        path = self._path(loaded, {"measured": what})
        if path is not None and path.is_file() and not path.is_symlink():
            try:
                cached = load_file(str(path))
            except Exception:  # noqa: BLE001 -- a damaged cache entry is a cache miss; measuring again overwrites it
                cached = {}
            if set(cached) == names and all(value.ndim and value.shape[-1] == examples for value in cached.values()) \
                    and valid(cached):
                return cached
        tensors = compute()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, lambda target: save_file({k: v.contiguous() for k, v in tensors.items()}, str(target)))
        return tensors

    def _path(self, loaded: LoadedModel, what: dict) -> Path | None:
        if self.directory is None:
            return None
        key = {
            "checkpoint": loaded.fingerprint, "class": f"{type(loaded.model).__module__}.{type(loaded.model).__qualname__}",
            "dtype": str(loaded.model.dtype), "device": loaded.device.type,
            "library": circuit_tests.__version__, "source": _library_source(), "torch": torch.__version__,
            "transformers": transformers.__version__, **what,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.directory / f"{digest}.safetensors"


def source_digest(package: Path) -> str:
    """The sha256 of the Python files under ``package``, each with its path: what the code that measured was."""
    files = sorted(path.relative_to(package).as_posix() for path in package.rglob("*.py"))
    listed = [(name, hashlib.sha256((package / name).read_bytes()).hexdigest()) for name in files]
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()


@functools.cache
def _library_source() -> str:
    return source_digest(Path(circuit_tests.__file__).parent)


def _read(path: Path | None, shape: tuple[int, int]) -> Scores | None:
    """The trace cached at ``path``, if there is a readable one of ``(layers, neurons)`` with finite scores."""
    if path is None or not path.is_file() or path.is_symlink():
        return None
    try:
        scores = Scores.load(path)
    except Exception:  # noqa: BLE001 -- a damaged cache entry is a cache miss; tracing again overwrites it
        return None
    found = scores.scores.shape
    usable = len(found) == 3 and (found[0], found[2]) == shape and bool(torch.isfinite(scores.scores).all())
    return scores if usable else None
