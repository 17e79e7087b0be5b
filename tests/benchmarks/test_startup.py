"""What installing circuit-tests costs a pytest run that has no circuit specs.

pytest loads the plugin in every run of an environment where circuit-tests is installed. Each run here
is pytest in a process of its own over one plain test, with the plugin and with ``-p no:circuit_tests``;
the plugin's share is the difference. ``tests/test_plugin.py`` checks that such a run never imports torch.
Figures in docs/benchmarks.md: ``pytest tests/benchmarks/test_startup.py --benchmark-enable``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

WAYS = {"with-plugin": [], "without-plugin": ["-p", "no:circuit_tests"]}


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.benchmark(group="pytest-startup-without-specs")
def test_a_plain_run(benchmark, way, tmp_path):
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    assert True\n")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *WAYS[way], "test_plain.py"]
    done = benchmark.pedantic(subprocess.run, (command,), {"cwd": tmp_path, "capture_output": True, "text": True},
                              rounds=5, iterations=1)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr
