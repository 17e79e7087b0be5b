"""Time attribution at the paper's scale on one GPU: a random model with Llama-3.1-8B's exact config.

    python ci/gpu_benchmark.py                      # bf16 on cuda, 300 paired examples, JSON to stdout
    python ci/gpu_benchmark.py --device cpu --dtype float32 --hidden-size 16 --layers 2 --examples 16   # smoke test

Real weights are not needed for timing: the model is ``circuit_tests.testing.scaled_llama_31_8b`` at
the real width, Llama-3.1-8B's exact shape (32 layers x 14336 neurons, hidden 4096) with random
weights, and the prompts are random token ids of SVA length (8 tokens, the patch prompt differing
at one position). Reported per stage: seconds
and peak GPU memory. Stages: plain forward+backward over every example (the reference), RelP
attribution over every example (goal: at most 1.4x the reference), a 10-point faithfulness curve
of the top 1000 nodes, and top-30 flip rates; 'spec' is the three together (goal: under 60 s on one H100).
Each stage runs ``--repeats`` times (default 3): a stage's "seconds" is its fastest run, the ratio and
the spec's total are taken from those, and "runs" lists every run, so one slow run shows rather than
deciding the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from circuit_tests.analysis.attribution import AttributionOptions, attribute  # noqa: E402
from circuit_tests.analysis.measures import faithfulness_curve, flip_rates  # noqa: E402
from circuit_tests.analysis.metrics import logit_diff  # noqa: E402
from circuit_tests.analysis.selection import top_k  # noqa: E402
from circuit_tests.model.data import PairedBatch, Tokenized  # noqa: E402
from circuit_tests.model.sites import NeuronSites  # noqa: E402
from circuit_tests.testing import LLAMA_31_8B, scaled_llama_31_8b  # noqa: E402

SIZES = (10, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000)


def random_pairs(n: int, vocab: int, length: int, batch_size: int) -> list[PairedBatch]:
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(vocab, (n, length), generator=generator)
    patch = clean.clone()
    patch[:, 2] = torch.randint(vocab, (n,), generator=generator)  # the "subject" token differs
    answers = torch.randint(vocab, (n, 2), generator=generator)
    examples = tuple(range(n))
    return [PairedBatch(clean[i:i + batch_size], patch[i:i + batch_size], answers[i:i + batch_size, 0],
                        answers[i:i + batch_size, 1], examples[i:i + batch_size]) for i in range(0, n, batch_size)]


def plain_forward_backward(model: transformers.PreTrainedModel, batches: list[PairedBatch]) -> None:
    embed = model.get_input_embeddings()
    for batch in batches:
        batch = batch.to(model.device)
        inputs = embed(batch.clean_ids).detach().requires_grad_(True)
        logit_diff(model(inputs_embeds=inputs, logits_to_keep=1).logits, batch).sum().backward()


def timed(stage: str, results: dict, args: argparse.Namespace, work) -> object:
    """Run ``work`` ``args.repeats`` times; record its fastest run, every run, and (on CUDA) the peak memory."""
    cuda = args.device.startswith("cuda")
    runs = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        value = work()
        if cuda:
            torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    results[stage] = {"seconds": min(runs), "runs": runs}
    if cuda:
        results[stage]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=LLAMA_31_8B["hidden_size"])
    parser.add_argument("--layers", type=int, default=LLAMA_31_8B["num_hidden_layers"])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each stage; its fastest is reported")
    args = parser.parse_args()

    model = scaled_llama_31_8b(LLAMA_31_8B["vocab_size"], args.hidden_size, layers=args.layers, dtype=getattr(torch, args.dtype),
                               device=args.device).requires_grad_(False)
    sites = NeuronSites(model)
    batches = random_pairs(args.examples, model.config.vocab_size, 8, args.batch_size)
    data = Tokenized(tuple(batches))
    results: dict = {}
    timed("warm-up", results, args, lambda: plain_forward_backward(model, batches[:1]))
    timed("forward+backward", results, args, lambda: plain_forward_backward(model, batches))
    scores = timed("relp attribution", results, args, lambda: attribute(sites, batches, AttributionOptions()))
    circuit = top_k(scores, max(SIZES))
    timed("faithfulness curve (10 sizes)", results, args, lambda: faithfulness_curve(sites, data, circuit, SIZES))
    timed("top-30 flips", results, args, lambda: flip_rates(sites, data, circuit, [30]))
    spec_seconds = sum(results[stage]["seconds"] for stage in ("relp attribution", "faithfulness curve (10 sizes)", "top-30 flips"))
    report = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": args.dtype, "examples": args.examples, "batch_size": args.batch_size, "repeats": args.repeats,
        "layers x neurons": f"{sites.n_layers} x {sites.n_neurons}", "hidden_size": args.hidden_size,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "stages": results,
        "attribution / forward+backward": results["relp attribution"]["seconds"] / results["forward+backward"]["seconds"],
        "spec seconds (attribution + curve + flips)": spec_seconds,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
