"""circuit-tests: turn findings about MLP-neuron circuits into regression tests.

The library loads a model (:mod:`circuit_tests.model.loading`), finds its MLP neurons
(:mod:`circuit_tests.model.sites`) and reads or edits them with hooks. The pytest plugin
(:mod:`circuit_tests.plugin`) runs YAML circuit specs found under ``specs/``.
"""

from __future__ import annotations

__version__ = "0.1.0"
