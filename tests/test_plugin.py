"""The pytest plugin, run through pytest's own ``pytester``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from xml.etree import ElementTree

import pytest

from circuit_tests.testing import save_tiny_checkpoint, tiny_agreement_pairs

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = "".join(  # 40 agreement pairs, 10 of them held out: enough to tell the behaviour from guessing
    "    - " + json.dumps({key: value for key, value in json.loads(line).items() if key != "case"}) + "\n"
    for line in (ROOT / "fixtures" / "sva" / "simple.jsonl").read_text().splitlines()[:40]
)


def spec(name: str, expect: str, models: str = "[smollm2-135m-instruct]", task: str | None = None) -> str:
    task = task or f"task:\n  examples:\n{EXAMPLES}"
    return f"name: {name}\nmodels: {models}\n{task}expect:\n{textwrap.indent(expect, '  ')}"


@pytest.fixture
def sva(pytester) -> pytest.Pytester:
    """A project with 40 agreement pairs (half held out) and a spec making every kind of claim."""
    lines = (ROOT / "fixtures" / "sva" / "simple.jsonl").read_text().splitlines()[:40]
    pytester.path.joinpath("data.jsonl").write_text("\n".join(lines) + "\n")
    pytester.mkdir("specs")
    pytester.path.joinpath("specs", "sva.yaml").write_text(spec("sva", (
        "- behaves: {min_accuracy: 0.9}\n"
        "- sparse: {max_nodes: 300, min_faithfulness: 0.5}\n"
        "- necessary: {nodes: 300, max_completeness: 0.5}\n"
        "- flips: {nodes: 30, min_flip_rate: 0.8}\n"
        "- stable: {nodes: 50, min_overlap: 0.9}\n"
    ), task="task: {dataset: ../data.jsonl, test_fraction: 0.5}\n"))
    return pytester


def test_spec_files_are_collected_with_readable_ids(pytester):
    """Ids come from the claims, not their order: inserting or re-thresholding a claim renames no other item."""
    pinned = ("- pinned: {layers: [0, 9], position: -1, min_flip_rate: 1.0}\n"
              "- pinned: {id: texas, neurons: [[3, 5]], min_flip_rate: 0.5}\n")
    pytester.mkdir("specs")
    pytester.path.joinpath("specs", "agree.yaml").write_text(spec("agree", "- behaves: {min_accuracy: 1.0}\n" + pinned))
    pytester.path.joinpath("circuit_other.yaml").write_text(spec("other", "- behaves: {min_accuracy: 0.6}\n"))
    pytester.path.joinpath("not_a_spec.yaml").write_text("a: 1\n")
    result = pytester.runpytest("--collect-only", "-q")
    ids = [line for line in result.outlines if "::" in line]
    assert len(ids) == 4 and ids[:2] == ["circuit_other.yaml::other::behaves[smollm2-135m-instruct]",
                                         "specs/agree.yaml::agree::behaves[smollm2-135m-instruct]"]
    assert re.fullmatch(r"specs/agree.yaml::agree::pinned-[0-9a-f]{6}\[smollm2-135m-instruct\]", ids[2])
    assert ids[3] == "specs/agree.yaml::agree::texas[smollm2-135m-instruct]"
    pytester.path.joinpath("specs", "agree.yaml").write_text(spec("agree", (
        "- pinned: {neurons: [[1, 1]], min_flip_rate: 0.2}\n- behaves: {min_accuracy: 0.9}\n"
        + pinned.replace("min_flip_rate: 1.0", "min_flip_rate: 0.7"))))
    again = [line for line in pytester.runpytest("--collect-only", "-q").outlines if "::" in line]
    assert set(ids) < set(again) and len(again) == 5  # the new claim has a new id; every old id is kept
    result = pytester.runpytest("--collect-only", "-q", "-k", "texas")
    result.stdout.fnmatch_lines(["*agree::texas[[]*", "*1/5 tests collected (4 deselected)*"])
    result = pytester.runpytest("--collect-only", "-q", ids[2])
    assert [line for line in result.outlines if "::" in line] == [ids[2]] and "1 test collected" in result.stdout.str()


def test_two_claims_of_one_kind_and_content_need_an_id(pytester):
    pytester.path.joinpath("circuit_twice.yaml").write_text(spec("twice", "- flips: {nodes: 30, min_flip_rate: 0.9}\n"
                                                                         "- flips: {nodes: 30, min_flip_rate: 0.5}\n"))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*field 'expect': two expectations are both named 'flips-*' (test ids must differ): "
                                 "give one of them an id*"])


def test_circuit_model_option_replaces_the_specs_models(pytester):
    pytester.path.joinpath("circuit_a.yaml").write_text(spec("a", "- behaves: {min_accuracy: 1.0}\n"))
    result = pytester.runpytest("--collect-only", "-q", "--circuit-model", "org/new@v2", "--circuit-model", "./ckpt")
    result.stdout.fnmatch_lines(["*a::behaves[[]org/new@v2[]]", "*a::behaves[[]./ckpt[]]", "*2 tests collected*"])


def test_every_broken_spec_is_its_own_failed_item_and_the_session_goes_on(pytester):
    corpus = sorted((ROOT / "tests" / "bad_specs").glob("*.yaml"))
    shutil.copytree(ROOT / "tests" / "bad_specs" / "data", pytester.path / "data")
    for path in corpus:
        pytester.path.joinpath(f"circuit_{path.name}").write_text(path.read_text())
    pytester.path.joinpath("circuit_missing.yaml").write_text(spec("missing", "- behaves: {min_accuracy: 0.6}\n", models="[org/absent]"))
    result = pytester.runpytest("-rA", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=len(corpus), skipped=1)
    for path in corpus:
        expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
        result.stdout.fnmatch_lines([f"*invalid circuit spec: *circuit_{path.name}*{expected.replace('[', '[[]')}*"])
    result.stdout.fnmatch_lines(["SKIPPED*not in the local Hugging Face cache*"])
    assert "Traceback" not in result.stdout.str()


def test_a_missing_model_fails_under_strict(pytester):
    pytester.path.joinpath("circuit_missing.yaml").write_text(spec("missing", "- behaves: {min_accuracy: 0.6}\n", models="[org/absent]"))
    result = pytester.runpytest("--circuit-strict")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*not in the local Hugging Face cache*"])


def test_gpu_specs_are_skipped_with_a_reason_without_cuda(pytester):
    pytester.path.joinpath("circuit_big.yaml").write_text("markers: [gpu, slow]\n" + spec("big", "- behaves: {min_accuracy: 0.6}\n", models="[org/absent]"))
    result = pytester.runpytest("-rs", "-m", "gpu")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*marked gpu and no CUDA device is visible*"])
    forced = pytester.runpytest("-rs", "-m", "gpu", "--circuit-device", "cpu")  # asked for: runs, here up to the model
    forced.assert_outcomes(skipped=1)
    forced.stdout.fnmatch_lines(["*org/absent*not in the local Hugging Face cache*"])


@pytest.mark.slow
def test_expectations_pass_and_fail_with_a_domain_message(pytester):
    pytester.path.joinpath("circuit_sva.yaml").write_text(
        spec("sva", "- behaves: {min_accuracy: 1.0}\n- pinned: {layers: [0, 9], position: -1, min_flip_rate: 1.0}\n"
             "- pinned: {id: one-neuron, neurons: [[29, 0]], position: -1, min_flip_rate: 1.0}\n")
    )
    result = pytester.runpytest("-rA", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "_* ./circuit_sva.yaml::sva::one-neuron[[]smollm2-135m-instruct[]] _*",  # the FAILURES header: a runnable id
        "circuit_sva.yaml::sva::one-neuron[[]smollm2-135m-instruct[]]",
        "*expected: patching 1 pinned neurons at position -1 from the counterfactual flips >= 1.00 of right answers",
        "*measured: flip rate 0.000 on the 10 of 10 held-out examples answered right",
    ])
    assert "Traceback" not in result.stdout.str()
    header = next(line for line in result.outlines if line.startswith("_") and "one-neuron" in line).strip("_ ")
    pytester.runpytest(header, "-p", "no:cacheprovider").assert_outcomes(failed=1)  # pasted back, it runs that item


@pytest.mark.slow
def test_exitfirst_and_last_failed_select_spec_items(pytester):
    pytester.path.joinpath("circuit_sva.yaml").write_text(
        spec("sva", "- pinned: {neurons: [[29, 0]], position: -1, min_flip_rate: 1.0}\n- behaves: {min_accuracy: 1.0}\n"
             "- pinned: {layers: [0, 9], position: -1, min_flip_rate: 1.0}\n")
    )
    pytester.runpytest("-x").assert_outcomes(failed=1)  # stops at the first failed expectation
    pytester.runpytest().assert_outcomes(passed=2, failed=1)
    again = pytester.runpytest("--lf", "-v")
    again.assert_outcomes(failed=1, deselected=2)
    again.stdout.fnmatch_lines(["*circuit_sva.yaml::sva::pinned-*[[]smollm2-135m-instruct[]] FAILED*"])


@pytest.mark.slow
def test_model_is_loaded_and_traced_once_for_all_items(sva, monkeypatch):
    from circuit_tests.model import loading
    from circuit_tests.spec import subject

    loads, traces = [], []
    monkeypatch.setattr(loading, "load_model", lambda *a, real=loading.load_model, **k: loads.append(a[0]) or real(*a, **k))
    monkeypatch.setattr(subject, "trace", lambda *a, real=subject.trace, **k: traces.append(1) or real(*a, **k))
    result = sva.runpytest_inprocess("--circuit-no-cache", "--circuit-update", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    assert ([ref.name for ref in loads], len(traces)) == (["smollm2-135m-instruct"], 1)


@pytest.mark.slow
def test_baselines_are_written_compared_and_never_corrupted(sva):
    baseline = sva.path / "specs" / "sva.baseline.json"
    result = sva.runpytest("-k", "stable")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*measured: none for smollm2-135m-instruct in *sva.baseline.json", "*--circuit-update*"])

    sva.runpytest("--circuit-update").assert_outcomes(passed=5)
    stored = json.loads(baseline.read_text())
    entry = stored["models"]["smollm2-135m-instruct"]
    assert len(entry["circuit"]) == 100 and entry["metrics"]["accuracy"] >= 0.9
    assert entry["machine"]["device"] == "cpu" and entry["machine"]["dtype"] == "float32"
    assert entry["shape"] == {"layers": 30, "neurons": 1536}

    result = sva.runpytest("-k", "stable")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*circuit specs*", "sva*smollm2-135m-instruct*1.00*passed (1/1)"])

    baseline.write_text(json.dumps({"models": {"smollm2-135m-instruct": entry | {"shape": {"layers": 32, "neurons": 2048}}},
                                    "version": 1}))
    result = sva.runpytest("-k", "stable")  # a larger model's baseline where SmolLM2's is expected: reported, not a crash
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*baseline is for a model of another shape, so its circuit cannot be compared*"])

    entry["circuit"] = entry["circuit"][50:]  # another circuit: the stored one left the top 50
    stored["models"]["old-checkpoint"] = entry
    baseline.write_text(json.dumps(stored))
    result = sva.runpytest("-k", "stable")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*measured: overlap 0.000*", "*entered (50): L*", "*left (50): L*",
                                 "*stale baseline entries in *sva.baseline.json: old-checkpoint*"])

    baseline.write_text("{ damaged")
    for args in (["-k", "stable"], ["--circuit-update"]):
        result = sva.runpytest(*args)
        result.stdout.fnmatch_lines(["*sva.baseline.json: the stored baseline cannot be read*left untouched*"])
        assert baseline.read_text() == "{ damaged"


@pytest.mark.slow
def test_reports_junit_and_xdist(sva):
    sva.path.joinpath("circuit_bad.yaml").write_text("name: [\n")
    result = sva.runpytest("-n", "2", "--dist", "loadfile", "--circuit-report", "r.html", "--circuit-json", "r.json",
                           "--junitxml", "j.xml", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, failed=2)  # stable has no baseline yet; the broken spec
    rows = json.loads(sva.path.joinpath("r.json").read_text())["rows"]
    assert sorted((row["spec"], row["status"], row["path"]) for row in rows) == [  # the broken spec has its row too
        ("circuit_bad.yaml", "failed", str(sva.path / "circuit_bad.yaml")), ("sva", "failed", str(sva.path / "specs" / "sva.yaml"))]
    figures = next(row for row in rows if row["spec"] == "sva")["figures"]
    assert figures["accuracy"] >= 0.9 and figures["curve"]["sizes"] == [10, 30, 50, 100, 300, 1000]
    page = sva.path.joinpath("r.html").read_text()
    assert "<svg" in page and "faithfulness" in page and "none for smollm2-135m-instruct" in page
    assert 'testcase classname="specs.sva.yaml' in sva.path.joinpath("j.xml").read_text()


@pytest.mark.slow
def test_bad_input_found_at_run_time_fails_only_its_spec(pytester):
    two_tokens = '    - {clean_prefix: "The author", patch_prefix: "The authors", clean_answer: " is not", patch_answer: " are"}\n'
    uneven = '    - {clean_prefix: "The baker", patch_prefix: "The bakers", clean_answer: " is", patch_answer: " are"}\n'
    pytester.path.joinpath("circuit_tokens.yaml").write_text(
        spec("tokens", "- behaves: {min_accuracy: 0.6}\n", task=f"task:\n  examples:\n{two_tokens}"))
    pytester.path.joinpath("circuit_uneven.yaml").write_text(
        spec("uneven", "- behaves: {min_accuracy: 0.6}\n", task=f"task:\n  examples:\n{uneven}{uneven}"))
    pytester.path.joinpath("circuit_shape.yaml").write_text(spec("shape", "- pinned: {neurons: [[30, 0]], min_flip_rate: 0.5}\n"))
    pytester.path.joinpath("circuit_fine.yaml").write_text(spec("fine", "- behaves: {min_accuracy: 0.6}\n"))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines([
        "*neuron (layer 30, neuron 0) is outside smollm2-135m-instruct's 30 layers x 1536 neurons*",
        "*task.examples[[]0[]]: clean_answer ' is not' is 2 tokens*must be one token*",
        "*field 'task.max_dropped': 2 of 2 examples dropped for smollm2-135m-instruct (*task.examples[[]0[]]: the clean prefix is*",
    ])
    assert "Traceback" not in result.stdout.str()


@pytest.mark.slow
def test_python_tests_use_the_same_machinery_through_fixtures(pytester):
    """As the README reads: a loaded model or a name, data beside the test file, figures that compare and print."""
    lines = (ROOT / "fixtures" / "sva" / "simple.jsonl").read_text().splitlines()[:20]
    (pytester.path / "tests").mkdir()
    pytester.path.joinpath("tests", "data.jsonl").write_text("\n".join(lines) + "\n")
    pytester.path.joinpath("tests", "test_api.py").write_text(textwrap.dedent("""
        def test_circuit(circuit_model, circuit_trace):
            model = circuit_model("smollm2-135m-instruct")
            subject = circuit_trace(model, dataset="data.jsonl", test_fraction=0.5)
            assert subject.loaded is model is circuit_trace("smollm2-135m-instruct", dataset="data.jsonl", test_fraction=0.5).loaded
            assert subject.accuracy >= 0.9
            flips = subject.flip_rate(30)
            assert flips >= 0.8 and not flips < 0.8 and flips.n == 10 and flips.interval[0] <= flips.value <= flips.interval[1]
            assert str(flips).startswith(f"{flips.value:.3f} (95% CI ") and str(flips).endswith(", n=10)")
            assert subject.faithfulness(100) > 0.5
            strongest, _ = subject.ranked(1)[0]
            assert strongest in subject.circuit(5) and list(strongest) in subject.circuit(5)
            assert (strongest[0], strongest[1], strongest[2] + 1) not in subject.circuit(1)
            assert list(subject.circuit(5))[0] == strongest
    """))
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_a_run_without_specs_or_options_never_imports_torch(pytester):
    """The plugin loads in every pytest run of the environment; torch and transformers wait for a spec."""
    pytester.makepyfile(test_plain="""
        import sys

        def test_light():
            assert not {"torch", "transformers"} & set(sys.modules)
    """)
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_under_github_actions_a_run_without_specs_adds_nothing_to_the_job_summary(pytester, monkeypatch):
    summary = pytester.path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert not summary.exists()
    pytester.makefile(".yaml", circuit_agree=spec("agree", "- behaves: {min_accuracy: 0.9}", models="[./missing]"))
    pytester.runpytest_inprocess("-p", "no:cacheprovider", "circuit_agree.yaml")
    assert "| agree |" in summary.read_text()  # a run with a spec still writes it


def test_the_session_starts_at_configure_when_an_option_or_xdist_asks_for_it(pytester):
    from circuit_tests.plugin import SESSION

    assert SESSION not in pytester.parseconfigure().stash  # no spec collected yet: nothing started
    assert SESSION in pytester.parseconfigure("--circuit-strict").stash  # options are checked before anything runs
    assert SESSION in pytester.parseconfigure("-n", "2").stash  # the xdist controller gathers the workers' results
    pytester.makefile(".yaml", circuit_agree=spec("agree", "- behaves: {min_accuracy: 0.9}"))
    result = pytester.runpytest_inprocess("--collect-only", "-q")
    result.stdout.fnmatch_lines(["circuit_agree.yaml::agree::behaves[[]smollm2-135m-instruct[]]"])  # the spec started it


@pytest.mark.parametrize("device, worker, n_gpus, expected", [
    ("cuda", "gw0", 4, "cuda:0"), ("cuda", "gw5", 4, "cuda:1"),  # one GPU per xdist worker, round robin
    ("cuda", None, 4, "cuda"), ("cuda", "gw3", 1, "cuda"),      # no xdist, or a single GPU: as given
    ("cuda:2", "gw1", 4, "cuda:2"), ("cpu", "gw1", 4, "cpu"), ("auto", "gw1", 4, "auto"),  # explicit choices kept
])
def test_xdist_workers_take_one_gpu_each(device, worker, n_gpus, expected):
    from circuit_tests.plugin.hooks import worker_device

    assert worker_device(device, worker, n_gpus) == expected


@pytest.mark.slow
def test_the_same_spec_gives_the_same_numbers_run_after_run(sva):
    for name in ("first.json", "second.json"):
        sva.runpytest("--circuit-no-cache", "--circuit-update", "--circuit-json", name, "-p", "no:cacheprovider")
    first, second = (json.loads((sva.path / name).read_text()) for name in ("first.json", "second.json"))
    assert first["rows"][0]["figures"]["curve"] == second["rows"][0]["figures"]["curve"]
    for report in (first, second):  # how long each stage took is the one figure that may differ
        assert all(row["figures"].pop("timings")["trace"] > 0 for row in report["rows"])
    for row in second["rows"]:  # and the second run compares with the baseline the first one recorded
        assert row["figures"].pop("stored_baseline")["model"] == row["model"]
    assert first == second  # every figure, the top nodes and their scores included


@pytest.mark.slow
def test_out_of_gpu_memory_fails_one_spec_with_advice_and_the_session_goes_on(pytester):
    pytester.makeconftest("""
        import torch
        import circuit_tests.spec.session as session

        real_check = session.check

        def check(subject, expectation, baselines):
            if subject.spec.name == "big":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return real_check(subject, expectation, baselines)

        def pytest_configure(config):
            session.check = check

        def pytest_unconfigure(config):
            session.check = real_check
    """)
    for name in ("big", "small"):
        pytester.path.joinpath(f"circuit_{name}.yaml").write_text(spec(name, "- behaves: {min_accuracy: 0.6}\n"))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*circuit_big.yaml: smollm2-135m-instruct: out of GPU memory. Try a smaller `task.batch_size`, "
                                 "`--circuit-dtype bfloat16`, or `--circuit-device auto`*"])
    result.stdout.no_fnmatch_line("*Traceback*")


def test_junit_xml_holds_each_result_as_json_and_the_html_compares_with_the_stored_baseline(pytester):
    """A tiny checkpoint: recorded once, then run again with --junitxml and --circuit-report."""
    save_tiny_checkpoint(pytester.path / "ckpt")
    pairs = [("author", "authors"), ("baker", "bakers"), ("farmer", "farmers"), ("doctor", "doctors"), ("pilot", "pilots")]
    examples = "".join(f'    - {{clean_prefix: "The {one} near the key", patch_prefix: "The {many} near the key", '
                       f'clean_answer: "{clean}", patch_answer: "{patch}"}}\n'
                       for one, many in pairs for clean, patch in ((" is", " are"), (" was", " were")))
    pytester.path.joinpath("circuit_tiny.yaml").write_text("description: Agreement in a <tiny> model.\n" + spec(
        "tiny", "- sparse: {max_nodes: 400, min_faithfulness: 0.5}\n- stable: {nodes: 10, min_overlap: 0.5}\n",
        models="[./ckpt]", task=f"task:\n  test_fraction: 0.5\n  examples:\n{examples}"))
    pytester.runpytest("--circuit-update", "-p", "no:cacheprovider")
    pytester.runpytest("--junitxml", "j.xml", "--circuit-report", "r.html", "-p", "no:cacheprovider").assert_outcomes(passed=2)

    properties = ElementTree.parse(pytester.path / "j.xml").findall(".//property[@name='circuit_tests']")
    results = [json.loads(prop.get("value"), parse_constant=lambda name: pytest.fail(f"bare {name}")) for prop in properties]
    assert sorted(result["expectation"] for result in results) == ["sparse", "stable"]
    figures = results[-1]["figures"]
    assert figures["curve"]["sizes"] and figures["stored_baseline"]["model"].endswith("ckpt")  # the model as the baseline file names it
    assert len(figures["stored_baseline"]["ranks"]) == len(figures["top"])
    page = pytester.path.joinpath("r.html").read_text()
    assert "Agreement in a &lt;tiny&gt; model." in page and "stroke-dasharray" in page and "s baseline</th>" in page


# --------------------------------------------------------------------------- a pull request's pytest configuration

# The command docs/security.md gives for a pull request: no configuration file, conftest.py, Python test module, package
# __init__.py or doctest file of the pull request's is read (pytester adds --basetemp and runs from the project's root).
TRUSTED = ("-c", os.devnull, "--rootdir", ".", "--noconftest", "-p", "no:cacheprovider", "-p", "no:python", "-p", "no:doctest")
AGREE = ('name: agree\nmodels: ["../ckpt"]\ntask: {dataset: ../data.jsonl, test_fraction: 0.5}\n'
         "expect:\n  - behaves: {min_accuracy: 0.6}\n  - flips: {nodes: 5, min_flip_rate: 0.99}\n")  # flips fails


@pytest.fixture
def pull_request(pytester) -> pytest.Pytester:
    """A tiny checkpoint and a spec with a claim that holds (behaves) and one that fails (flips)."""
    save_tiny_checkpoint(pytester.path / "ckpt", taught=True)
    pytester.path.joinpath("data.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in tiny_agreement_pairs()))
    pytester.mkdir("specs")
    pytester.path.joinpath("specs", "agree.yaml").write_text(AGREE)
    return pytester


def test_a_pull_requests_pytest_ini_runs_no_code_under_the_trusted_command(pull_request):
    """``pythonpath = .`` with ``addopts = -p evilplug`` ran the pull request's Python under ``--noconftest``; so do a
    package ``__init__.py``, a test module and a doctest file beside the specs. The trusted command reads none of them."""
    ran = pull_request.path / "ran"
    pull_request.path.joinpath("pytest.ini").write_text("[pytest]\npythonpath = .\naddopts = -p evilplug\n")
    files = ("evilplug.py", "specs/__init__.py", "specs/test_evil.py", "specs/test_evil.txt")
    for name in files:
        code = f"import pathlib; _ = pathlib.Path({str(ran)!r}).joinpath({Path(name).name!r}).write_text('')"
        pull_request.path.joinpath(name).write_text(f">>> {code}\n" if name.endswith(".txt") else code + "\n")
    ran.mkdir()
    pull_request.runpytest("specs", "--circuit-strict", "--noconftest", "-p", "no:cacheprovider")
    assert sorted(path.name for path in ran.iterdir()) == sorted(Path(name).name for name in files)
    shutil.rmtree(ran)
    ran.mkdir()
    result = pull_request.runpytest(*TRUSTED, "specs", "--circuit-strict")
    result.assert_outcomes(passed=1, failed=1)
    assert list(ran.iterdir()) == []


def test_a_pull_requests_addopts_cannot_deselect_a_failing_claim(pull_request):
    """``addopts = -k "not flips"`` turned a failing spec green. The trusted command ignores it; under any command,
    an item deselected by a selection that did not come from the command line is listed, and fails a strict run."""
    pull_request.path.joinpath("pytest.ini").write_text('[pytest]\naddopts = -k "not flips"\n')
    result = pull_request.runpytest(*TRUSTED, "specs", "--circuit-strict")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["specs/agree.yaml::agree::flips[[]../ckpt[]]", "*measured: flip rate 0.0*"])

    result = pull_request.runpytest("specs", "--circuit-strict", "-p", "no:cacheprovider", "--circuit-json", "r.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(["agree * not run (1/2)", "not run: agree::flips[[]../ckpt[]]: deselected by -k 'not flips', "
                                 "which did not come from the command line*"])
    (row,) = json.loads(pull_request.path.joinpath("r.json").read_text())["rows"]
    assert row["status"] == "not run" and [r["outcome"] for r in row["results"]] == ["passed", "not run"]
    spread = pull_request.runpytest("specs", "--circuit-strict", "-p", "no:cacheprovider", "-n", "2")  # workers tell the controller
    assert spread.ret == pytest.ExitCode.TESTS_FAILED and spread.stdout.str().count("deselected by -k 'not flips'") == 1
    lenient = pull_request.runpytest("specs", "-p", "no:cacheprovider")  # listed, though not strict
    assert lenient.ret == pytest.ExitCode.OK and "deselected by -k 'not flips'" in lenient.stdout.str()

    given = pull_request.runpytest("specs", "--circuit-strict", "-p", "no:cacheprovider", "-k", "not flips")  # the person's choice
    assert given.ret == pytest.ExitCode.OK and "not run" not in given.stdout.str()


def test_circuit_tests_run_reads_no_pytest_configuration_and_imports_nothing_from_the_tree(pull_request):
    """The other trusted command: ``circuit-tests run`` never reads pytest's configuration, and its console script does
    not put the working directory on ``sys.path`` (``python -m`` would, so a pull request's ``yaml.py`` would be imported)."""
    ran = pull_request.path / "ran"
    ran.mkdir()
    pull_request.path.joinpath("pytest.ini").write_text('[pytest]\npythonpath = .\naddopts = -p evilplug -k "not flips"\n')
    for name in ("evilplug", "yaml"):
        pull_request.path.joinpath(f"{name}.py").write_text(f"import pathlib\npathlib.Path({str(ran)!r}).joinpath({name!r}).write_text('')\n")
    nested = pull_request.path / "specs" / "deeper" / "nested.yaml"  # a directory runs every spec under it, as pytest would
    nested.parent.mkdir()
    nested.write_text("".join(AGREE.replace("name: agree", "name: nested").replace("../", "../../").splitlines(True)[:-1]))

    def run(*command) -> subprocess.CompletedProcess:  # not pytester.run, which puts the working directory on PYTHONPATH
        return subprocess.run([*command, "run", "--strict", "specs"], cwd=pull_request.path, capture_output=True, text=True)

    result = run(Path(sys.executable).parent / "circuit-tests")
    assert result.returncode == 1 and list(ran.iterdir()) == []
    assert re.findall(r"^(PASS|FAIL) (.*)$", result.stdout, re.MULTILINE) == [
        ("PASS", "agree::behaves[../ckpt]"), ("FAIL", "agree::flips[../ckpt]"), ("PASS", "nested::behaves[../../ckpt]")]
    run(sys.executable, "-m", "circuit_tests.cli")
    assert [path.name for path in ran.iterdir()] == ["yaml"]
