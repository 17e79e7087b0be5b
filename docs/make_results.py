"""Reproduce the paper's claims on SmolLM2-135M-Instruct and write docs/results.md and the plot.

    python docs/make_results.py            # about 30 minutes on 2 CPU cores

Deterministic: seeded splits, float32 on CPU. Subject-verb agreement: attribution on at most
TRAIN examples of each subset, evaluation on TEST held-out examples, mean ablation. Multi-hop:
landmark -> country -> capital pairs, attribution on train pairs, steering on test pairs.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from circuit_tests.analysis.attribution import AttributionOptions, attribute  # noqa: E402
from circuit_tests.analysis.measures import accuracy, faithfulness_curve, flip_rates, multiplier_sweep, nodes_for, patch_success  # noqa: E402
from circuit_tests.analysis.selection import top_k  # noqa: E402
from circuit_tests.analysis.stats import bootstrap  # noqa: E402
from circuit_tests.model.data import PairedBatch, PairedExample, read_jsonl, split, tokenize_pairs  # noqa: E402
from circuit_tests.model.interventions import intervene, scale  # noqa: E402
from circuit_tests.model.loading import load_model  # noqa: E402
from circuit_tests.model.nodes import Circuit  # noqa: E402
from circuit_tests.model.sites import (
    NeuronSites,  # noqa: E402
    next_token_logits,  # noqa: E402
)

ROOT = Path(__file__).resolve().parent.parent
SUBSETS = ("simple", "nounpp", "rc", "within_rc")
METHODS = ("relp", "atp", "ig")
SIZES = (10, 20, 30, 50, 100, 200, 300, 500, 1000, 2000)
REPORTED = (10, 30, 100, 300, 1000)
TRAIN, TEST, BATCH = 128, 40, 32
IG_TRAIN = 32  # IG costs a forward and backward over 10 copies per layer: 300x AtP on CPU
FACTORS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def sva_section(sites: NeuronSites, tokenizer, lines: list[str], figure) -> None:
    lines += ["## Subject-verb agreement", "", f"Attribution on up to {TRAIN} training pairs per subset "
              f"({IG_TRAIN} for `ig`, whose cost is 300 forward-backward passes per batch), evaluation on {TEST} "
              "held-out pairs (seed 0), mean ablation, nodes = (layer, position, neuron). Completeness has a 95% "
              "bootstrap interval over test examples.", ""]
    summary = ["| subset | pairs kept | test accuracy | method | faithfulness at " + " / ".join(map(str, REPORTED))
               + " nodes | nodes for 0.8 | completeness of that circuit | flip rate top 30 / 100 |", "|" + "---|" * 8]
    for index, subset in enumerate(SUBSETS):
        examples = read_jsonl(ROOT / "fixtures" / "sva" / f"{subset}.jsonl")
        kept = tokenize_pairs(examples, tokenizer).examples
        train, test = split(kept, TEST / len(kept), seed=0)
        train, test_data = train[:TRAIN], tokenize_pairs(test, tokenizer)
        test_accuracy = accuracy(sites, test_data)
        axis = figure.axes[index]
        for method in METHODS:
            started = time.time()
            used = train[:IG_TRAIN] if method == "ig" else train
            scores = attribute(sites, tokenize_pairs(used, tokenizer).chunks(BATCH), AttributionOptions(method=method))
            circuit = top_k(scores, max(SIZES))
            curve = faithfulness_curve(sites, test_data, circuit, SIZES)
            faithful = dict(zip(SIZES, curve.faithfulness))
            needed = nodes_for(0.8, lambda sizes: faithfulness_curve(sites, test_data, circuit, sizes, complement=False)
                               .faithfulness, SIZES)
            completeness = _completeness_at(sites, test_data, circuit, needed)
            flips = flip_rates(sites, test_data, circuit, [30, 100]).mean(1).tolist()
            summary.append(
                f"| {subset} | {len(kept)}/{len(examples)} | {test_accuracy:.2f} | {method} | "
                + " / ".join(f"{faithful[s]:.2f}" for s in REPORTED)
                + f" | {_fmt(needed)} | {completeness} | {flips[0]:.2f} / {flips[1]:.2f} |"
            )
            axis.plot(SIZES, curve.faithfulness, marker="o", label=method)
            print(f"{subset} {method}: {time.time() - started:.0f} s", file=sys.stderr)
        axis.set(title=f"{subset} (test acc. {test_accuracy:.2f})", xscale="log", xlabel="nodes", ylabel="faithfulness")
        axis.axhline(0.8, color="grey", lw=0.5)
        axis.legend()
    lines += summary + ["", "![Faithfulness curves](faithfulness.png)", ""]


def _completeness_at(sites, data, circuit: Circuit, needed: int | None) -> str:
    if needed is None:
        return "n/a"
    curve = faithfulness_curve(sites, data, circuit, [needed])
    low, high = bootstrap(lambda c, m, e: (c.mean(-1) - e.mean(-1)) / (m.mean(-1) - e.mean(-1)),
                          [curve.complement[0], curve.per_example[-2], curve.per_example[-1]])
    return f"{curve.completeness[0]:.2f} [{low:.2f}, {high:.2f}]"


def _fmt(value: int | None) -> str:
    return "not reached" if value is None else str(value)


def multihop_section(sites: NeuronSites, tokenizer, lines: list[str]) -> None:
    items = [json.loads(line) for line in (ROOT / "fixtures" / "multihop" / "landmarks.jsonl").read_text().splitlines() if line]
    correct = [item for item in items if _single(tokenizer, item["answer"]) and _top1(sites, tokenizer, item["prompt"]) == item["answer"]]
    pairs = [
        PairedExample(a["prompt"], b["prompt"], a["answer"], b["answer"], f"{a['landmark']} <- {b['landmark']}")
        for a, b in itertools.permutations(correct, 2) if a["country"] != b["country"]
    ]
    data = tokenize_pairs(pairs, tokenizer)
    train, test = split(data.examples, 0.3, seed=0)
    test_data = tokenize_pairs(test, tokenizer)
    scores = attribute(sites, tokenize_pairs(train, tokenizer).chunks(BATCH), AttributionOptions(method="relp"))
    circuit = top_k(scores, 1000, aggregate=True)
    success = patch_success(sites, test_data, circuit, [10, 30, 100, 300, 1000])
    lines += ["## Multi-hop: landmark -> country -> capital", "",
              f"SmolLM2 answers {len(correct)} of {len(items)} landmark prompts correctly with a one-token capital "
              f"({', '.join(item['landmark'] for item in correct)}). Pairs of such prompts from different countries with "
              f"equal token length: {data.n_examples} ({len(train)} to attribute with RelP on "
              "`logit(source capital) - logit(own capital)`, "
              f"{test_data.n_examples} held out). Circuit: the top (layer, neuron) pairs aggregated over positions, "
              "patched at every position with their values from the source prompt.", "",
              "| neurons patched | answer becomes the source's capital (95% CI) |", "|---|---|"]
    for size, row in zip([10, 30, 100, 300, 1000], success):
        low, high = bootstrap(lambda r: r.mean(-1), [row])
        lines.append(f"| {size} | {row.mean():.2f} [{low:.2f}, {high:.2f}] |")
    lines += ["", *_sweep(sites, tokenizer, correct)]


def _sweep(sites: NeuronSites, tokenizer, correct: list[dict]) -> list[str]:
    """Find the neurons that push towards the right capital on every prompt, then scale them."""
    by_length: dict[int, list[dict]] = {}
    for item in correct:
        by_length.setdefault(len(tokenizer(item["prompt"]).input_ids), []).append(item)
    batches = [_unpaired(tokenizer, group) for group in by_length.values()]
    scores = attribute(sites, batches, AttributionOptions(method="relp", metric="target_logit", baseline="zero"))
    top = top_k(scores, 3, aggregate=True)
    neurons = Circuit.from_neurons([[layer, neuron] for layer, _, neuron in top.nodes], position=-1)
    rows = ["### Multiplier sweep on the strongest 'say the capital' neurons", "",
            f"Neurons (layer/neuron): {', '.join(f'L{l}/N{n}' for l, _, n in neurons.nodes)}, the top three by "
            "RelP relevance for the correct capital's logit (zero baseline, summed over positions), scaled at the "
            "last position. Mean over the correct prompts:", "",
            "| factor | P(correct capital) | top-1 accuracy |", "|---|---|---|"]
    for factor in FACTORS:
        probs, hits = [], []
        for batch in batches:
            answers = batch.clean_answer.tolist()
            probs.append(multiplier_sweep(sites, batch.clean_ids, neurons, [factor], answers)[0].diagonal())
            hits.append(_argmax_hits(sites, batch, neurons, factor))
        rows.append(f"| {factor:g} | {torch.cat(probs).mean():.3f} | {torch.cat(hits).float().mean():.2f} |")
    return rows + [""]


def _argmax_hits(sites: NeuronSites, batch: PairedBatch, neurons: Circuit, factor: float) -> torch.Tensor:
    with torch.no_grad(), intervene(sites, [scale(neurons, factor)]):
        return next_token_logits(sites.model, batch.clean_ids)[:, -1].argmax(-1) == batch.clean_answer


def _unpaired(tokenizer, items: list[dict]) -> PairedBatch:
    """Prompts without a counterfactual; the answer is the target of the ``target_logit`` metric."""
    ids = torch.tensor([tokenizer(item["prompt"]).input_ids for item in items])
    answers = torch.tensor([tokenizer(item["answer"], add_special_tokens=False).input_ids[0] for item in items])
    return PairedBatch(ids, ids, answers, answers, tuple(items))


def _single(tokenizer, answer: str) -> bool:
    return len(tokenizer(answer, add_special_tokens=False).input_ids) == 1


@torch.no_grad()
def _top1(sites: NeuronSites, tokenizer, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    return tokenizer.decode(sites.model(ids, logits_to_keep=1).logits[0, -1].argmax())


def main() -> None:
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m-instruct")
    sites = NeuronSites(loaded.model)
    lines = ["# Results", "", "Generated by `python docs/make_results.py` on SmolLM2-135M-Instruct, CPU, float32. "
             "Do not edit by hand. How well each attribution method predicts exact patching: "
             "[attribution-vs-patching.md](attribution-vs-patching.md).", ""]
    figure, _ = plt.subplots(1, len(SUBSETS), figsize=(5 * len(SUBSETS), 4), constrained_layout=True)
    sva_section(sites, loaded.tokenizer, lines, figure)
    figure.savefig(ROOT / "docs" / "faithfulness.png", dpi=110)
    multihop_section(sites, loaded.tokenizer, lines)
    lines += mib_section()
    (ROOT / "docs" / "results.md").write_text("\n".join(lines) + "\n")


def mib_section() -> list[str]:
    """MIB's areas and the random-circuit controls of every shipped spec (fixtures/measure_mib.py)."""
    spec = importlib.util.spec_from_file_location("measure_mib", ROOT / "fixtures" / "measure_mib.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.markdown(module.measure_all())


if __name__ == "__main__":
    main()
