"""The HTML report as a real browser shows it: headless Chromium (Debian's ``chromium``) via ci/screenshot.sh.

Skipped where Chromium is not installed (``apt-get install chromium``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from circuit_tests.model.series import Checkpoint
from circuit_tests.spec.report import Report, payload

SCRIPT = Path(__file__).resolve().parents[1] / "ci" / "screenshot.sh"
pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)")

FAITHFULNESS_BLUE, COMPLETENESS_RED, PASSED_GREEN = (0x1F, 0x6F, 0xEB), (0xD1, 0x24, 0x2F), (0x17, 0x80, 0x3D)


def _pixels_near(image: Image.Image, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    return sum(count for count, pixel in image.getcolors(1 << 24) if all(abs(a - b) <= tolerance for a, b in zip(pixel, colour)))


def test_chromium_renders_the_curve_the_tables_and_the_outcomes(tmp_path):
    report = Report()
    figures = {"accuracy": 0.95, "nodes_for_0.8": 70.0, "flip_rate": {"30": 1.0}, "top": [[3, 1, 77, -0.5]],
               "curve": {"sizes": [10, 30, 100, 300], "faithfulness": [0.2, 0.6, 0.9, 1.0], "completeness": [0.7, 0.4, 0.1, 0.0]}}
    result = payload("sva-simple", "m", Path("specs/s.yaml"), "sparse") | {"figures": figures}
    report.add(result, "passed", "expected: ...")
    report.add(result | {"expectation": "flips"}, "failed", "expected: flips\nmeasured: 0.1")
    page, png = tmp_path / "report.html", tmp_path / "report.png"
    report.write_html(page)

    dom = subprocess.run([str(SCRIPT), str(page), str(png), "900,700"], capture_output=True, text=True, check=True).stdout

    assert dom.count("<polyline") == 2 and "sva-simple [m]" in dom
    image = Image.open(png).convert("RGB")
    assert image.size == (900, 700)
    assert _pixels_near(image, FAITHFULNESS_BLUE) > 300  # the faithfulness line, drawn across the plot
    assert _pixels_near(image, COMPLETENESS_RED) > 300  # the completeness line and the 'failed' labels
    assert _pixels_near(image, PASSED_GREEN) > 20  # the 'passed' cell


def test_an_empty_report_renders_its_notice(tmp_path):
    page, png = tmp_path / "empty.html", tmp_path / "empty.png"
    Report().write_html(page)
    dom = subprocess.run([str(SCRIPT), str(page), str(png), "600,300"], capture_output=True, text=True, check=True).stdout
    assert "No circuit specs ran." in dom and Image.open(png).size == (600, 300)


def test_chromium_renders_a_series_trend_with_its_thresholds_and_first_failure(tmp_path):
    series = [Checkpoint(f"ckpts/step-{step}", step) for step in (0, 1000, 2000, 3000)]
    report = Report(series)
    for checkpoint, overlap, failed in zip(series, (1.0, 0.8, 0.4, 0.3), (False, False, True, True)):
        result = payload("sva-simple", checkpoint.name, Path("specs/s.yaml"), "stable") | {
            "figures": {"accuracy": 1.0 - overlap / 10, "overlap": overlap}, "watches": {"overlap": 0.5}}
        report.add(result, "failed" if failed else "passed", "expected: overlap >= 0.50")
    page, png = tmp_path / "trend.html", tmp_path / "trend.png"
    report.write_html(page)

    dom = subprocess.run([str(SCRIPT), str(page), str(png), "900,500"], capture_output=True, text=True, check=True).stdout

    assert "sva-simple over 4 checkpoints" in dom and "first failure: stable at ckpts/step-2000 (step 2000)" in dom
    assert "aria-label=\"accuracy\"" in dom and "aria-label=\"overlap with the baseline\"" in dom
    image = Image.open(png).convert("RGB")
    assert _pixels_near(image, FAITHFULNESS_BLUE) > 200  # the two trend lines and the passing checkpoints
    assert dom.count('fill="#d1242f"') == 2  # on the overlap panel, the two checkpoints where stable failed
    assert _pixels_near(image, COMPLETENESS_RED) > 40  # those two dots and the first failure's marker
