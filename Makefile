# The README's quick start. Each target installs what it needs into $(VENV) first.
VENV ?= .venv
PYTEST = $(VENV)/bin/python -m pytest

.PHONY: setup specs test
setup:
	ci/setup.sh $(VENV)

specs: setup  ## run the shipped circuit specs on the embedded default model
	$(PYTEST) specs

test: setup  ## run the project's own test suite
	$(PYTEST) tests
