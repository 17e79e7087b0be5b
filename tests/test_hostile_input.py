"""A pull request at its worst: hostile and careless specs, datasets, baselines and checkpoints, run as a user would.

One pytester project holds every case (a spec file each, ``circuit_<case>.yaml``) beside one good spec. pytest
runs once over all of them, and ``circuit-tests run`` once over the same files. Each case asserts its exact
outcome: its item fails (or, for a hub model missing from the cache, skips) with one paragraph naming the file,
the field and the fix; the good spec still passes; no traceback; baselines byte-identical; no secret from outside
the project printed; nothing written outside the project; no code from a checkpoint run. Options given on the
command line, and the command line tool's own arguments, are checked one by one after that.

The model is a tiny random Llama with a word-level tokenizer (``circuit_tests.testing``): fast, and enough for
every check here, which is about what the suite refuses, not about what a circuit does.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch

from circuit_tests.cli import main
from circuit_tests.errors import SpecError
from circuit_tests.model.data import read_jsonl, split
from circuit_tests.testing import save_tiny_checkpoint

pytest_plugins = ["pytester"]

SECRET = "TOP-SECRET-7f3a"  # in files outside the project: must never be printed
PAIRS = [("author", "authors"), ("baker", "bakers"), ("farmer", "farmers"), ("doctor", "doctors"),
         ("pilot", "pilots"), ("key", "keys")]
DATA = "".join(json.dumps(line) + "\n" for singular, plural in PAIRS[:5] for line in (  # what the taught tiny model answers
    {"clean_prefix": f"The {singular}", "patch_prefix": f"The {plural}", "clean_answer": " was", "patch_answer": " were"},
    {"clean_prefix": f"The {plural}", "patch_prefix": f"The {singular}", "clean_answer": " were", "patch_answer": " was"}))
CONTROL = "- scales: {neurons: [[0, 1]], factors: [0, 1], max_change: 0.5, token: ' is'}\n"  # measured, and holds on the tiny model
EVIL_CODE = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


def spec(name: str, expect: str, task: str = "task: {dataset: data.jsonl, test_fraction: 0.5}\n",
         models: str = "[./ckpt]", extra: str = "") -> str:
    body = "".join(f"  {line}\n" for line in expect.splitlines())
    return f"name: {name}\nmodels: {models}\n{task}{extra}expect:\n{body}"


@dataclass(frozen=True)
class Case:
    """One spec file of the project and what its items must show."""

    name: str
    text: str
    expect: str  # a fragment of the item's failure (or skip) text
    outcome: str = "failed"


def examples(*pairs: tuple[str, str, str, str]) -> str:
    lines = "".join(f"    - {{clean_prefix: {json.dumps(a)}, patch_prefix: {json.dumps(b)}, clean_answer: {json.dumps(c)}, "
                    f"patch_answer: {json.dumps(d)}}}\n" for a, b, c, d in pairs)
    return f"task:\n  test_fraction: 0.5\n  examples:\n{lines}"


LONG = " ".join(["the key"] * 100)  # 200 words: past the tiny model's 128 positions
BASELINE_ENTRY = {"shape": {"layers": 3, "neurons": 96}, "metrics": {"faithfulness": {"5": 0.5}},
                  "circuit": [[2, 2, 7, 0.5], [1, 2, 3, -0.25], [0, 1, 5, 0.125], [2, 1, 9, 0.1], [1, 0, 4, 0.1]]}


def baseline_text(**changes) -> str:
    return json.dumps({"models": {"./ckpt": BASELINE_ENTRY | changes}, "spec": "x", "version": 1})


STABLE = "- stable: {nodes: 5, min_overlap: 0.5}\n" + CONTROL
# Damaged or hostile baselines, each beside a spec whose `stable` must fail with the reason (and be left untouched).
BASELINES: dict[str, tuple[str, str]] = {
    "baseline_not_json": ("{ damaged", "is not valid JSON (Expecting property name enclosed in double quotes at line 1, column 3)"),
    "baseline_a_list": ("[1, 2]", "cannot be read (field 'the top level': Input should be a valid dictionary"),
    "baseline_models_not_a_mapping": ('{"models": [1]}', "field 'models': Input should be a valid dictionary"),
    "baseline_negative_index": (baseline_text(circuit=[[-1, 0, 3, 0.5]]), "Input should be greater than or equal to 0"),
    "baseline_bare_nan": (baseline_text().replace("0.125", "NaN"), "NaN is not a number a baseline can hold"),
    "baseline_score_not_a_number": (baseline_text(circuit=[[0, 0, 1, "x"]]), "Input should be a valid number"),
    "baseline_without_metrics": (json.dumps({"models": {"./ckpt": {"circuit": [[0, 0, 1, 0.5]]}}}), "field 'models../ckpt.metrics': Field required"),
    "baseline_empty_circuit": (baseline_text(circuit=[]), "List should have at least 1 item"),
    "baseline_score_a_string": (baseline_text(circuit=[[0, 0, 1, "0.5"]]), "Input should be a valid number"),
    "baseline_faithfulness_a_string": (baseline_text(metrics={"faithfulness": {"5": "0.9"}}), "Input should be a valid number"),
    "baseline_nodes_for_08_below_one": (baseline_text(metrics={"faithfulness": {}, "nodes_for_0.8": 0}),
                                        "Input should be greater than or equal to 1"),
    "baseline_nested_deep": ("[" * 100_000 + "]" * 100_000, "is nested more than 32 levels deep"),
    "baseline_models_key_twice": (baseline_text()[:-1] + ', "models": {}}', "gives the key 'models' twice in one object"),
    "baseline_entry_twice": (baseline_text().replace('{"models": {', '{"models": {"./ckpt": %s, ' % json.dumps(BASELINE_ENTRY)),
                             "gives the key './ckpt' twice in one object (a JSON reader would silently keep the second)"),
    "baseline_later_version": (baseline_text().replace('"version": 1', '"version": 2'), "field 'version': version 2 is not one"),
    "baseline_node_twice": (baseline_text(circuit=[[0, 0, 1, 0.5], [2, 2, 7, 0.25], [0, 0, 1, 0.125]]),
                            "field 'models../ckpt.circuit': rows 0 and 2 both list the node L0/P0/N1; keep one"),
    "baseline_node_outside_its_shape": (baseline_text(circuit=[[99, 0, 1, 0.5]]),
                                        "row 0, node L99/P0/N1, is outside the shape stored with it (3 layers x 96 neurons)"),
    "baseline_position_past_prompt": (baseline_text(circuit=[[0, 7, 1, 0.5]]), "the baseline was recorded on other data"),
    "baseline_other_shape": (baseline_text(shape={"layers": 30, "neurons": 1536}, circuit=[[29, 0, 1535, 0.5]]),
                             "a model of another shape"),
}


def circuit_file_text(**changes) -> str:
    """A circuit file as `circuit-tests export` writes it for the tiny model, with ``changes``."""
    return json.dumps({"format": "circuit-tests/circuit", "version": 1, "shape": {"layers": 3, "neurons": 96},
                       "nodes": [[2, -1, 7, 0.5], [1, -1, 3, -0.25]]} | changes)


# Damaged or hostile circuit files, each pinned by a spec that must fail with the reason.
CIRCUIT_FILES: dict[str, tuple[str, str]] = {
    "not_json": ("{ damaged", "cf_not_json.json is not valid JSON"),
    "other_format": (circuit_file_text(format="mib"), "is not a circuit file of format 'circuit-tests/circuit' version 1 (format:"),
    "later_version": (circuit_file_text(version=2), "(version: version 2 is not one this circuit-tests reads (it reads 1)"),
    "version_a_float": (circuit_file_text(version=1.0), "(version: Input should be a valid integer)"),
    "nodes_key_twice": (circuit_file_text()[:-1] + ', "nodes": [[0, -1, 1, 0.5]]}', "gives the key 'nodes' twice in one object"),
    "nested_deep": (circuit_file_text()[:-1] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}", "is nested more than 32 levels deep"),
    "score_a_string": (circuit_file_text(nodes=[[0, -1, 1, "0.5"]]), "nodes.0.3: Input should be a valid number"),
    "bare_nan": (circuit_file_text().replace("0.5", "NaN"), "Input should be a finite number"),
    "node_twice": (circuit_file_text(nodes=[[0, -1, 1, 0.5], [0, -1, 1, 0.25]]), "(nodes: rows 0 and 1 both list the node L0/P-1/N1"),
    "other_shape": (circuit_file_text(shape={"layers": 30, "neurons": 1536}),
                    "was exported from a model of 30 layers x 1536 neurons, and ./ckpt has 3 x 96"),
    "node_outside_its_shape": (circuit_file_text(nodes=[[0, -1, 1, 0.5], [9, -1, 1, 0.25]]),
                               "(nodes: row 1, node L9/P-1/N1, is outside the shape stored with it (3 layers x 96 neurons))"),
    "every_node": (circuit_file_text(nodes=[[layer, None, neuron, 1.0] for layer in range(3) for neuron in range(96)]),
                   "field 'pinned': the pinned nodes are every node of the model (3 layers x 3 positions x 96 neurons)"),
    "position_past_prompt": (circuit_file_text(nodes=[[0, -1, 1, 0.5], [0, 7, 1, 0.5]]), "has nodes at position 7, in none of the held-out prompts"),
}


def cases(outside: Path) -> list[Case]:
    """Every runtime case of the project (the project's files are made by :func:`project`)."""
    one = examples(("The author", "The authors", " is", " are"), ("The baker", "The bakers", " is", " are"))
    return [
        Case("pinned_position_past_prompt", spec("a", "- pinned: {neurons: [[0, 1]], position: 5, min_flip_rate: 0.5}\n"),
             "field 'pinned.position': position 5 is outside the shortest held-out prompt (3 tokens)"),
        Case("pinned_every_layer", spec("a", "- pinned: {layers: [0, 2], min_flip_rate: 0.5}\n"), "the pinned nodes are every node"),
        Case("pinned_negative_position_past_prompt", spec("a", "- pinned: {layers: [0, 1], position: -4, min_flip_rate: 0.5}\n"),
             "position -4 is outside the shortest held-out prompt (3 tokens) for ./ckpt. Use a position from -3 to 2"),
        Case("scales_position_past_prompt", spec("a", "- scales: {neurons: [[0, 1]], position: 9, min_change: 0.1}\n"),
             "field 'scales.position': position 9 is outside the shortest held-out prompt"),
        Case("sparse_every_node", spec("a", "- sparse: {max_nodes: 864, min_faithfulness: 0.8}\n"),
             "field 'sparse.max_nodes': 864 is every node of the model (864) for ./ckpt. A claim about all of them could never fail"),
        Case("necessary_every_node", spec("a", "- necessary: {nodes: 5000, max_completeness: 0.2}\n"),
             "field 'necessary.nodes': 5000 is every node of the model (864)"),
        Case("flips_every_node", spec("a", "- flips: {nodes: 864, min_flip_rate: 0.5}\n"), "field 'flips.nodes': 864 is every node"),
        Case("stable_every_node", spec("a", "- stable: {nodes: 900}\n"), "field 'stable.nodes': 900 is every node"),
        Case("steers_every_neuron", spec("a", "- steers: {neurons: 288, min_success: 0.5}\n"),
             "field 'steers.neurons': 288 is every node of the model (288)"),
        Case("prompt_over_max_prompt_tokens", spec("a", CONTROL, extra="", task=examples(
            ("The author near the key", "The authors near the key", " is", " are"), ("The baker", "The bakers", " is", " are"))
            .replace("  test_fraction: 0.5\n", "  test_fraction: 0.5\n  max_prompt_tokens: 4\n")),
             "task.examples[0]: a prompt of this example is 6 tokens, more than the 4 allowed (task.max_prompt_tokens)"),
        Case("prompt_over_the_context", spec("a", CONTROL, task=examples((LONG, LONG, " is", " are"), ("The baker", "The bakers", " is", " are"))),
             "task.examples[0]: a prompt of this example is 201 tokens, more than the 128 allowed (the context of ./ckpt)"),
        Case("answers_one_token", spec("a", CONTROL, task=examples(("The author", "The authors", " is", "is"), ("The baker", "The bakers", " is", " are"))),
             "task.examples[0]: clean_answer ' is' and patch_answer 'is' are the same token (32)"),
        Case("answer_two_tokens", spec("a", CONTROL, task=examples(("The author", "The authors", " is are", " are"), ("The baker", "The bakers", " is", " are"))),
             "clean_answer ' is are' is 2 tokens"),
        Case("nothing_left_to_trace", spec("a", CONTROL, task=one.replace("test_fraction: 0.5", "test_fraction: 0.9")),
             "field 'task.test_fraction': 0.9 of 2 usable examples leaves none to trace the circuit on"),
        Case("every_pair_dropped", spec("a", CONTROL, task=examples(("The author", "The authors near", " is", " are"), ("The key", "The keys of", " is", " are"))),
             "field 'task.max_dropped': 2 of 2 examples dropped for ./ckpt ("),
        Case("too_many_pairs_dropped", spec("a", CONTROL, task=examples(
            ("The author", "The authors", " is", " are"), ("The baker", "The bakers", " is", " are"),
            ("The pilot", "The pilots", " is", " are"), ("The key", "The keys of", " is", " are"))),
             "circuit_too_many_pairs_dropped.yaml: task.examples[3]: the clean prefix is 3 tokens and the counterfactual 4, "
             "so positions do not align), more than the 10% allowed. Rewrite those pairs"),
        Case("all_dropped_though_allowed", spec("a", CONTROL, task=examples(("The author", "The authors near", " is", " are"),
                                                                            ("The key", "The keys of", " is", " are"))
                                                 .replace("  test_fraction: 0.5\n", "  test_fraction: 0.5\n  max_dropped: 1.0\n")),
             "0 usable example(s) for ./ckpt (2 dropped because their two prefixes tokenize to different lengths)"),
        Case("model_outside_project", spec("a", CONTROL, models=f"[{outside / 'ckpt'}]"), "outside the project"),
        Case("model_path_missing", spec("a", CONTROL, models="[./no-such-checkpoint]"), "no such directory"),
        Case("model_linking_out", spec("a", CONTROL, models="[./ckpt_link]"), "is a link to"),
        Case("model_shipping_code", spec("a", CONTROL, models="[./ckpt_evil]"), "declares model_type 'evil'"),
        Case("model_empty_directory", spec("a", CONTROL, models="[./ckpt_empty]"), "has no config.json, so it is not a checkpoint"),
        Case("model_pickle_only", spec("a", CONTROL, models="[./ckpt_pickle]"), "holds only pickle weight files"),
        Case("model_small_embedding", spec("a", CONTROL, models="[./ckpt_small]"), "its tokenizer has 47 tokens but the model's input embedding has 8 rows"),
        Case("model_hub_not_cached", spec("a", CONTROL, models="[org/not-cached]"), "is not in the local Hugging Face cache", "skipped"),
        Case("dataset_fifo", spec("a", CONTROL, task="task: {dataset: data.fifo}\n"), "data.fifo is a FIFO, not a regular file"),
        Case("dataset_link_to_a_secret", spec("a", CONTROL, task="task: {dataset: secret.jsonl}\n"), "outside the project"),
        Case("dataset_link_to_dev_zero", spec("a", CONTROL, task="task: {dataset: zero.jsonl}\n"), "outside the project"),
        Case("dataset_link_loop", spec("a", CONTROL, task="task: {dataset: loop.jsonl}\n"), "loop.jsonl is a link that loops"),
        Case("dataset_too_large", spec("a", CONTROL, task="task: {dataset: huge.jsonl}\n"), "huge.jsonl is 33.0 MiB, more than the 32.0 MiB allowed"),
        Case("spec_link_to_a_secret", "", "is outside"),
        Case("spec_too_large", spec("a", CONTROL) + "# " + "x" * (1024 * 1024) + "\n", "more than the 1.0 MiB allowed"),
        Case("stable_model_named_missing", spec("a", "- stable: {nodes: 5, model: old-run}\n"),
             "'stable.model' names old-run: record its baseline"),
        Case("undefined_faithfulness", spec("a", "- sparse: {max_nodes: 10, min_faithfulness: 0.5}\n", models="[./ckpt_mute]"),
             "faithfulness undefined: the model no longer separates the answers"),
        Case("control_characters_in_text", spec("a", CONTROL, task=examples(("The author", "The authors", " is\x1b[2J", " are"),
                                                                            ("The baker", "The bakers", " is", " are"))),
             "clean_answer ' is\\x1b[2J' is 3 tokens"),
        *[Case(name, spec("a", STABLE), fragment) for name, (_, fragment) in BASELINES.items()],
        *[Case(f"circuit_file_{name}", spec("a", f"- pinned: {{circuit: cf_{name}.json, min_flip_rate: 0.5}}\n"), fragment)
          for name, (_, fragment) in CIRCUIT_FILES.items()],
        *[Case(f"circuit_file_{kind}", spec("a", f"- pinned: {{circuit: {path}, min_flip_rate: 0.5}}\n"), fragment) for kind, path, fragment in (
            ("link_to_a_secret", "cf_secret.json", "outside"), ("fifo", "data.fifo", "data.fifo is a FIFO, not a regular file"),
            ("missing", "cf_missing.json", "cf_missing.json does not exist"))],
        Case("circuit_file_fewer_nodes_than_asked", spec("a", "- pinned: {circuit: cf_good.json, nodes: 50, min_flip_rate: 0.5}\n"),
             "field 'expect[0].pinned.nodes' asks for 50 nodes and cf_good.json holds 2"),
        *[Case(f"baseline_{kind}", spec("a", STABLE), fragment) for kind, fragment in (
            ("link_to_dev_zero", "outside"), ("fifo", "is a FIFO, not a regular file"), ("directory", "is a directory"),
            ("link_to_a_secret", "outside"), ("too_large", "is 17.0 MiB, more than the 16.0 MiB allowed"),
            ("link_loop", "is a link that loops"))],
    ]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """The tiny checkpoints the project copies: good, mute (no MLP output), small embedding, pickle-only."""
    root = tmp_path_factory.mktemp("checkpoints")
    save_tiny_checkpoint(root / "ckpt", taught=True)
    save_tiny_checkpoint(root / "ckpt_small", vocab_size=8)
    mute = shutil.copytree(root / "ckpt", root / "ckpt_mute")
    from safetensors.torch import load_file, save_file

    weights = load_file(mute / "model.safetensors")
    save_file({name: torch.zeros_like(value) if "down_proj" in name else value for name, value in weights.items()},
              mute / "model.safetensors", metadata={"format": "pt"})
    pickle = shutil.copytree(root / "ckpt", root / "ckpt_pickle")
    torch.save(load_file(pickle / "model.safetensors"), pickle / "pytorch_model.bin")
    (pickle / "model.safetensors").unlink()
    return root


@dataclass
class Project:
    path: Path
    outside: Path
    marker: Path
    baselines: dict[str, bytes]  # every baseline file's bytes before a run

    def unchanged(self, updated: tuple[str, ...] = ()) -> None:
        """Nothing written outside the project, no checkpoint code run, and every baseline as it was (but ``updated``)."""
        for name, content in self.baselines.items():
            if name.removeprefix("circuit_").removesuffix(".baseline.json") not in updated:
                assert (self.path / name).read_bytes() == content, f"{name} changed"
        specials = {"link_to_dev_zero": Path.is_symlink, "link_to_a_secret": Path.is_symlink, "link_loop": Path.is_symlink,
                    "directory": Path.is_dir, "fifo": Path.is_fifo}
        for kind, test in specials.items():
            assert test(self.path / f"circuit_baseline_{kind}.baseline.json"), kind
        assert sorted(p.name for p in self.outside.iterdir()) == ["ckpt", "secret.jsonl", "secret.yaml"], "written outside"
        assert not self.marker.exists(), "a checkpoint's code ran"


@pytest.fixture
def project(pytester, checkpoints, tmp_path_factory, monkeypatch) -> Project:
    """Every case's files in one pytester project; secrets and a checkpoint outside it."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hf-cache")))
    outside = tmp_path_factory.mktemp("outside")
    marker = tmp_path_factory.mktemp("marker") / "code-ran"
    (outside / "secret.jsonl").write_text(json.dumps({"clean_prefix": SECRET, "patch_prefix": SECRET,
                                                      "clean_answer": " is", "patch_answer": " are"}) + "\n")
    (outside / "secret.yaml").write_text(spec(SECRET, CONTROL))
    shutil.copytree(checkpoints / "ckpt", outside / "ckpt")
    root = pytester.path
    for name in ("ckpt", "ckpt_small", "ckpt_mute", "ckpt_pickle"):
        shutil.copytree(checkpoints / name, root / name)
    (root / "data.jsonl").write_text(DATA)
    link = shutil.copytree(checkpoints / "ckpt", root / "ckpt_link")
    (link / "tokenizer.json").unlink()
    (link / "tokenizer.json").symlink_to(outside / "secret.jsonl")
    evil = shutil.copytree(checkpoints / "ckpt", root / "ckpt_evil")
    config = json.loads((evil / "config.json").read_text())
    (evil / "config.json").write_text(json.dumps(config | {"model_type": "evil", "auto_map": {
        "AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (evil / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    (root / "ckpt_empty").mkdir()
    os.mkfifo(root / "data.fifo")
    (root / "secret.jsonl").symlink_to(outside / "secret.jsonl")
    (root / "zero.jsonl").symlink_to("/dev/zero")
    (root / "loop.jsonl").symlink_to(root / "loop.jsonl")
    (root / "circuit_baseline_link_loop.baseline.json").symlink_to(root / "circuit_baseline_link_loop.baseline.json")
    with open(root / "huge.jsonl", "wb") as huge:
        huge.truncate(33 * 1024 * 1024)
    for case in cases(outside):
        path = root / f"circuit_{case.name}.yaml"
        if case.name == "spec_link_to_a_secret":
            path.symlink_to(outside / "secret.yaml")
        else:
            path.write_text(case.text.replace("name: a\n", f"name: {case.name}\n"))
    for name, (content, _) in BASELINES.items():
        (root / f"circuit_{name}.baseline.json").write_text(content)
    (root / "circuit_stable_model_named_missing.baseline.json").write_text(baseline_text())
    (root / "circuit_baseline_link_to_dev_zero.baseline.json").symlink_to("/dev/zero")
    os.mkfifo(root / "circuit_baseline_fifo.baseline.json")
    (root / "circuit_baseline_directory.baseline.json").mkdir()
    (root / "circuit_baseline_link_to_a_secret.baseline.json").symlink_to(outside / "secret.jsonl")
    with open(root / "circuit_baseline_too_large.baseline.json", "wb") as huge:
        huge.truncate(17 * 1024 * 1024)
    for name, (content, _) in {**CIRCUIT_FILES, "good": (circuit_file_text(), "")}.items():
        (root / f"cf_{name}.json").write_text(content)
    (root / "cf_secret.json").symlink_to(outside / "secret.jsonl")
    (root / "circuit_good.yaml").write_text(spec("good", CONTROL))
    baselines = {path.name: path.read_bytes() for path in root.glob("*.baseline.json")
                 if path.is_file() and stat.S_ISREG(path.stat().st_mode) and not path.is_symlink()}
    return Project(root, outside, marker, baselines)


def _junit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Per spec file: (outcome, text) of each of its items."""
    found: dict[str, list[tuple[str, str]]] = {}
    for case in ElementTree.parse(path).iter("testcase"):
        kind = next((child for child in case if child.tag in ("failure", "skipped", "error")), None)
        outcome = {"failure": "failed", "skipped": "skipped", "error": "error"}.get(kind.tag if kind is not None else "", "passed")
        text = "" if kind is None else f"{kind.get('message', '')}\n{kind.text or ''}"
        found.setdefault(case.get("classname").split(".")[0], []).append((outcome, text))
    return found


def test_every_hostile_case_fails_alone_with_its_reason(project, pytester):
    result = pytester.runpytest("-p", "no:cacheprovider", "--junitxml=junit.xml", "--circuit-json=report.json", "-rA")
    output = result.stdout.str() + result.stderr.str()
    items = _junit(project.path / "junit.xml")
    all_cases = cases(project.outside)
    assert len(all_cases) >= 45
    for case in all_cases:
        outcomes = items[f"circuit_{case.name}"]
        matching = [text for outcome, text in outcomes if outcome == case.outcome and case.expect in text]
        assert matching, f"{case.name}: {outcomes}"
        assert case.name in "".join(matching) or f"circuit_{case.name}" in "".join(matching) or case.outcome == "skipped"
    assert items["circuit_good"] == [("passed", "")]
    assert result.ret == 1
    for text in ("Traceback", "INTERNALERROR", SECRET, "\x1b", "trust_remote_code=True"):
        assert text not in output, text
    assert "\x1b" not in (project.path / "junit.xml").read_text()
    report = json.loads((project.path / "report.json").read_text(), parse_constant=lambda name: pytest.fail(f"bare {name}"))
    mute = next(row for row in report["rows"] if row["path"].endswith("circuit_undefined_faithfulness.yaml"))
    assert mute["status"] == "failed" and "figures.curve.faithfulness[0]" in mute["undefined"]
    project.unchanged()


def test_an_update_never_overwrites_a_damaged_baseline_and_fails_the_run(project, pytester):
    result = pytester.runpytest("-p", "no:cacheprovider", "--circuit-update", "-k", "baseline")
    result.stdout.fnmatch_lines(["*the stored baseline cannot be read*left untouched*"])
    assert result.ret == 1
    project.unchanged(updated=("baseline_position_past_prompt", "baseline_other_shape"))  # readable: an update replaces them


def test_circuit_tests_run_reports_every_case_and_goes_on(project, monkeypatch, capsys):
    monkeypatch.chdir(project.path)
    specs = sorted(str(path.name) for path in project.path.glob("circuit_*.yaml"))
    assert main(["run", *specs]) == 1
    out = capsys.readouterr()
    for case in cases(project.outside):
        assert case.expect in out.out, case.name
    assert "PASS good::scales[./ckpt]" in out.out
    for text in ("Traceback", SECRET, "\x1b"):
        assert text not in out.out + out.err
    project.unchanged()


# --------------------------------------------------------------------------- what the person running the suite gives


@pytest.fixture
def small(pytester, checkpoints, tmp_path_factory, monkeypatch) -> Path:
    """A project with one good spec on the tiny checkpoint (a `stable` claim among them) and nothing else."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hf-cache")))
    shutil.copytree(checkpoints / "ckpt", pytester.path / "ckpt")
    (pytester.path / "data.jsonl").write_text(DATA)
    pytester.path.joinpath("circuit_good.yaml").write_text(spec("good", CONTROL + "- stable: {nodes: 5, min_overlap: 0.5}\n"))
    return pytester.path


@pytest.mark.parametrize("model, reason", [
    ("checkpoints/step-2000", "no directory 'checkpoints/step-2000' exists"),  # typed without ./, and absent
    ("missing.gguf", "no such file"),
    ("ckpt_pickle", "holds only pickle weight files"),
    ("ckpt_empty", "has no config.json"),
    ("garbage.gguf", "could not be read as a GGUF model"),
    ("org/not-cached", "not in the local Hugging Face cache"),  # a hub id: skipped when a spec names it, not here
])
def test_a_model_given_on_the_command_line_that_cannot_load_fails(small, pytester, checkpoints, model, reason):
    shutil.copytree(checkpoints / "ckpt_pickle", small / "ckpt_pickle")
    (small / "ckpt_empty").mkdir()
    (small / "garbage.gguf").write_bytes(b"GGUF" + os.urandom(64))
    result = pytester.runpytest("-p", "no:cacheprovider", f"--circuit-model={model}")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([f"*{reason}*"])
    assert result.ret == 1 and "Traceback" not in result.stdout.str()


def test_strict_fails_a_hub_model_a_spec_names_that_is_not_cached(small, pytester):
    small.joinpath("circuit_hub.yaml").write_text(spec("hub", CONTROL, models="[org/not-cached]"))
    pytester.runpytest("-p", "no:cacheprovider", "circuit_hub.yaml").assert_outcomes(skipped=1)
    strict = pytester.runpytest("-p", "no:cacheprovider", "circuit_hub.yaml", "--circuit-strict")
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines(["*not in the local Hugging Face cache*--circuit-strict: a model that is not available fails*"])


@pytest.mark.parametrize("option, message", [
    ("--circuit-device=tpu", "Unknown device 'tpu'; use cpu, cuda, cuda:N"),
    ("--circuit-dtype=int3", "Unknown dtype 'int3'; use float32, bfloat16, float16"),
    ("--circuit-trust-remote-code=./ckpt", "a directory inside the project"),
    ("--circuit-trust-remote-code=no-such-thing", "names neither a Hugging Face id"),
])
def test_a_bad_option_is_a_usage_error_before_anything_runs(small, pytester, option, message):
    result = pytester.runpytest("-p", "no:cacheprovider", option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])
    assert "Traceback" not in result.stderr.str()


def test_outputs_go_into_missing_directories_and_one_failing_never_costs_another(small, pytester):
    result = pytester.runpytest("-p", "no:cacheprovider", "--circuit-update", "--circuit-report=out/deep/r.html")
    result.assert_outcomes(passed=2)
    assert result.ret == 0 and (small / "out" / "deep" / "r.html").is_file() and (small / "circuit_good.baseline.json").is_file()
    (small / "circuit_good.baseline.json").unlink()
    (small / "taken").mkdir()
    result = pytester.runpytest("-p", "no:cacheprovider", "--circuit-update", "--circuit-report=taken", "--circuit-json=r.json")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*NOT written: *taken: the report could not be written (Is a directory)*"])
    assert result.ret == 1  # an output not written fails the run...
    assert (small / "circuit_good.baseline.json").is_file() and (small / "r.json").is_file()  # ...and costs no other


def _read_only(path, write):  # as on a read-only file system (permissions do not stop root)
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))


@pytest.mark.parametrize("workers", [None, ["-n", "2"]], ids=["in-process", "xdist"])
def test_a_baseline_that_cannot_be_written_fails_the_run(small, pytester, monkeypatch, workers):
    if workers is None:
        monkeypatch.setattr("circuit_tests.spec.baselines.replace_atomically", _read_only)
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--circuit-update")
    else:  # xdist's workers hand their baselines to the controller, which writes them: patched there, by a conftest
        pytester.makeconftest("""
            import errno, os
            import circuit_tests.spec.baselines as baselines

            def read_only(path, write):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

            baselines.replace_atomically = read_only
        """)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--circuit-update", *workers)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*NOT written: *circuit_good.baseline.json: Read-only file system. Nothing was written*"])
    assert result.ret == 1 and not (small / "circuit_good.baseline.json").exists()


def test_an_update_keeps_the_file_mode_and_clears_a_killed_writers_temporaries(small, pytester):
    baseline = small / "circuit_good.baseline.json"
    pytester.runpytest("-p", "no:cacheprovider", "--circuit-update").assert_outcomes(passed=2)
    os.chmod(baseline, 0o644)
    stale = [small / ".circuit_good.baseline.json.dead.tmp", small / "circuit_good.baseline.jsonq1w2e3.tmp"]
    for path in stale:
        path.write_text("partial")
    before = baseline.read_bytes()
    pytester.runpytest("-p", "no:cacheprovider", "--circuit-update").assert_outcomes(passed=2)
    assert stat.S_IMODE(baseline.stat().st_mode) == 0o644
    assert baseline.read_bytes() == before  # the same measurement: the same bytes
    assert not any(path.exists() for path in stale)


def test_stable_reads_back_a_baseline_recorded_on_prompts_of_several_lengths(small, pytester):
    """Mixed lengths are measured batch by batch: a stored node that only the longer prompts reach is no error."""
    longer = "".join(json.dumps(line) + "\n" for singular, plural in PAIRS for line in (
        {"clean_prefix": f"The {singular} near the key", "patch_prefix": f"The {plural} near the key",
         "clean_answer": " is", "patch_answer": " are"},
        {"clean_prefix": f"The {plural} near the key", "patch_prefix": f"The {singular} near the key",
         "clean_answer": " are", "patch_answer": " is"}))
    (small / "data.jsonl").write_text(DATA + longer)
    small.joinpath("circuit_good.yaml").write_text(spec("good", CONTROL + "- stable: {nodes: 300, min_overlap: 0.9}\n"))
    pytester.runpytest("-p", "no:cacheprovider", "--circuit-update").assert_outcomes(passed=2)
    stored = json.loads((small / "circuit_good.baseline.json").read_text())["models"]["./ckpt"]["circuit"][:300]
    assert min(position for _, position, _, _ in stored) <= -4  # past the 3-token prompts: only the 6-token ones have it
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["good  ./ckpt  *1.00     passed (2/2)"])  # the overlap column


def test_a_baseline_counting_positions_from_the_first_token_is_read_where_it_can_be(small, pytester):
    """Entries recorded before positions counted from the end: renamed on prompts of one length, refused on several."""
    pytester.runpytest("-p", "no:cacheprovider", "--circuit-update").assert_outcomes(passed=2)
    path = small / "circuit_good.baseline.json"
    content = json.loads(path.read_text())
    entry = content["models"]["./ckpt"]
    assert entry.pop("align") == "end"  # as entries before 0.2: no align, positions from the first token
    entry["circuit"] = [[layer, position + 3, neuron, score] for layer, position, neuron, score in entry["circuit"]]  # 3 tokens
    path.write_text(json.dumps(content))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["good  ./ckpt  *1.00     passed (2/2)"])  # the same nodes, renamed
    longer = "".join(json.dumps({"clean_prefix": f"The {a} near the key", "patch_prefix": f"The {b} near the key",
                                 "clean_answer": " is", "patch_answer": " are"}) + "\n" for a, b in PAIRS)
    (small / "data.jsonl").write_text(DATA + longer)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*'s entry counts positions from the first token (trace.align, or an entry recorded before "
                                 "0.2), and the held-out prompts have 3 to 6 tokens, so its nodes cannot be placed*"])


def test_dropped_examples_are_counted_named_and_reported_everywhere(small, pytester):
    """Under task.max_dropped the spec runs, and the item, the terminal table and both reports say what was lost."""
    pairs = [(f"The {singular}", f"The {plural}", " is", " are") for singular, plural in PAIRS[:5]] + [("The key", "The keys of", " is", " are")]
    task = examples(*pairs).replace("  test_fraction: 0.5\n", "  test_fraction: 0.5\n  max_dropped: 0.2\n")
    small.joinpath("circuit_good.yaml").write_text(spec("good", CONTROL, task=task))
    result = pytester.runpytest("-p", "no:cacheprovider", "--circuit-json=r.json", "--circuit-report=r.html")
    result.assert_outcomes(passed=1)
    why = "circuit_good.yaml: task.examples[5]: the clean prefix is 3 tokens and the counterfactual 4, so positions do not align"
    result.stdout.fnmatch_lines(["spec  model   dropped  acc*", "good  ./ckpt  1  *passed (1/1)", f"good on ./ckpt dropped *{why.replace('[5]', '[[]5[]]')}"])
    row = json.loads((small / "r.json").read_text())["rows"][0]
    assert row["figures"]["n_dropped"] == 1 and [text.endswith(why) for text in row["figures"]["dropped"]] == [True]
    assert "note: 1 of 6 examples dropped for ./ckpt (" in row["results"][0]["message"]
    assert why in (small / "r.html").read_text()


def test_check_lists_what_a_run_would_drop_or_refuse_before_any_trace(small, monkeypatch, capsys):
    monkeypatch.chdir(small)
    lines = [json.dumps({"clean_prefix": a, "patch_prefix": b, "clean_answer": c, "patch_answer": d}) for a, b, c, d in (
        ("The author", "The authors", " is", " are"), ("The key", "The keys of", " is", " are"),
        ("The baker", "The bakers", " is are", " are"), ("The pilot", "The pilots", " is", " are"))]
    (small / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["check", "mixed.jsonl", "--model", "./ckpt"]) == 1  # an answer of two tokens stops a spec
    out = capsys.readouterr().out
    assert "mixed.jsonl:2: DROPPED: the clean prefix is 3 tokens and the counterfactual 4, so positions do not align" in out
    assert "    clean ['<bos>', 'The', 'key']\n    counterfactual ['<bos>', 'The', 'keys', 'of']\n" in out  # the tokens, to see why
    assert "mixed.jsonl:3: ERROR: clean_answer ' is are' is 2 tokens" in out
    assert "usable 2, dropped 1 (25.0%; task.max_dropped allows 10%), errors 1" in out
    assert "mixed.jsonl:1" not in out  # a usable pair is listed only with --all
    small.joinpath("circuit_good.yaml").write_text(spec("good", CONTROL, task=examples(
        ("The author", "The authors", " is", " are"), ("The key", "The keys of", " is", " are"))
        .replace("  test_fraction: 0.5\n", "  test_fraction: 0.5\n  max_dropped: 0.5\n")))
    assert main(["check", "circuit_good.yaml", "--all"]) == 0  # the spec's own model and its own max_dropped
    out = capsys.readouterr().out
    assert "task.examples[0]: ok" in out and "usable 1, dropped 1 (50.0%; task.max_dropped allows 50%), errors 0" in out


def test_diff_refuses_models_of_different_shapes(small, monkeypatch, capsys):
    save_tiny_checkpoint(small / "ckpt_wide", intermediate_size=128)
    monkeypatch.chdir(small)
    assert main(["diff", "circuit_good.yaml", "--models", "./ckpt", "./ckpt_wide"]) == 2
    captured = capsys.readouterr()
    assert "./ckpt has 3 layers x 96 neurons and ./ckpt_wide 3 x 128: their nodes are different neurons" in captured.err
    assert "Jaccard" not in captured.out


def test_two_spec_files_with_one_name_keep_two_report_rows(small, pytester):
    small.joinpath("circuit_twin.yaml").write_text(spec("good", CONTROL))
    result = pytester.runpytest("-p", "no:cacheprovider", "--circuit-json=r.json")
    rows = json.loads((small / "r.json").read_text())["rows"]
    assert sorted(Path(row["path"]).name for row in rows) == ["circuit_good.yaml", "circuit_twin.yaml"]
    result.stdout.fnmatch_lines(["good (*circuit_good.yaml)*", "good (*circuit_twin.yaml)*"])


def test_control_characters_in_any_message_are_escaped_everywhere(small, pytester):
    pytester.makeconftest("""
        import circuit_tests.spec.session as session
        from circuit_tests.errors import CircuitTestsError

        real_check = session.check

        def check(subject, expectation, baselines):
            raise CircuitTestsError("\\x1b[2J\\x1b[32m===== 99 passed =====\\x1b[0m")

        def pytest_configure(config):
            session.check = check

        def pytest_unconfigure(config):
            session.check = real_check
    """)
    small.joinpath("circuit_good.yaml").write_text(spec("good", CONTROL, extra="description: \"\\e[2J clears the screen\"\n"))
    result = pytester.runpytest("-p", "no:cacheprovider", "--junitxml=j.xml", "--circuit-json=r.json", "--circuit-report=r.html")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*\\x1b[[]2J\\x1b[[]32m===== 99 passed =====*"])
    for text in (result.stdout.str(), *(path.read_text() for path in (small / "j.xml", small / "r.json", small / "r.html"))):
        assert "\x1b" not in text


FORGED = "\n::error::forged\n::stop-commands::token"  # in a name: two workflow commands, each at the start of a line


def _commands(text: str) -> list[str]:
    """The lines GitHub Actions would run as workflow commands (its runner strips leading space), but our annotations."""
    return [line for line in text.splitlines() if line.lstrip().startswith("::") and not line.startswith("::error file=")]


def test_no_file_or_model_name_puts_a_workflow_command_on_a_line_of_its_own(small, pytester, monkeypatch, capsys):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(small / "summary.md"))
    (small / f"circuit_named{FORGED}.yaml").write_text(spec("named", CONTROL))
    (small / f"data{FORGED}.jsonl").write_text(DATA)
    (small / "linked.jsonl").symlink_to(small / f"data{FORGED}.jsonl")
    (small / f"cf{FORGED}.json").write_text("{}")
    named = {"dataset": f"task: {{dataset: {json.dumps(f'data{FORGED}.jsonl')}}}\n", "linked": "task: {dataset: linked.jsonl}\n"}
    for name, task in named.items():
        (small / f"circuit_{name}.yaml").write_text(spec(name, CONTROL, task=task))
    (small / "circuit_pinned.yaml").write_text(spec("pinned", f"- pinned: {{circuit: {json.dumps(f'cf{FORGED}.json')}, min_flip_rate: 0.5}}\n"))
    result = pytester.runpytest("-p", "no:cacheprovider", "-rA", "-v")
    result.stdout.fnmatch_lines_random([
        "*circuit_named\\x0a::error::forged\\x0a::stop-commands::token.yaml has a control character or a line break in its name*",
        "*circuit_dataset.yaml: 1 problem: field 'task.dataset': must not contain control characters or line breaks*",
        "*linked.jsonl has a control character or a line break in its name (or its link target's name)*rename the file*",
        "*circuit_pinned.yaml: 1 problem: field 'expect[[]0[]].pinned.circuit': must not contain control characters*",
        "::error file=circuit_linked.yaml,*"])  # failures are still annotated
    assert _commands(result.stdout.str() + result.stderr.str()) == []
    option = pytester.runpytest("-p", "no:cacheprovider", f"--circuit-model=./ckpt{FORGED}")
    assert option.ret == pytest.ExitCode.USAGE_ERROR
    option.stderr.fnmatch_lines(["*--circuit-model './ckpt\\n::error::forged\\n::stop-commands::token': a model name is one line*"])
    assert _commands(option.stdout.str() + option.stderr.str()) == []
    monkeypatch.chdir(small)
    assert main(["run", *sorted(path.name for path in small.glob("circuit_*.yaml"))]) == 1
    out = capsys.readouterr()
    assert "FAIL circuit_named\\x0a::error::forged\\x0a::stop-commands::token.yaml::spec[-]" in out.out
    assert _commands(out.out + out.err) == []


def test_repeated_examples_are_noted_and_a_held_out_repeat_of_a_training_one_fails(small, pytester):
    """A repeat on one side of the split is counted on the item; one held out and one traced on is refused."""
    (small / "data.jsonl").write_text(DATA + DATA.splitlines(keepends=True)[0])  # line 11 repeats line 1
    examples = read_jsonl(small / "data.jsonl")
    seed = next(seed for seed in range(100) if _splits(examples, seed))  # both copies on one side
    task = f"task: {{dataset: data.jsonl, test_fraction: 0.5, seed: {seed}}}\n"
    small.joinpath("circuit_good.yaml").write_text(spec("good", CONTROL, task=task))
    two = [line for line in DATA.splitlines(keepends=True)[:2]]
    (small / "two.jsonl").write_text("".join(two * 20))  # 2 distinct pairs, each written 20 times
    small.joinpath("circuit_two.yaml").write_text(spec("two", CONTROL, task="task: {dataset: two.jsonl}\n"))
    result = pytester.runpytest("-p", "no:cacheprovider", "--circuit-json=r.json")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*two.jsonl:*: this held-out example repeats *two.jsonl:*, a training example the circuit is "
                                 "traced on*(10 of 10 held-out examples repeat one; 38 examples in all repeat an earlier one)*"])
    row = next(row for row in json.loads((small / "r.json").read_text())["rows"] if row["spec"] == "good")
    assert row["figures"]["n_repeated"] == 1 and row["figures"]["repeated"][0].endswith("data.jsonl:11 repeats " + str(small / "data.jsonl:1"))
    assert "note: 1 of 11 examples repeat an earlier one (" in row["results"][0]["message"]


def _splits(examples: list, seed: int) -> bool:
    try:
        split(examples, 0.5, seed)
    except SpecError:
        return False
    return True


# --------------------------------------------------------------------------- the command line tool's own arguments


@pytest.mark.parametrize("args, message", [
    (["trace", "--dataset", "data.jsonl", "--top", "-5"], "argument --top: must be a whole number of at least 1, got '-5'"),
    (["trace", "--dataset", "data.jsonl", "--batch-size", "0"], "argument --batch-size: must be a whole number of at least 1"),
    (["trace", "--dataset", "data.jsonl", "--steps", "x"], "argument --steps: must be a whole number of at least 1, got 'x'"),
])
def test_trace_refuses_bad_numbers_before_any_work(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["trace", "--dataset", "data.jsonl", "--model", "./ckpt", "--json", "missing/out.json"], "cannot write missing/out.json: the directory"),
    (["run", "circuit_good.yaml", "--json", "missing/r.json"], "cannot write missing/r.json"),
    (["run", "circuit_good.yaml", "--device", "tpu"], "Unknown device 'tpu'"),
    (["trace", "--spec", "circuit_outside.yaml"], "field 'task.dataset' points to"),
    (["trace", "--spec", "../elsewhere.yaml"], "is outside"),
    (["new", "data.jsonl", "--name", "../../x"], "--name '../../x' is not a spec name"),
    (["new", "data.jsonl", "--name", "x", "--out", "../x.yaml"], "--out ../x.yaml is outside the project"),
    (["new", "data.jsonl", "--name", "x", "--out", "notes/x.yaml"], "--out notes/x.yaml: pytest would not collect it"),
    (["new", "equal.jsonl", "--name", "x"], "clean_answer and patch_answer are both ' is'"),
])
def test_the_command_line_refuses_with_a_paragraph_and_writes_nothing(small, monkeypatch, capsys, args, message):
    monkeypatch.chdir(small)
    (small / "equal.jsonl").write_text(json.dumps({"clean_prefix": "The author", "patch_prefix": "The authors",
                                                   "clean_answer": " is", "patch_answer": " is"}) + "\n")
    (small / "circuit_outside.yaml").write_text(spec("outside", CONTROL, task="task: {dataset: ../outside.jsonl}\n"))
    (small.parent / "elsewhere.yaml").write_text(spec("elsewhere", CONTROL))
    before = sorted(small.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert sorted(small.rglob("*")) == before
