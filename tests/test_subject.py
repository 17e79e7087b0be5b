"""A spec on a tiny model through :class:`~circuit_tests.spec.subject.Subject`: figures that belong to the data and model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from circuit_tests.model.loading import load_model
from circuit_tests.spec.schema import spec_from_mapping
from circuit_tests.spec.subject import Subject
from circuit_tests.testing import save_tiny_checkpoint


def agreement_pairs() -> list[dict]:
    """Subject-verb agreement in the tiny tokenizer's words, in two templates of different lengths."""
    nouns = ("author", "baker", "farmer", "doctor", "pilot")
    prepositions = ("near", "by", "of", "on")
    pairs = [{"clean_prefix": f"The {noun} {prep} the {obj}", "patch_prefix": f"The {noun}s {prep} the {obj}",
              "clean_answer": " is", "patch_answer": " are"}
             for noun, prep, obj in itertools.product(nouns, prepositions, ("key", "cabinets"))]
    return pairs + [{"clean_prefix": f"The {noun}", "patch_prefix": f"The {noun}s", "clean_answer": " was",
                     "patch_answer": " were"} for noun in nouns for _ in range(2)]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    save_tiny_checkpoint(root / "ckpt")
    (root / "data.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in agreement_pairs()))
    return root


@pytest.fixture(scope="module")
def loaded(project):
    return load_model(str(project / "ckpt"))


def subject(project: Path, loaded, *expect: dict) -> Subject:
    raw = {"name": "agreement", "models": [str(project / "ckpt")], "task": {"dataset": "data.jsonl", "test_fraction": 0.5},
           "trace": {"ablation": "mean"}, "expect": list(expect)}
    return Subject(spec_from_mapping(raw, project / "agreement.yaml", project), loaded)


def test_nodes_for_a_faithfulness_is_searched_so_it_does_not_depend_on_the_sizes_a_spec_names(project, loaded):
    found = []
    for asked in (40, 70, 500):
        measured = subject(project, loaded, {"sparse": {"max_nodes": asked, "min_faithfulness": 0.8}})
        _ = measured.curve
        found.append(measured.figures.nodes_for_08)
    n = found[0]
    assert isinstance(n, int) and found == [n, n, n]
    fresh = subject(project, loaded, {"behaves": {"min_accuracy": 0.5}})
    assert fresh.faithfulness_curve(fresh.circuit(n), [n - 1, n], complement=False).faithfulness[0] < 0.8
    assert fresh.faithfulness_curve(fresh.circuit(n), [n - 1, n], complement=False).faithfulness[1] >= 0.8
