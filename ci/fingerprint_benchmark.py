"""Time the content fingerprint of an 8B-sized checkpoint: Llama-3.1-8B's tensors in bfloat16, 16 GB in 4 shards.

    python ci/fingerprint_benchmark.py                       # JSON to stdout; the checkpoint is deleted afterwards
    python ci/fingerprint_benchmark.py --layers 2 --rounds 1 # smoke test (about 2.6 GB)

``load_model`` takes a checkpoint's fingerprint (:mod:`circuit_tests.model.fingerprints`) once per loaded
model; this is what that costs at the scale of the paper's model. The checkpoint is written on the fly to a
temporary directory, as ``save_pretrained`` would shard it (at most 5 GB a shard, with an index): every
tensor of Llama-3.1-8B (names and shapes from transformers' own model, built on the meta device), its bytes
a repeated random block, with config.json and the tiny tokenizer; nothing is held whole in memory. Each
round reads the files once without hashing (what the disk and page cache allow) and once as the fingerprint
does; seconds and GB/s of each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from circuit_tests.model.fingerprints import fingerprint  # noqa: E402
from circuit_tests.testing import LLAMA_31_8B, tiny_tokenizer  # noqa: E402

SHARD_BYTES = 5 * 10**9  # save_pretrained's default max_shard_size
BLOCK = os.urandom(64 * 2**20)


def write_checkpoint(directory: Path, layers: int) -> int:
    """Write a Llama-3.1-8B-shaped bfloat16 checkpoint of ``layers`` layers to ``directory``; its weights' bytes."""
    config = AutoConfig.for_model("llama", **{**LLAMA_31_8B, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shards: list[list[tuple[str, list[int]]]] = [[]]
    size = 0
    for name, tensor in model.state_dict().items():
        if size and size + 2 * tensor.numel() > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, list(tensor.shape)))
        size += 2 * tensor.numel()
    weight_map, total = {}, 0
    for number, tensors in enumerate(shards, 1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        total += _write_safetensors(directory / file, tensors)
        weight_map.update({name: file for name, _ in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return total


def _write_safetensors(path: Path, tensors: list[tuple[str, list[int]]]) -> int:
    """A safetensors file of bfloat16 ``tensors`` written as a stream; the bytes of its data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        end = offset + 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, end]}
        offset = end
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        left = offset
        while left:
            left -= out.write(memoryview(BLOCK)[: min(left, len(BLOCK))])
    return offset


def read_only(directory: Path) -> int:
    """Read every file once, 16 MiB at a time, without hashing; the bytes read."""
    total = 0
    for path in sorted(directory.iterdir()):
        with path.open("rb", buffering=0) as file:
            while chunk := file.read(16 * 2**20):
                total += len(chunk)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=LLAMA_31_8B["num_hidden_layers"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--directory", type=Path, default=None, help="where to write it (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.directory, prefix="fingerprint-8b-") as tmp:
        directory = Path(tmp)
        started = time.perf_counter()
        weights = write_checkpoint(directory, args.layers)
        written = time.perf_counter() - started
        files = sum(path.stat().st_size for path in directory.iterdir())
        rounds = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            read_only(directory)
            read = time.perf_counter() - started
            started = time.perf_counter()
            fingerprint(directory, [directory])
            hashed = time.perf_counter() - started
            rounds.append({"read_s": round(read, 2), "read_GB_per_s": round(files / read / 1e9, 2),
                           "fingerprint_s": round(hashed, 2), "fingerprint_GB_per_s": round(files / hashed / 1e9, 2)})
    print(json.dumps({"layers": args.layers, "weights_bytes": weights, "files_bytes": files, "write_s": round(written, 1),
                      "rounds": rounds, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                      "machine": platform.processor() or platform.machine(), "python": platform.python_version()}, indent=1))


if __name__ == "__main__":
    main()
