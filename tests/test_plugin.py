"""The pytest plugin, run through pytest's own ``pytester``."""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]

EXAMPLES = """\
    - {clean_prefix: "The author", patch_prefix: "The authors", clean_answer: " is", patch_answer: " are"}
    - {clean_prefix: "The authors", patch_prefix: "The author", clean_answer: " are", patch_answer: " is"}
"""


def spec(name: str, expect: str, models: str = "[smollm2-135m-instruct]", examples: str = EXAMPLES) -> str:
    return f"name: {name}\nmodels: {models}\ntask:\n  examples:\n{examples}expect:\n{textwrap.indent(expect, '  ')}"


def test_spec_files_are_collected_with_readable_ids(pytester):
    pytester.mkdir("specs")
    pytester.path.joinpath("specs", "agree.yaml").write_text(
        spec("agree", "- behaves: {min_accuracy: 1.0}\n- pinned: {layers: [0, 9], position: -1, min_flip_rate: 1.0}\n"
             "- pinned: {neurons: [[3, 5]], min_flip_rate: 0.5}\n")
    )
    pytester.path.joinpath("circuit_other.yaml").write_text(spec("other", "- behaves: {min_accuracy: 0.5}\n"))
    pytester.path.joinpath("not_a_spec.yaml").write_text("a: 1\n")
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(
        [
            "circuit_other.yaml::other[[]smollm2-135m-instruct[]]::behaves",
            "specs/agree.yaml::agree[[]smollm2-135m-instruct[]]::behaves",
            "specs/agree.yaml::agree[[]smollm2-135m-instruct[]]::pinned",
            "specs/agree.yaml::agree[[]smollm2-135m-instruct[]]::pinned-2",
            "*4 tests collected*",
        ]
    )


def test_circuit_model_option_replaces_the_specs_models(pytester):
    pytester.path.joinpath("circuit_a.yaml").write_text(spec("a", "- behaves: {min_accuracy: 1.0}\n"))
    result = pytester.runpytest("--collect-only", "-q", "--circuit-model", "org/new@v2", "--circuit-model", "./ckpt")
    result.stdout.fnmatch_lines(["*a[[]org/new@v2[]]::behaves", "*a[[]./ckpt[]]::behaves", "*2 tests collected*"])


def test_broken_spec_is_one_failed_item_and_others_still_run(pytester):
    pytester.path.joinpath("circuit_bad.yaml").write_text("name: bad\nmodels: [x]\ntask: {examples: [1]}\nexpect: []\n")
    pytester.path.joinpath("circuit_typo.yaml").write_text(spec("typo", "- behaves: {min_acuracy: 1.0}\n"))
    pytester.path.joinpath("circuit_missing.yaml").write_text(spec("missing", "- behaves: {min_accuracy: 0.0}\n", models="[org/absent]"))
    result = pytester.runpytest("-rA")
    result.assert_outcomes(failed=2, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*invalid circuit spec: *circuit_bad.yaml: task.examples[[]0[]]: expected an object*",
            "*invalid circuit spec: *circuit_typo.yaml: unknown key(s) min_acuracy in 'expect[[]0[]].behaves'*",
            "SKIPPED*not in the local Hugging Face cache*",
        ]
    )
    assert "Traceback" not in result.stdout.str()


@pytest.mark.slow
def test_expectations_pass_and_fail_with_a_domain_message(pytester):
    pytester.path.joinpath("circuit_sva.yaml").write_text(
        spec("sva", "- behaves: {min_accuracy: 1.0}\n- pinned: {layers: [0, 9], position: -1, min_flip_rate: 1.0}\n"
             "- pinned: {neurons: [[29, 0]], position: -1, min_flip_rate: 1.0}\n")
    )
    result = pytester.runpytest("-rA")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*sva[[]smollm2-135m-instruct[]]::pinned-2*", "*flips 0.000 of 2 examples; expected at least 1.000*"])
    assert "Traceback" not in result.stdout.str()


@pytest.mark.slow
def test_model_is_loaded_once_for_all_items(pytester, monkeypatch):
    from circuit_tests import models

    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    for name in ("circuit_one.yaml", "circuit_two.yaml"):
        pytester.path.joinpath(name).write_text(spec(name[:-5], "- behaves: {min_accuracy: 1.0}\n- behaves: {min_accuracy: 0.5}\n"))
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=4)
    assert loads == ["smollm2-135m-instruct"]
