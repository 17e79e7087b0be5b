"""Run the paper's Llama-3.1-8B specs end to end on one GPU, on a random model of Llama-3.1-8B's exact shape.

    python ci/gpu_specs.py                          # bf16 on cuda; the JSON report's rows, abridged, to stdout
    python ci/gpu_specs.py --device cpu --dtype float32 --hidden-size 16   # smoke test (the model of tests/test_llama_specs.py)

``ci/gpu_benchmark.py`` times the library's stages; this times what a user runs: ``pytest specs/llama-3.1-8b``
through the plugin, model loading, data, trace and every claim included. The checkpoint is
``circuit_tests.testing.scaled_llama_31_8b`` at the real width (hidden 4096, 32 x 14336 neurons) and the
vocabulary of the tokenizer saved beside it: SmolLM2's from the cache, or ``--tokenizer DIR``.
SmolLM2's tokenizer splits more names than Llama's, so the specs are run from a copy in which the
two multi-hop specs allow dropping 60% of their pairs (as ``tests/test_llama_specs.py`` does); random
weights mean claims fail, so what counts is that every item was measured, none crashed, and the time.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from circuit_tests.model.loading import checkpoint_dir  # noqa: E402
from circuit_tests.model.references import parse_model_ref  # noqa: E402
from circuit_tests.testing import LLAMA_31_8B, scaled_llama_31_8b  # noqa: E402

FOLDERS = ("specs/llama-3.1-8b", "fixtures/multihop", "fixtures/sva")
MULTI_HOP = ("state_capitals.yaml", "texas_california.yaml")


def checkpoint(args: argparse.Namespace, path: Path) -> None:
    """A random Llama-3.1-8B-shaped checkpoint at ``path``, with its tokenizer."""
    folder = args.tokenizer or checkpoint_dir(parse_model_ref("smollm2-135m-instruct"))  # SmolLM2's, converted once, not loaded
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    scaled_llama_31_8b(len(tokenizer), args.hidden_size, dtype=getattr(torch, args.dtype), device=args.device).save_pretrained(path)
    tokenizer.save_pretrained(path)


def copy_specs(folder: Path) -> None:
    for name in FOLDERS:
        shutil.copytree(ROOT / name, folder / name)
    for name in MULTI_HOP:
        spec = folder / "specs" / "llama-3.1-8b" / name
        spec.write_text(spec.read_text().replace("\n  seed: 0\n", "\n  seed: 0\n  max_dropped: 0.6\n", 1))


def outcomes(stdout: str) -> dict[str, int]:
    """pytest's closing counts: ``{"failed": 19, "passed": 3}``."""
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    return {word: int(count) for count, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", last)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--hidden-size", type=int, default=LLAMA_31_8B["hidden_size"])
    parser.add_argument("--tokenizer", metavar="DIR", help="a tokenizer folder (default: SmolLM2's, from the cache)")
    parser.add_argument("--json", metavar="PATH", type=Path, help="keep pytest's whole JSON report (--circuit-json) there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        checkpoint(args, work / "model")
        built = time.perf_counter() - start
        copy_specs(work)
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "pytest", "specs/llama-3.1-8b", f"--circuit-model={work / 'model'}",
                              f"--circuit-device={args.device}", "--circuit-json=report.json", "-p", "no:cacheprovider", "-q"],
                             cwd=work, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        report = work / "report.json"
        rows = json.loads(report.read_text())["rows"] if report.exists() else []
        if args.json and report.exists():
            shutil.copyfile(report, args.json)
    print(json.dumps({
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "dtype": args.dtype,
        "hidden_size": args.hidden_size, "checkpoint seconds (build and save)": round(built, 1),
        "pytest seconds": round(seconds, 1), "pytest summary": run.stdout.strip().splitlines()[-1:], "outcomes": outcomes(run.stdout),
        "crashed": "Traceback" in run.stdout, "exit code": run.returncode,
        "specs": {row["spec"]: {"n_test": row["figures"].get("n_test"), "timings": row["figures"].get("timings")} for row in rows},
    }, indent=1))


if __name__ == "__main__":
    main()
