"""Spec and dataset checks: every problem is a SpecError naming the file, the field and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from circuit_tests.errors import SpecError
from circuit_tests.model.data import PairedExample, read_jsonl, repeats, split, tokenize_pairs
from circuit_tests.spec.schema import KINDS, SpecFieldRenamed, json_schema, load_spec, reference_markdown, spec_from_mapping

GOOD_EXAMPLE = {"clean_prefix": "The author", "patch_prefix": "The authors", "clean_answer": " is", "patch_answer": " are"}


def write(tmp_path: Path, text: str, name: str = "circuit_x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_good_spec_reads_its_dataset_relative_to_itself(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.jsonl").write_text(json.dumps(GOOD_EXAMPLE) + "\n\n")
    spec = load_spec(write(tmp_path, "name: x\nmodels: [m]\ntask: {dataset: data/d.jsonl}\nexpect:\n  - behaves: {min_accuracy: 1}\n"))
    assert spec.examples[0].clean_prefix == "The author"
    assert spec.examples[0].source.endswith("d.jsonl:1")
    assert [e.kind for e in spec.expectations] == ["behaves"]


BAD_SPECS = sorted((Path(__file__).parent / "bad_specs").glob("*.yaml"))


def test_the_broken_spec_corpus_is_large_enough():
    assert len(BAD_SPECS) >= 25


@pytest.mark.parametrize("path", BAD_SPECS, ids=lambda path: path.stem)
def test_each_broken_spec_gets_its_own_message_naming_file_and_field(path):
    """Each file's first line, ``# expect: ...``, is a fragment its error message must contain."""
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(SpecError) as error:
        load_spec(path, root=path.parents[2])
    assert path.name in str(error.value)
    assert expected in str(error.value)
    assert "\n" not in str(error.value)  # one paragraph


def test_the_json_schema_describes_every_expectation_kind():
    schema = json.dumps(json_schema())
    for kind in KINDS:
        assert f'"{kind}"' in schema
    assert json_schema()["additionalProperties"] is False


def test_the_committed_spec_reference_is_generated_from_the_schema():
    committed = Path(__file__).resolve().parent.parent / "docs" / "spec-reference.md"
    assert committed.read_text() == reference_markdown() + "\n", "regenerate: circuit-tests schema --markdown > docs/spec-reference.md"


def test_a_spec_built_from_a_mapping_matches_its_yaml_form(tmp_path):
    text = "name: x\nmodels: [m]\ntask: {examples: [%s]}\nexpect:\n  - sparse: {max_nodes: 10, min_faithfulness: 0.8}\n"
    from_yaml = load_spec(write(tmp_path, text % json.dumps(GOOD_EXAMPLE)))
    from_dict = spec_from_mapping(yaml.safe_load(text % json.dumps(GOOD_EXAMPLE)), tmp_path / "circuit_x.yaml")
    assert from_yaml.model_dump() == from_dict.model_dump() and from_yaml.examples == from_dict.examples
    assert [e.line for e in from_yaml.expectations] == [5] and [e.line for e in from_dict.expectations] == [None]
    assert from_yaml.expectations[0].params.max_nodes == 10


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD_EXAMPLE) + "\n{not json\n")
    with pytest.raises(SpecError, match=r"d.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_empty_dataset_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n")
    with pytest.raises(SpecError, match="has no examples"):
        read_jsonl(path)


class CharTokenizer:
    """One token per character (a space included), no special tokens: enough to test alignment."""

    def __call__(self, text: str, add_special_tokens: bool = True):
        return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def example(clean: str, patch: str, clean_answer: str = "s", patch_answer: str = "p") -> PairedExample:
    return PairedExample(clean, patch, clean_answer, patch_answer, source="d.jsonl:7")


def test_pairs_of_different_lengths_are_dropped_and_reported():
    data = tokenize_pairs([example("ab", "cd"), example("abc", "ab"), example("xyz", "uvw")], CharTokenizer())
    assert data.n_examples == 2
    assert [len(batch) for batch in data.batches] == [1, 1]
    assert [drop.example.clean_prefix for drop in data.dropped] == ["abc"]
    assert str(data.dropped[0]) == "d.jsonl:7: the clean prefix is 3 tokens and the counterfactual 2, so positions do not align"
    for batch in data.batches:
        assert batch.clean_ids.shape == batch.patch_ids.shape


def test_multi_token_answer_names_the_line():
    with pytest.raises(SpecError, match=r"d.jsonl:7: patch_answer 'pq' is 2 tokens"):
        tokenize_pairs([example("ab", "cd", patch_answer="pq")], CharTokenizer())


def test_split_is_seeded_disjoint_and_complete():
    examples = [example(f"a{i}", f"b{i}") for i in range(20)]
    train, test = split(examples, 0.25, seed=3)
    assert (len(train), len(test)) == (15, 5)
    assert set(train) | set(test) == set(examples) and not set(train) & set(test)
    assert split(examples, 0.25, seed=3) == (train, test)
    assert split(examples, 0.25, seed=4) != (train, test)
    with pytest.raises(SpecError, match="test_fraction"):
        split(examples, 1.5)


def test_unpaired_prompts_are_their_own_counterfactual(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "The capital of France is", "answer": " Paris"}) + "\n" + json.dumps(GOOD_EXAMPLE) + "\n")
    unpaired, paired = read_jsonl(path)
    assert (unpaired.clean_prefix, unpaired.patch_prefix, unpaired.clean_answer) == ("The capital of France is",) * 2 + (" Paris",)
    assert not unpaired.paired and paired.paired
    path.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(SpecError, match=r"d.jsonl:1: missing field\(s\) answer"):
        read_jsonl(path)


def test_renamed_fields_still_read_under_their_old_names_with_a_warning(tmp_path):
    text = ("name: x\nmodels: [m]\ntask: {examples: [%s]}\nexpect:\n  - sparse: {max_neurons: 10, min_faithfulness: 0.8}\n"
            "  - flips: {neurons: 30, min_flip_rate: 0.5}\n  - stable: {neurons: 20}\n") % json.dumps(GOOD_EXAMPLE)
    path = write(tmp_path, text)
    with pytest.warns(SpecFieldRenamed) as warned:
        spec = load_spec(path)
    assert [str(w.message).split(": ", 1)[1].split(" (")[0] for w in warned] == [
        "field 'sparse.max_neurons' is now 'sparse.max_nodes'", "field 'flips.neurons' is now 'flips.nodes'",
        "field 'stable.neurons' is now 'stable.nodes'"]
    assert all(str(path) in str(w.message) for w in warned)
    assert [e.params.max_nodes if e.kind == "sparse" else e.params.nodes for e in spec.expectations] == [10, 30, 20]
    assert "| `sparse.max_neurons` | `sparse.max_nodes` |" in reference_markdown()


def test_a_held_out_example_that_repeats_a_training_one_is_refused():
    """2 distinct pairs written 20 times each: every held-out example would be one the circuit was traced on."""
    examples = [PairedExample(clean, "xy", "s", "p", source=f"d.jsonl:{line}") for line, clean in enumerate(["ab", "cd"] * 20, 1)]
    with pytest.raises(SpecError, match=r"^d.jsonl:\d+: this held-out example repeats d.jsonl:\d+, a training example the "
                       r"circuit is traced on, .* \(10 of 10 held-out examples repeat one; 38 examples in all repeat an "
                       r"earlier one\)\. Remove the repeated examples"):
        split(examples, 0.25)


def test_repeats_are_found_with_the_first_example_they_repeat():
    examples = [PairedExample("ab", "cd", "s", "p", source=f"d.jsonl:{line}") for line in (1, 2)]
    examples.insert(1, PairedExample("ab", "cd", "s", "q", source="d.jsonl:5"))  # another answer: another example
    assert [str(repeat) for repeat in repeats(examples)] == ["d.jsonl:2 repeats d.jsonl:1"]


def test_the_largest_seed_a_spec_allows_seeds_the_split_and_a_whole_number_is_a_number(tmp_path):
    assert split([example(f"a{i}", f"b{i}") for i in range(8)], 0.25, seed=2**63 - 1)
    text = "name: x\nmodels: [m]\ntask: {examples: [%s], seed: %d}\nexpect:\n  - scales: {neurons: [[1, 2]], factors: [0, 1], min_change: 0}\n"
    spec = load_spec(write(tmp_path, text % (json.dumps(GOOD_EXAMPLE), 2**63 - 1)))
    assert spec.task.seed == 2**63 - 1 and spec.expectations[0].params.factors == [0.0, 1.0]
