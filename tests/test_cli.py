"""The ``circuit-tests`` command line."""

from __future__ import annotations

import json

import pytest

from circuit_tests.attribution import Scores
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
