"""ci/gpu_benchmark.py keeps working: its CPU smoke mode runs every stage and reports each one."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "ci" / "gpu_benchmark.py"


def test_the_smoke_mode_times_every_stage(monkeypatch, capsys):
    args = ["--device", "cpu", "--dtype", "float32", "--hidden-size", "16", "--layers", "2", "--examples", "8", "--batch-size", "4",
            "--repeats", "2"]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repository first
    runpy.run_path(str(SCRIPT), run_name="__main__")  # in this process: no second start of torch
    report = json.loads(capsys.readouterr().out)
    assert report["layers x neurons"] == "2 x 14336"  # Llama-3.1-8B's MLP width
    assert set(report["stages"]) == {"warm-up", "forward+backward", "relp attribution", "faithfulness curve (10 sizes)", "top-30 flips"}
    assert all(len(stage["runs"]) == 2 and stage["seconds"] == min(stage["runs"]) > 0 for stage in report["stages"].values())
    assert report["attribution / forward+backward"] > 0
