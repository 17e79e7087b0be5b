"""Circuit files: a spec's circuit written by ``circuit-tests export`` and pinned back by a spec, on a tiny model."""

from __future__ import annotations

import json

import pytest

from circuit_tests.cli import main
from circuit_tests.errors import SpecError
from circuit_tests.model.loading import load_model
from circuit_tests.spec.circuit_file import read_circuit
from circuit_tests.spec.schema import load_spec, spec_from_mapping
from circuit_tests.spec.subject import Subject
from circuit_tests.testing import save_tiny_checkpoint, tiny_agreement_pairs

pytest_plugins = ["pytester"]
SPEC = ('name: agree\nmodels: ["../ckpt"]\ntask: {dataset: ../data.jsonl, test_fraction: 0.5}\ntrace: {ablation: mean}\n'
        "expect:\n  - behaves: {min_accuracy: 0.6}\n")


@pytest.fixture
def project(pytester, monkeypatch) -> pytest.Pytester:
    monkeypatch.chdir(pytester.path)
    save_tiny_checkpoint(pytester.path / "ckpt", taught=True)
    pytester.path.joinpath("data.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in tiny_agreement_pairs()))
    pytester.path.joinpath("specs").mkdir()
    pytester.path.joinpath("specs", "agree.yaml").write_text(SPEC)
    return pytester


def test_an_exported_circuit_is_the_specs_top_nodes_and_measures_the_same_pinned_back(project, capsys):
    assert main(["export", "specs/agree.yaml", "--nodes", "200", "--out", "circuit.json"]) == 0
    assert "wrote circuit.json: the top 200 nodes of agree on ../ckpt" in capsys.readouterr().out
    exported = json.loads((project.path / "circuit.json").read_text())
    subject = Subject(load_spec(project.path / "specs" / "agree.yaml", project.path), load_model("ckpt"))
    assert (exported["format"], exported["version"], exported["spec"]) == ("circuit-tests/circuit", 1, "agree")
    assert exported["shape"] == {"layers": 3, "neurons": 96} and exported["trace"]["align"] == "end"
    assert [tuple(row[:3]) for row in exported["nodes"]] == list(subject.circuit(200).nodes)
    scores = [abs(row[3]) for row in exported["nodes"]]
    assert scores == sorted(scores, reverse=True) and all(position < 0 for _, position, _, _ in exported["nodes"])
    whole, top, flips = exported["measured"]["faithfulness"], subject.faithfulness(10).value, subject.flip_rate(200).value
    assert whole == pytest.approx(subject.faithfulness(200).value, abs=1e-6) and exported["measured"]["n_test"] == subject.test.n_examples

    # pinned back, its top 10 nodes measure what the spec's top 10 do: thresholds either side of that pass and fail
    project.path.joinpath("specs", "pinned.yaml").write_text(SPEC.replace("agree", "pinned").replace("  - behaves: {min_accuracy: 0.6}\n", (
        f"  - pinned: {{id: below, circuit: ../circuit.json, nodes: 10, min_faithfulness: {top - 0.001}}}\n"
        f"  - pinned: {{id: above, circuit: ../circuit.json, nodes: 10, min_faithfulness: {top + 0.001}}}\n"
        f"  - pinned: {{id: whole, circuit: ../circuit.json, min_faithfulness: {whole - 0.001}, min_flip_rate: {flips - 0.001}}}\n")))
    result = project.runpytest("specs/pinned.yaml", "-p", "no:cacheprovider", "--circuit-json", "r.json")
    result.assert_outcomes(passed=2, failed=1)
    # every pinned figure reaches the report; a circuit measured alone and one in a curve differ by float32 summation order
    pinned = json.loads((project.path / "r.json").read_text())["rows"][0]["figures"]["pinned"]
    assert pinned == {"the top 10 nodes of ../circuit.json": {"faithfulness": pytest.approx(top, abs=1e-5)},
                      "the top 200 nodes of ../circuit.json": {"flip_rate": flips, "faithfulness": pytest.approx(whole, abs=1e-5)}}
    result.stdout.fnmatch_lines([f"*expected: the top 10 nodes of ../circuit.json alone are >= {top + 0.001:g} faithful (mean ablation)",
                                 f"*measured: faithfulness {top:.3f}*on {subject.test.n_examples} held-out examples"])
    assert any(line.startswith("FAILED specs/pinned.yaml::pinned::above") for line in result.stdout.lines)


def test_export_writes_to_stdout_and_says_where_the_directory_is_missing(project, capsys):
    assert main(["export", "specs/agree.yaml", "--nodes", "3"]) == 0
    assert len(json.loads(capsys.readouterr().out)["nodes"]) == 3
    assert main(["export", "specs/agree.yaml", "--out", "no/such/dir/circuit.json"]) == 2
    assert "the directory" in capsys.readouterr().err and not (project.path / "no").exists()


@pytest.mark.parametrize("pinned, message", [
    ({"circuit": "c.json", "neurons": [[0, 1]], "min_flip_rate": 0.5}, "give exactly one of 'neurons'"),
    ({"neurons": [[0, 1]], "nodes": 5, "min_flip_rate": 0.5}, "'nodes' counts a circuit file's nodes"),
    ({"circuit": "c.json", "position": -1, "min_flip_rate": 0.5}, "a circuit file names each node's position"),
    ({"circuit": "c.json"}, "give a threshold: 'min_flip_rate', 'min_faithfulness', or both"),
    ({"circuit": "../outside.json", "min_flip_rate": 0.5}, "outside"),
])
def test_a_pinned_circuit_claim_is_refused_when_the_spec_is_read(tmp_path, pinned, message):
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "outside.json").write_text("{}")
    (project / "c.json").write_text(json.dumps({"format": "circuit-tests/circuit", "version": 1,
                                                "shape": {"layers": 3, "neurons": 96}, "nodes": [[0, -1, 1, 0.5]]}))
    raw = {"name": "x", "models": ["ckpt"], "task": {"examples": [{"clean_prefix": "The author", "patch_prefix": "The authors", "clean_answer": " is",
                                               "patch_answer": " are"}]}, "expect": [{"pinned": pinned}]}
    with pytest.raises(SpecError, match=message):
        spec_from_mapping(raw, project / "x.yaml", project)


CIRCUIT = '{"format": "circuit-tests/circuit", "version": VERSION, "shape": {"layers": 3, "neurons": 96}, "nodes": NODES}'


@pytest.mark.parametrize("version, nodes, message", [
    ("1", '[[0, -1, 1, 0.5]], "nodes": [[2, -1, 7, 0.5]]', "c.json gives the key 'nodes' twice in one object (a JSON reader "
                                                           "would silently keep the second); keep one"),
    ("1", "[" * 200_000 + "]" * 200_000, "c.json is nested more than 32 levels deep"),
    ("2", "[[0, -1, 1, 0.5]]", "(version: version 2 is not one this circuit-tests reads (it reads 1); if a later "
                               "circuit-tests wrote the file, upgrade)"),
    ("1.0", "[[0, -1, 1, 0.5]]", "(version: Input should be a valid integer)"),
    ("true", "[[0, -1, 1, 0.5]]", "(version: Input should be a valid integer)"),
    ("1", "[[0, -1, 1, 0.5], [1, -1, 3, 0.25], [0, -1, 1, 0.125]]", "(nodes: rows 0 and 2 both list the node L0/P-1/N1; keep one)"),
    ("1", "[[0, -1, 1, 0.5], [99, -1, 5, 0.25]]", "(nodes: row 1, node L99/P-1/N5, is outside the shape stored with it "
                                                  "(3 layers x 96 neurons))"),
    ("1", "[[0, -1, 1, 0.5], [2, -1, 99999, 0.25]]", "(nodes: row 1, node L2/P-1/N99999, is outside the shape"),
])
def test_a_damaged_or_hostile_circuit_file_is_one_paragraph_naming_the_field(tmp_path, version, nodes, message):
    path = tmp_path / "c.json"
    path.write_text(CIRCUIT.replace("VERSION", version).replace("NODES", nodes))
    with pytest.raises(SpecError) as raised:
        read_circuit(path, [tmp_path])
    assert message in str(raised.value) and str(raised.value).startswith(str(path)) and "export" in str(raised.value)
    path.write_text(CIRCUIT.replace("VERSION", "1").replace("NODES", "[[0, -1, 1, 0.5], [2, -1, 95, 0.25]]"))
    assert [row[:3] for row in read_circuit(path, [tmp_path]).nodes] == [(0, -1, 1), (2, -1, 95)]  # the same file, mended
