"""A new user's journey, end to end, on a behaviour we do not ship: check the data, write a spec with measured
thresholds, run it, catch a checkpoint that lost the circuit's strongest neuron, pass one that lost an idle neuron,
diff them, accept a change, and use the Python fixtures as the README shows them.

The model is a tiny Llama taught the task (`save_tiny_checkpoint(taught=True)`; every step measures it for real); the data
mixes prompts of two lengths (3 and 6 tokens), lined up at their last token.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from circuit_tests.cli import main
from circuit_tests.spec.subject import STANDARD_SIZES, Subject
from circuit_tests.testing import both_ways, save_tiny_checkpoint, tiny_agreement_pairs

pytest_plugins = ["pytester"]


def without_neurons(source: Path, target: Path, neurons: list[tuple[int, int]]) -> Path:
    """A copy of a checkpoint whose MLP neurons (layer, neuron) write nothing: their columns of down_proj are zero."""
    target.mkdir()
    for path in source.iterdir():
        target.joinpath(path.name).write_bytes(path.read_bytes())
    weights = load_file(source / "model.safetensors")
    for layer, neuron in neurons:
        weights[f"model.layers.{layer}.mlp.down_proj.weight"][:, neuron] = 0
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


@pytest.fixture
def project(pytester, monkeypatch) -> pytest.Pytester:
    monkeypatch.chdir(pytester.path)
    save_tiny_checkpoint(pytester.path / "ckpt", taught=True)
    pytester.path.joinpath("data.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in tiny_agreement_pairs()))
    return pytester


def test_a_new_behaviour_from_data_to_a_caught_regression(project, capsys):
    # 1. check the data before tracing anything
    assert main(["check", "data.jsonl", "--model", "ckpt"]) == 0
    assert "3, 6" in capsys.readouterr().out  # prompt lengths in tokens

    # 2. a spec whose thresholds are measured on the model, with its baseline
    assert main(["new", "data.jsonl", "--name", "agree", "--model", "ckpt", "--measure"]) == 0
    spec = project.path / "specs" / "agree.yaml"
    text = spec.read_text()
    assert "models: [\"../ckpt\"]" in text and re.search(r"behaves: \{min_accuracy: 0\.\d+\}  # measured", text)
    assert (project.path / "specs" / "agree.baseline.json").is_file()

    # 3. it passes on the model it was measured on
    project.runpytest("specs", "-p", "no:cacheprovider").assert_outcomes(passed=text.count("\n  - "))

    # 4. a checkpoint without the baseline's strongest neuron fails `stable`, naming it
    stored = json.loads((project.path / "specs" / "agree.baseline.json").read_text())["models"]["../ckpt"]["circuit"]
    layer, _, neuron, _ = stored[0]
    without_neurons(project.path / "ckpt", project.path / "knockout", [(layer, neuron)])
    result = project.runpytest("specs", "-p", "no:cacheprovider", "--circuit-model", "knockout")
    result.stdout.fnmatch_lines(["*lost from the baseline's top 5: L*(rank 1, score*",
                                 "*circuit-tests promote * --model knockout*"])
    assert any(line.startswith("FAILED specs/agree.yaml::agree::stable[knockout]") for line in result.stdout.lines)

    # 5. a checkpoint without a neuron outside the circuit passes it
    last = max(row[0] for row in stored)
    idle = next(n for n in range(64) if all((row[0], row[2]) != (last, n) for row in stored))
    without_neurons(project.path / "ckpt", project.path / "control", [(last, idle)])
    project.runpytest("specs", "-p", "no:cacheprovider", "--circuit-model", "control", "-k", "stable").assert_outcomes(passed=1)

    # 6. diff names what moved
    assert main(["diff", "specs/agree.yaml", "--models", "ckpt", "knockout"]) == 0
    assert re.search(rf"lost \(\d+\): .*L{layer}\b", capsys.readouterr().out)

    # 7. an intended change is accepted by promoting the checkpoint's circuit to the model's baseline
    assert main(["promote", "specs/agree.yaml", "--model", "knockout"]) == 0
    promoted = json.loads((project.path / "specs" / "agree.baseline.json").read_text())["models"]["../ckpt"]
    assert promoted["promoted_from"] == "../knockout"
    project.runpytest("specs", "-p", "no:cacheprovider", "--circuit-model", "knockout", "-k", "stable").assert_outcomes(passed=1)

    # 8. a checkpoint's own baseline is keyed as the spec would list it, and is not stale
    result = project.runpytest("specs", "-p", "no:cacheprovider", "--circuit-update", "--circuit-model", str(project.path / "control"))
    assert "../control" in json.loads((project.path / "specs" / "agree.baseline.json").read_text())["models"]
    assert "stale" not in result.stdout.str()


def test_a_failed_threshold_says_where_to_edit_it(project):
    spec = project.path / "specs" / "strict.yaml"
    spec.parent.mkdir()
    spec.write_text('name: strict\nmodels: ["../ckpt"]\ntask: {dataset: ../data.jsonl}\nexpect:\n'
                    "  - behaves: {min_accuracy: 0.6}\n  - flips: {nodes: 1, min_flip_rate: 1.0}\n")
    result = project.runpytest("specs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"*edit the threshold at {spec}:6"])


def test_the_python_fixtures_as_the_readme_shows_them(project):
    project.makepyfile(test_agreement="""
        def test_the_circuit(circuit_model, circuit_trace):
            model = circuit_model("ckpt")
            subject = circuit_trace(model, dataset="data.jsonl", test_fraction=0.5)
            top = subject.circuit(5)
            assert len(top) == 5 and top.nodes[0] in top
            faithfulness = subject.faithfulness(100)
            assert 0 <= faithfulness.interval[1] and faithfulness.n == subject.test.n_examples
            assert subject.flip_rate(10) >= 0.0 and "95% CI" in str(subject.flip_rate(10))
    """)
    project.runpytest("test_agreement.py", "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_a_measured_spec_whose_circuit_never_reaches_08_names_the_size_stable_compares(project, monkeypatch):
    # IOI's case: no circuit up to the largest standard size reaches 0.8, so stable has no default size
    monkeypatch.setattr(Subject, "nodes_for", lambda self, target: None)
    assert main(["new", "data.jsonl", "--name", "agree", "--model", "ckpt", "--measure"]) == 0
    text = (project.path / "specs" / "agree.yaml").read_text()
    assert f"stable: {{nodes: {max(STANDARD_SIZES)}, min_overlap" in text
    project.runpytest("specs", "-p", "no:cacheprovider", "-k", "stable").assert_outcomes(passed=1)


def test_new_refuses_data_the_model_does_at_chance(project, capsys):
    save_tiny_checkpoint(project.path / "guesser")  # not taught: it prefers some answers whatever the prompt
    project.path.joinpath("both.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in both_ways(tiny_agreement_pairs())))
    assert main(["new", "both.jsonl", "--name", "agree", "--model", "guesser", "--measure"]) == 1
    out = capsys.readouterr().out
    assert "does not do this task above chance" in out and "held-out examples answered right" in out
    assert "more or better pairs" in out and not (project.path / "specs" / "agree.yaml").exists()
