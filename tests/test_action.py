"""The GitHub Action (action.yml) and circuit-tests in someone else's repository.

The action declares every input it uses and uses every input it declares; inputs reach its scripts
only through ``env:`` (script injection), as words given to the installed pytest after the safe
pull-request flags of docs/security.md; ci/github-actions-gpu.yml uses it. The slow test builds the
wheel and plays the README's "In your own project" outside this repository: the action's install
step into a fresh virtual environment (torch, the wheel, fetch), ``circuit-tests new`` and a run that
records a baseline, then the action's run step, which compares with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ACTION = ROOT / "action.yml"
WORKFLOW = ROOT / "ci" / "github-actions-gpu.yml"
# ${{ inputs.NAME }} and ${{ steps.ID.outputs.NAME }}, the expressions the action's env: values use.
EXPRESSION = re.compile(r"\$\{\{\s*(inputs|steps)\.([\w-]+)(?:\.outputs\.([\w-]+))?\s*\}\}")


def _action() -> dict:
    return yaml.safe_load(ACTION.read_text())


def _safe_flags() -> list[str]:
    """The flags of the pytest command docs/security.md gives for a pull request's specs."""
    command = re.search(r"^pytest (-c /dev/null .*)$", (ROOT / "docs" / "security.md").read_text(), re.M).group(1)
    return command.replace(" specs ", " ").split()


def _steps(workflow: dict) -> list[dict]:
    if "runs" in workflow:
        return workflow["runs"]["steps"]
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def test_the_action_declares_every_input_it_uses_and_uses_every_input_it_declares():
    declared = set(_action()["inputs"])
    used = set(re.findall(r"\binputs\.([\w-]+)", ACTION.read_text()))
    assert used == declared


@pytest.mark.parametrize("path", [ACTION, WORKFLOW], ids=lambda path: path.name)
def test_no_expression_is_pasted_into_a_script(path):
    """Script injection: `${{ inputs.x }}` in `run:` text is pasted into the script before bash reads it."""
    scripts = [step["run"] for step in _steps(yaml.safe_load(path.read_text())) if "run" in step]
    assert scripts
    assert not [script for script in scripts if "${{" in script]


def test_the_gpu_workflow_runs_the_specs_through_the_action_with_declared_inputs():
    uses = [step for step in _steps(yaml.safe_load(WORKFLOW.read_text())) if step.get("uses") == "./"]
    assert len(uses) == 1
    assert set(uses[0]["with"]) <= set(_action()["inputs"])


def _substituted(text: str, inputs: dict[str, str], outputs: dict[str, dict[str, str]]) -> str:
    return EXPRESSION.sub(lambda m: inputs[m[2]] if m[1] == "inputs" else outputs[m[2]][m[3]], text)


def _run_step(name: str, inputs: dict[str, str], outputs: dict[str, dict[str, str]], project: Path, runner: Path,
              env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the action's step called ``name`` as a GitHub runner would, in ``project``.
    ``outputs`` holds what earlier steps wrote to $GITHUB_OUTPUT, by step id."""
    action = _action()
    step = next(step for step in action["runs"]["steps"] if step.get("name") == name)
    values = {key: str(spec.get("default", "")) for key, spec in action["inputs"].items()} | inputs
    script, output = runner / "step.sh", runner / "output"
    script.write_text(step["run"])
    output.write_text("")
    step_env = {key: _substituted(str(value), values, outputs) for key, value in step["env"].items()}
    github = {"GITHUB_ACTION_PATH": str(ROOT), "RUNNER_TEMP": str(runner), "GITHUB_OUTPUT": str(output),
              "GITHUB_STEP_SUMMARY": str(runner / "summary.md"), "GITHUB_ACTIONS": "true"}
    done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=project,
                          env=env | github | step_env, capture_output=True, text=True)
    outputs[step.get("id", "")] = dict(line.split("=", 1) for line in output.read_text().splitlines())
    return done


HOSTILE = "$(touch pwned) `touch pwned`; touch pwned"


@pytest.fixture
def runner_with_a_pytest_that_prints(tmp_path) -> tuple[Path, dict[str, dict[str, str]]]:
    """A runner directory, and the install step's output naming a virtual environment whose pytest prints its arguments."""
    bin_ = tmp_path / "venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "python").symlink_to(sys.executable)
    (bin_ / "pytest").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_ / "pytest").chmod(0o755)
    (tmp_path / "runner").mkdir()
    return tmp_path / "runner", {"install": {"venv": str(tmp_path / "venv")}}


def test_inputs_reach_the_installed_pytest_as_arguments_after_the_safe_flags_and_never_run_as_shell(
        tmp_path, runner_with_a_pytest_that_prints):
    """The command of docs/security.md, run by the virtual environment's pytest (never `python -m pytest`), then the
    inputs, each a word as given: nothing in them is run, expanded or globbed."""
    runner, outputs = runner_with_a_pytest_that_prints
    inputs = {"specs": "specs/a.yaml specs/b", "checkpoints": f"./checkpoints/step 2\n\n{HOSTILE}", "series": "ckpts/step-*",
              "pytest-options": f"-k 'not flips' -n 2 {HOSTILE}", "reports": "out"}
    done = _run_step("Run the circuit specs", inputs, outputs, tmp_path, runner, dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        *_safe_flags(), "--circuit-model=./checkpoints/step 2", f"--circuit-model={HOSTILE}", "--circuit-series=ckpts/step-*",
        "--circuit-report", "out/circuit-report.html", "--circuit-json", "out/circuit-report.json",
        "--junitxml", "out/circuit-results.xml", "-k", "not flips", "-n", "2", *HOSTILE.split(), "specs/a.yaml", "specs/b"]
    assert not list(tmp_path.rglob("pwned"))


def test_pytest_options_that_are_not_shell_words_stop_the_step_with_one_line(tmp_path, runner_with_a_pytest_that_prints):
    runner, outputs = runner_with_a_pytest_that_prints
    done = _run_step("Run the circuit specs", {"pytest-options": "-k 'not flips"}, outputs, tmp_path, runner, dict(os.environ))
    assert done.returncode == 1 and not done.stdout
    assert done.stderr == "circuit-tests action: the pytest-options input is not a list of shell words: No closing quotation\n"


def _wheel(tmp_path: Path) -> Path:
    """The wheel of this working tree, built from a copy (an in-tree build would leave build/ here)."""
    source = tmp_path / "source"
    shutil.copytree(ROOT / "circuit_tests", source / "circuit_tests", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
                    str(tmp_path / "dist"), str(source)], check=True)
    return next((tmp_path / "dist").glob("circuit_tests-*.whl"))


def _cache_with_the_converted_model(cache: Path) -> None:
    """A fresh cache holding only SmolLM2's conversion from this machine's cache, hard-linked (nothing is
    written to it). A conversion is named by its GGUF's sha256, so the installed package uses it only if the
    package it fetches ships the same GGUF; traces and measurements start empty."""
    from circuit_tests.model.loading import registered_checkpoint

    converted = registered_checkpoint("smollm2-135m-instruct")
    if converted.is_dir():
        shutil.copytree(converted, cache / "models" / converted.name, copy_function=_link_or_copy)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@pytest.mark.slow
def test_in_another_project_the_wheel_fetches_scaffolds_records_compares_and_fails_the_job(tmp_path):
    """The README's "In your own project", on the wheel of this tree: the action's install step (torch, the
    wheel, `circuit-tests fetch`), `circuit-tests new` and `pytest --circuit-update` as a developer runs them,
    then the action's run step (the pull-request command) compares with the recorded baseline. On every other
    pair of the SVA data, the SVA thresholds `new` copies ask too much of `sparse` (187 nodes reach 0.8
    faithfulness, not 100): that claim fails, and so does the job."""
    project, runner, cache = tmp_path / "project", tmp_path / "runner", tmp_path / "cache"
    (project / "data").mkdir(parents=True)
    runner.mkdir()
    pairs = (ROOT / "fixtures" / "sva" / "simple.jsonl").read_text().splitlines()[::2]
    (project / "data" / "pairs.jsonl").write_text("\n".join(pairs) + "\n")
    _cache_with_the_converted_model(cache)
    venv = runner / "circuit-tests-venv"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "PYTEST", "VIRTUAL_ENV"))}
    path = [entry for entry in env["PATH"].split(os.pathsep) if not entry.startswith(sys.prefix)]
    env |= {"CIRCUIT_TESTS_CACHE": str(cache), "PATH": os.pathsep.join([str(venv / "bin"), *path])}
    inputs = {"package": str(_wheel(tmp_path)), "models": "smollm2-135m-instruct", "specs": "specs/agreement.yaml"}
    outputs: dict[str, dict[str, str]] = {}

    def developer(*command: str) -> str:
        done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    installed = _run_step("Install torch, circuit-tests and the registered models", inputs, outputs, project, runner, env)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert outputs["install"]["venv"] == str(venv)
    assert Path(developer("python", "-c", "import circuit_tests; print(circuit_tests.__file__)")).is_relative_to(venv)
    assert re.search(r"^smollm2-135m-instruct +installed", developer("circuit-tests", "models"), re.M)
    developer("circuit-tests", "new", "data/pairs.jsonl", "--name", "agreement", "--model", "smollm2-135m-instruct")
    developer("pytest", "specs/agreement.yaml", "--circuit-update", "-k", "stable")
    assert "smollm2-135m-instruct" in json.loads((project / "specs" / "agreement.baseline.json").read_text())["models"]

    compared = _run_step("Run the circuit specs", inputs, outputs, project, runner, env)
    reports = project / "circuit-reports"
    assert {path.name for path in reports.iterdir()} == {"circuit-report.html", "circuit-report.json", "circuit-results.xml"}
    [row] = json.loads((reports / "circuit-report.json").read_text())["rows"]
    assert {result["expectation"]: result["outcome"] for result in row["results"]} == {
        "behaves": "passed", "sparse": "failed", "necessary": "passed", "flips": "passed", "stable": "passed"}
    assert row["figures"]["baseline"] == "smollm2-135m-instruct" and row["figures"]["overlap"] == pytest.approx(1)
    assert compared.returncode == 1, compared.stdout + compared.stderr
    assert "| agreement | smollm2-135m-instruct |" in (runner / "summary.md").read_text()
