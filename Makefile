# The README's quick start. Each target installs what it needs into $(VENV) first.
VENV ?= .venv
PYTEST = $(VENV)/bin/python -m pytest

.PHONY: setup specs test
setup:
	ci/setup.sh $(VENV)

specs: setup  ## run the shipped circuit specs on the embedded default model (strict: a model that is not here fails)
	$(PYTEST) specs --circuit-strict

test: setup  ## run the project's own test suite
	$(PYTEST) tests --durations=20
