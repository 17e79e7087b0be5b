"""ci/gpu_benchmark.py keeps working: its CPU smoke mode runs every stage and reports each one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "ci" / "gpu_benchmark.py"


def test_the_smoke_mode_times_every_stage():
    args = ["--device", "cpu", "--dtype", "float32", "--hidden-size", "16", "--layers", "2", "--examples", "8", "--batch-size", "4", "--repeats", "2"]
    report = json.loads(subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=True).stdout)
    assert report["layers x neurons"] == "2 x 14336"  # Llama-3.1-8B's MLP width
    assert set(report["stages"]) == {"warm-up", "forward+backward", "relp attribution", "faithfulness curve (10 sizes)", "top-30 flips"}
    assert all(len(stage["runs"]) == 2 and stage["seconds"] == min(stage["runs"]) > 0 for stage in report["stages"].values())
    assert report["attribution / forward+backward"] > 0
