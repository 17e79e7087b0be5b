"""The table of docs/method.md section 1: circuits traced on mixed-length SVA data, by trace.align.

    python docs/alignment_figures.py      # SmolLM2-135M-Instruct on CPU, about 10 minutes on 2 cores

A circuit traced on 64 `simple` plus 64 `nounpp` training pairs (2 and 5 tokens), lined up at the
end or at the start, is evaluated on each subset's held-out pairs against a circuit traced on that
subset alone: faithfulness of the top 30, 100 and 300 nodes under mean ablation.
"""

from __future__ import annotations

from pathlib import Path

from circuit_tests.analysis.attribution import AttributionOptions, attribute
from circuit_tests.analysis.measures import faithfulness_curve
from circuit_tests.analysis.selection import top_k
from circuit_tests.model.data import read_jsonl, split, tokenize_pairs
from circuit_tests.model.loading import load_model
from circuit_tests.model.sites import NeuronSites

ROOT = Path(__file__).resolve().parent.parent
SIZES = [30, 100, 300]


def main() -> None:
    loaded = load_model("smollm2-135m-instruct")
    sites = NeuronSites(loaded.model)
    parts = {}
    for name in ("simple", "nounpp"):
        train, test = split(read_jsonl(ROOT / "fixtures" / "sva" / f"{name}.jsonl"), 0.25, 0)
        parts[name] = (train[:64], tokenize_pairs(test[:80], loaded.tokenizer))

    def traced(examples, align: str):
        return attribute(sites, tokenize_pairs(examples, loaded.tokenizer).chunks(32), AttributionOptions(align=align))

    mixed = {align: traced(parts["simple"][0] + parts["nounpp"][0], align) for align in ("end", "start")}
    for name, (train, test) in parts.items():
        cells = []
        for scores in (traced(train, "end"), mixed["end"], mixed["start"]):
            curve = faithfulness_curve(sites, test, top_k(scores, max(SIZES)), SIZES, "mean")
            cells.append(" / ".join(f"{curve.faithfulness[curve.sizes.index(size)]:.3f}" for size in SIZES))
        print(f"| {name} ({test.n_examples} held out) | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
