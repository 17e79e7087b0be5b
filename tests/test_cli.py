"""The ``circuit-tests`` command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from circuit_tests.analysis.attribution import Scores
from circuit_tests.cli import main


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pair(noun: str, answer: str = " is", other: str = " are") -> dict:
    return {"clean_prefix": f"The {noun}", "patch_prefix": f"The {noun}s", "clean_answer": answer, "patch_answer": other}


@pytest.mark.slow
def test_trace_writes_the_contract_json(tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "d.jsonl", [pair("author"), pair("baker"), pair("teacher")])
    out = tmp_path / "out.json"
    assert main(["trace", "--dataset", str(dataset), "--top", "50", "--json", str(out), "--save", str(tmp_path / "s.safetensors")]) == 0
    report = json.loads(out.read_text())
    assert (report["model"], report["method"], report["n_examples"]) == ("smollm2-135m-instruct", "relp", 2)
    assert report["dropped"] == [f"{dataset}:2"]  # "The baker" / "The bakers" differ in token length
    assert "d.jsonl:2" in capsys.readouterr().err
    nodes = report["nodes"]
    assert len(nodes) == 50 and set(nodes[0]) == {"layer", "position", "neuron", "score"}
    magnitudes = [abs(node["score"]) for node in nodes]
    assert magnitudes == sorted(magnitudes, reverse=True) and magnitudes[-1] > 0
    saved = Scores.load(tmp_path / "s.safetensors")
    assert saved.scores.shape == (30, 2, 1536)
    top = nodes[0]
    assert saved.scores[top["layer"], top["position"], top["neuron"]].item() == pytest.approx(top["score"])
    assert saved.metadata["data_hash"] == report["metadata"]["data_hash"]


@pytest.mark.slow
def test_trace_names_the_line_of_a_multi_token_answer(tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "d.jsonl", [pair("author"), pair("teacher", " isn't")])
    assert main(["trace", "--dataset", str(dataset)]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl:2: clean_answer \" isn't\" is" in err and "must be one token" in err


def test_trace_reports_a_missing_dataset(tmp_path, capsys):
    assert main(["trace", "--dataset", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err


def test_models_lists_the_registry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "gemma-3-270m" in out


def test_fetch_rejects_unknown_models(capsys):
    assert main(["fetch", "gpt-17"]) == 2
    assert "unknown model(s) gpt-17" in capsys.readouterr().err


@pytest.mark.slow
def test_trace_of_unpaired_prompts_needs_a_zero_or_mean_baseline(tmp_path, capsys):
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Fact: the capital of the country containing the Eiffel Tower is", "answer": " Paris"}])
    assert main(["trace", "--dataset", str(dataset)]) == 2
    assert "d.jsonl:1: an unpaired prompt has no counterfactual" in capsys.readouterr().err
    out = tmp_path / "out.json"
    assert main(["trace", "--dataset", str(dataset), "--baseline", "zero", "--metric", "top_k_logits", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["nodes"][0]["score"] != 0


ROOT = Path(__file__).resolve().parent.parent


def test_schema_prints_the_spec_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "circuit-tests spec" and "expect" in schema["properties"]


def test_new_scaffolds_a_valid_spec_next_to_its_data(tmp_path, capsys, monkeypatch):
    from circuit_tests.spec.schema import load_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "fixtures").mkdir()
    dataset = write_jsonl(tmp_path / "fixtures" / "d.jsonl", [pair("author")])
    out = tmp_path / "specs" / "mine.yaml"
    assert main(["new", str(dataset), "--name", "mine", "--out", str(out)]) == 0
    spec = load_spec(out, tmp_path)
    assert spec.task.dataset == "../fixtures/d.jsonl" and spec.examples[0].clean_prefix == "The author"
    assert [e.kind for e in spec.expectations] == ["behaves", "sparse", "necessary", "flips", "stable"]
    assert main(["new", str(dataset), "--name", "mine", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


SPEC = """name: cli
models: [smollm2-135m-instruct]
task: {dataset: d.jsonl, test_fraction: 0.5}
expect:
  - behaves: {min_accuracy: 0.9}
  - flips: {nodes: 30, min_flip_rate: 0.99}
  - stable: {nodes: 20}
"""


@pytest.mark.slow
def test_run_diff_and_trace_with_a_spec(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the project: specs and data inside it
    (tmp_path / "d.jsonl").write_text("\n".join((ROOT / "fixtures" / "sva" / "simple.jsonl").read_text().splitlines()[:30]))
    spec = tmp_path / "cli.yaml"
    spec.write_text(SPEC)
    assert main(["run", str(spec), "--update", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "PASS cli::flips[smollm2-135m-instruct]" in out and f"baseline written: {tmp_path / 'cli.baseline.json'}" in out
    assert [(row["spec"], row["path"]) for row in json.loads((tmp_path / "r.json").read_text())["rows"]] == [("cli", str(spec))]
    assert main(["run", str(spec), "--model", "smollm2-135m-instruct"]) == 0  # stable against the stored baseline
    assert main(["diff", str(spec), "--models", "smollm2-135m-instruct", "smollm2-135m-instruct", "--top", "20"]) == 0
    out = capsys.readouterr().out
    assert "Jaccard overlap 1.000" in out and "gained (0): none" in out
    assert main(["trace", "--spec", str(spec), "--top", "5", "--json", str(tmp_path / "t.json")]) == 0
    traced = json.loads((tmp_path / "t.json").read_text())
    assert (traced["model"], traced["n_examples"], len(traced["nodes"])) == ("smollm2-135m-instruct", 15, 5)


@pytest.mark.slow
def test_run_reports_a_broken_expectation_or_model_and_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("\n".join((ROOT / "fixtures" / "sva" / "simple.jsonl").read_text().splitlines()[:30]))
    spec = tmp_path / "cli.yaml"
    spec.write_text(SPEC.replace("[smollm2-135m-instruct]", "[smollm2-135m-instruct, ./no-such-checkpoint]")
                    .replace("  - stable: {nodes: 20}\n", "  - pinned: {neurons: [[99, 1]], min_flip_rate: 0.5}\n"))
    assert main(["run", str(spec)]) == 1
    out = capsys.readouterr().out
    assert "FAIL cli::pinned[smollm2-135m-instruct]" in out and "outside smollm2-135m-instruct's 30 layers" in out
    assert "PASS cli::behaves[smollm2-135m-instruct]" in out  # the other expectations still ran
    assert "FAIL cli::behaves[./no-such-checkpoint]" in out and "no such directory" in out  # a model that cannot load fails
    assert "cli " in out.splitlines()[-1]  # then the report table


def test_run_reports_every_broken_spec_of_the_corpus_and_goes_on(monkeypatch, capsys):
    """The bad-spec corpus through `circuit-tests run` in one call, from the project root, as a user would."""
    monkeypatch.chdir(ROOT)
    corpus = sorted((ROOT / "tests" / "bad_specs").glob("*.yaml"))
    assert main(["run", *(str(path.relative_to(ROOT)) for path in corpus)]) == 1
    out = capsys.readouterr().out
    for path in corpus:
        expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
        assert f"FAIL {path.name}::spec[-]" in out and expected in out, path.name
    assert "Traceback" not in out and "\x1b" not in out


def test_new_measure_never_writes_a_threshold_at_chance_nor_a_claim_random_circuits_match():
    from types import SimpleNamespace

    from circuit_tests.analysis.stats import Measured
    from circuit_tests.spec.figures import CHANCE, NullFigures
    from circuit_tests.spec.scaffold import NULL, _beating_random, _claim, lower

    at_chance = lower(Measured(0.55, (0.41, 0.69), 40), 0.05, CHANCE)  # the a/an data: 0.36 was written before
    assert _claim("behaves", {"min_accuracy": at_chance}).startswith("# behaves: left out, no threshold above chance (0.5)")
    assert _claim("behaves", {"min_accuracy": lower(Measured(0.95, (0.9, 1.0), 40), 0.05, CHANCE)}).startswith(
        "behaves: {min_accuracy: 0.85}")
    undefined = lower(Measured(math.nan, (math.nan, math.nan), 40), 0.05)  # faithfulness where F(M) - F(empty) is not apart from 0
    assert _claim("sparse", {"max_nodes": 100, "min_faithfulness": undefined}).startswith("# sparse: left out, its figure is undefined")
    flips = "flips: {nodes: 1000, min_flip_rate: 0.4, vs_random: " + NULL + "}"
    matched = SimpleNamespace(null=lambda figure, size, draws: NullFigures(figure, size, 0.466, [0.448] * 10 + [0.5] * 10))
    assert _beating_random(matched, "flip rate", 1000, flips).startswith(
        "# flips: left out, 20 random circuits of its shape match its flip rate (0.466; random median 0.500, p = 0.524 > 0.05)")
    beaten = SimpleNamespace(null=lambda figure, size, draws: NullFigures(figure, size, 0.9, [0.1] * 20))
    assert _beating_random(beaten, "flip rate", 1000, flips) == flips
