"""MIB's curve and its areas (CPR, CMD): by hand on known curves, then on a tiny model against separate measurements."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from test_subject import loaded, project  # noqa: F401 -- the tiny model and its agreement data

from circuit_tests.analysis.areas import FRACTIONS, areas, sizes_for
from circuit_tests.errors import SpecError
from circuit_tests.spec.baselines import BaselineStore
from circuit_tests.spec.expectations import check
from circuit_tests.spec.schema import spec_from_mapping
from circuit_tests.spec.subject import Subject

pytest_plugins = ["pytester"]


def test_areas_of_curves_worked_out_by_hand():
    width = FRACTIONS[-1] - FRACTIONS[0]  # 0.999: the axis runs from 0.1% to 100% of the nodes
    assert areas([1.0] * 10) == pytest.approx((width, 0.0))
    assert areas([0.5] * 10) == pytest.approx((width / 2, width / 2))
    # zero up to 50%, then a jump to 1 at 100%: one trapezoid, from 0.5 to 1, of mean height 0.5
    assert areas([0.0] * 9 + [1.0]) == pytest.approx((0.25, width - 0.25))
    # overshooting by 0.2 everywhere counts against CMD as much as falling short by 0.2
    assert areas([1.2] * 10)[1] == pytest.approx(areas([0.8] * 10)[1]) == pytest.approx(0.2 * width)


def test_sizes_are_shares_of_every_node_rounded_down_as_mib_counts_them():
    assert sizes_for(1000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    assert sizes_for(1536)[:3] == [1, 3, 7]


def _subject(project, loaded, **area) -> Subject:  # noqa: F811
    raw = {"name": "agreement", "models": [str(project / "ckpt")], "task": {"dataset": "data.jsonl", "test_fraction": 0.5},
           "trace": {"ablation": "mean"}, "expect": [{"area": area or {"min_cpr": 0.5}}]}
    return Subject(spec_from_mapping(raw, project / "agreement.yaml", project), loaded)


@pytest.mark.parametrize("ranking", ["absolute", "signed"])
def test_the_curve_is_each_size_measured_alone_and_the_areas_are_its_trapezoids(project, loaded, ranking):  # noqa: F811
    subject = _subject(project, loaded, ranking=ranking, min_cpr=0.5)
    area = subject.area(ranking)
    assert area.sizes == sizes_for(subject.n_nodes) and area.ranking == ranking and area.ablation == "mean"
    key = subject.scores.scores.flatten()
    order = (key if ranking == "signed" else key.abs()).argsort(descending=True, stable=True)
    ranked = [node for node, _ in subject.scores.ranked(None, signed=ranking == "signed")]
    assert len(ranked) == int((key != 0).sum()) and ranked[:5] == [
        node for node, _ in subject.scores.ranked(5, signed=ranking == "signed")]
    assert [float(key[i]) for i in order[:5]] == [score for _, score in subject.scores.ranked(5, signed=ranking == "signed")]
    for size, value in zip(area.sizes[:6], area.faithfulness[:6]):
        alone = subject.faithfulness_curve(subject.circuit(size) if ranking == "absolute" else _signed(subject, size), [size],
                                           complement=False).faithfulness[0]
        # A curve's copies share their first positions on a key-value cache; a size alone runs them whole. Float32 summation
        # order differs (5e-6 measured, on ratios up to 2.3): 1e-5 allowed, where a wrong circuit moves a value by 0.1 or more.
        assert value == pytest.approx(alone, abs=1e-5) or (math.isnan(value) and math.isnan(alone))
    f = area.faithfulness
    by_hand = sum((FRACTIONS[i + 1] - FRACTIONS[i]) * (f[i] + f[i + 1]) / 2 for i in range(9))
    gap = sum((FRACTIONS[i + 1] - FRACTIONS[i]) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2 for i in range(9))
    assert area.cpr == pytest.approx(by_hand) and area.cmd == pytest.approx(gap)
    assert f[-1] == pytest.approx(1.0, abs=1e-5)  # every node with a score kept: the model itself
    assert area.cpr_interval[0] <= area.cpr <= area.cpr_interval[1] and area.cmd_interval[0] <= area.cmd <= area.cmd_interval[1]
    assert json.loads(json.dumps(subject.figures.to_json()))["areas"][ranking]["cpr"] == area.cpr


def _signed(subject: Subject, size: int):
    from circuit_tests.analysis.selection import top_k

    return top_k(subject.scores, size, signed=True)


def test_the_rankings_give_different_curves_on_the_same_scores(project, loaded):  # noqa: F811
    subject = _subject(project, loaded)
    absolute, signed = subject.area("absolute"), subject.area("signed")
    assert absolute.faithfulness != signed.faithfulness
    assert set(subject.figures.areas) == {"absolute", "signed"}


def test_an_area_claim_passes_and_fails_on_its_thresholds(project, loaded):  # noqa: F811
    measured = _subject(project, loaded).area()
    held = check(_subject(project, loaded, min_cpr=measured.cpr - 0.01), _only(project, loaded, min_cpr=measured.cpr - 0.01),
                 BaselineStore())
    assert held.passed and "CPR" in held.measured and "absolute ranking, mean ablation" in held.expected
    failed = check(_subject(project, loaded, max_cmd=measured.cmd / 2), _only(project, loaded, max_cmd=measured.cmd / 2),
                   BaselineStore())
    assert not failed.passed and f"CMD <= {measured.cmd / 2:g}"[:10] in failed.expected
    assert "faithfulness at each share of nodes" in failed.message


def test_an_area_claim_also_gives_cpr_and_cmd_as_mib_pairs_them(project, loaded):  # noqa: F811
    subject = _subject(project, loaded)
    outcome = check(subject, subject.spec.expectations[0], BaselineStore())
    signed, absolute = subject.figures.mib_pair
    assert (signed.ranking, absolute.ranking) == ("signed", "absolute") and signed.cpr != absolute.cpr
    assert (f"as MIB pairs them in its published tables (not judged): CPR {signed.cpr:.3f} (95% CI "
            f"{signed.cpr_interval[0]:.3f} to {signed.cpr_interval[1]:.3f}) from signed ranking, CMD {absolute.cmd:.3f}") in outcome.message


def _only(project, loaded, **area):  # noqa: F811
    return _subject(project, loaded, **area).spec.expectations[0]


def test_an_area_claim_without_a_bound_is_refused(project):  # noqa: F811
    raw = {"name": "a", "models": ["m"], "task": {"examples": [{"clean_prefix": "The author", "patch_prefix": "The authors",
           "clean_answer": " is", "patch_answer": " are"}] * 4}, "expect": [{"area": {"ranking": "signed"}}]}
    with pytest.raises(SpecError, match="give 'min_cpr', 'max_cmd' or both"):
        spec_from_mapping(raw, project / "a.yaml", project)


def test_circuit_areas_puts_cpr_and_cmd_in_the_reports(pytester, project):  # noqa: F811
    shutil.copytree(project / "ckpt", pytester.path / "ckpt")
    (pytester.path / "specs").mkdir()
    (pytester.path / "specs" / "agree.yaml").write_text("""name: agree
models: [../ckpt]
task: {dataset: ../data.jsonl, test_fraction: 0.5}
expect:
  - behaves: {min_accuracy: 0.6}
""")
    (pytester.path / "data.jsonl").write_text((project / "data.jsonl").read_text())
    result = pytester.runpytest_inprocess("specs", "--circuit-areas", "--circuit-json", "out.json", "--circuit-report", "r.html",
                                          "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*cpr/cmd*", "agree*0.*/0.*passed (1/1)"])
    area = json.loads((pytester.path / "out.json").read_text())["rows"][0]["figures"]["areas"]["absolute"]
    assert len(area["faithfulness"]) == len(FRACTIONS) and torch.isfinite(torch.tensor(area["cpr"]))
    page = (pytester.path / "r.html").read_text()
    assert "MIB&#x27;s CPR / CMD (absolute ranking, mean ablation)" in page
    signed, absolute = (json.loads((pytester.path / "out.json").read_text())["rows"][0]["figures"]["areas"][ranking]
                        for ranking in ("signed", "absolute"))
    assert (f"MIB&#x27;s CPR / CMD as MIB pairs them (CPR from signed ranking, CMD from absolute ranking, mean ablation)"
            f"</th><td>{signed['cpr']:.2f} (95% CI") in page and f"/ {absolute['cmd']:.2f} (95% CI" in page
