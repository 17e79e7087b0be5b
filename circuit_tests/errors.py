"""Errors that circuit-tests reports to users as one readable paragraph, never as a traceback."""

from __future__ import annotations


class CircuitTestsError(Exception):
    """Base of every error whose message is meant for the user as it stands."""


class UnknownModelError(CircuitTestsError):
    """A model name that is neither registered, a local path, a .gguf file nor a hub id."""


class ModelNotAvailableError(CircuitTestsError):
    """A well-formed model reference whose weights are not on this machine (a skip, not a bug)."""


class BadCheckpointError(CircuitTestsError):
    """A checkpoint that is on this machine but cannot be used: non-finite weights, or pickle-only files."""


class UnsupportedArchitectureError(CircuitTestsError):
    """A model whose MLP neurons circuit-tests does not know how to find."""


class SpecError(CircuitTestsError):
    """A circuit spec that cannot be run as written."""
