"""Errors that circuit-tests reports to users as one readable paragraph, never as a traceback."""

from __future__ import annotations


class CircuitTestsError(Exception):
    """Base of every error whose message is meant for the user as it stands."""


class UnknownModelError(CircuitTestsError):
    """A model name that resolves to nothing: not registered, no such directory or .gguf file, not a valid hub id."""


class ModelOutsideProjectError(UnknownModelError):
    """A checkpoint named in a spec that resolves (links followed) outside the project, which a spec may not name."""


class ModelNotAvailableError(CircuitTestsError):
    """Weights that can be fetched by name but are not on this machine: a hub id missing from the local Hugging Face
    cache, or a registered model whose package is not installed. The only load failure that may be a skip."""


class BadCheckpointError(CircuitTestsError):
    """A checkpoint that exists but cannot be used: not a checkpoint, damaged or unreadable files, a tokenizer that
    does not fit the weights, non-finite weights, pickle-only weights, or code it would need to run."""


class BadOptionError(CircuitTestsError, ValueError):
    """An option value circuit-tests cannot use (device, dtype, remote-code allow-list), reported with the allowed values."""


class UnsupportedArchitectureError(CircuitTestsError):
    """A model whose MLP neurons circuit-tests does not know how to find."""


class SpecError(CircuitTestsError):
    """A circuit spec that cannot be run as written."""
