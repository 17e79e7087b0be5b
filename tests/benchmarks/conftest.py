"""What the memory benchmarks share: measuring a script's peak RSS in a fresh process.

glibc's malloc keeps freed blocks and raises its mmap threshold as it goes, so with its defaults
the same run's peak RSS varied by 70 MiB (1223 to 1293 MiB) and CI once saw 119 MiB between two
runs of one size. A fixed mmap threshold hands large blocks back to the system when they are
freed, so peak RSS follows the memory in use: nine runs of each size peaked between 1087 and
1091 MiB. The script prints one JSON line last (``examples``, ``peak_mib``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


@pytest.fixture
def peak_rss() -> Callable[..., dict]:
    """``peak_rss(script, *args)``: the JSON line ``python -c script args...`` prints last, under the fixed allocator."""

    def measure(script: str, *args: object) -> dict:
        command = [sys.executable, "-c", script, *map(str, args)]
        run = subprocess.run(command, capture_output=True, text=True, check=True, env={**os.environ, **ALLOCATOR})
        return json.loads(run.stdout.strip().splitlines()[-1])

    return measure
