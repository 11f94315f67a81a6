"""Means with intervals, the findings' verdicts, and `lopd compare --toy --seeds N` end to end."""

import csv
import json
import math

import pytest
from conftest import run_lopd

from lightning_opd.reporting.findings import (
    FINDINGS,
    MARKER_END,
    MARKER_START,
    by_method,
    findings_markdown,
    judge,
    replace_between_markers,
)
from lightning_opd.reporting.stats import mean_ci


def test_mean_ci_matches_the_t_interval_by_hand():
    ci = mean_ci([0.70, 0.74, 0.78])
    sd = math.sqrt(((0.04) ** 2 + 0 + (0.04) ** 2) / 2)
    assert ci.mean == pytest.approx(0.74)
    assert ci.half_width == pytest.approx(4.303 * sd / math.sqrt(3))
    assert ci.format() == f"74.0 ± {100 * ci.half_width:.1f}"
    single = mean_ci([0.5])
    assert math.isnan(single.half_width) and single.format() == "50.0"
    with pytest.raises(ValueError):
        mean_ci([])


def _rows(method, accuracies, seconds=10.0):
    return [
        {"method": method, "seed": s, "status": "ok", "accuracy": a, "total_s": seconds}
        for s, a in enumerate(accuracies)
    ]


def test_verdicts_follow_the_paired_interval():
    equal = next(f for f in FINDINGS if f.a == "topd-10")
    better = next(f for f in FINDINGS if f.a == "opd+-fkl")
    rows = _rows("lightning", [0.70, 0.75, 0.80]) + _rows("topd-10", [0.71, 0.75, 0.81])
    assert judge(equal, by_method(rows), 0.05)["verdict"] == "yes"  # Δ = +0.7 ± 0.7 points
    rows = _rows("lightning", [0.70, 0.75, 0.80]) + _rows("topd-10", [0.50, 0.56, 0.59])
    assert judge(equal, by_method(rows), 0.05)["verdict"] == "no"
    rows = _rows("opd+-fkl", [0.6, 0.7, 0.65]) + _rows("opd+-fkl-sg", [0.0, 0.01, 0.0])
    assert judge(better, by_method(rows), 0.05)["verdict"] == "yes"
    rows = _rows("opd+-fkl", [0.6, 0.1, 0.65]) + _rows("opd+-fkl-sg", [0.5, 0.5, 0.5])
    assert judge(better, by_method(rows), 0.05)["verdict"] == "inconclusive"
    faster = FINDINGS[0]
    rows = _rows("lightning", [0.7, 0.72, 0.71], 30) + _rows("online", [0.7, 0.71, 0.71], 90)
    assert judge(faster, by_method(rows), 0.05)["verdict"] == "yes"
    rows = _rows("lightning", [0.7, 0.72, 0.71], 90) + _rows("online", [0.7, 0.71, 0.71], 30)
    assert judge(faster, by_method(rows), 0.05)["verdict"] == "no (not faster)"
    assert judge(faster, by_method(_rows("lightning", [0.7])), 0.05) is None
    at_least = next(f for f in FINDINGS if f.a == "online-stableopd")
    rows = _rows("online", [0.50, 0.55, 0.60]) + _rows("online-stableopd", [0.80, 0.85, 0.90])
    assert judge(at_least, by_method(rows), 0.05)["verdict"] == "yes"  # far better is still ≥
    rows = _rows("online", [0.80, 0.85, 0.90]) + _rows("online-stableopd", [0.50, 0.55, 0.60])
    assert judge(at_least, by_method(rows), 0.05)["verdict"] == "no"


def test_readme_table_is_replaced_between_markers_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{MARKER_START}\nold table\n{MARKER_END}\n\ntail\n")
    replace_between_markers(readme, "new table")
    assert readme.read_text() == f"# title\n\n{MARKER_START}\nnew table\n{MARKER_END}\n\ntail\n"
    bare = tmp_path / "bare.md"
    bare.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        replace_between_markers(bare, "x")
    table = findings_markdown(_rows("sft", [0.5, 0.5]) + _rows("lightning", [0.6, 0.7]))
    assert "not run" in table and "over 2 seeds" in table


def test_compare_toy_over_seeds_end_to_end(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{MARKER_START}\n{MARKER_END}\n")
    out = tmp_path / "compare"
    result = run_lopd(
        "compare", "--toy", "--micro", "--seeds", 2, "--methods", "sft,lightning,topd-10,online,inconsistent",
        "--out", out, "--readme", readme, "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert sorted({(r["seed"], r["method"]) for r in rows}) == sorted(
        (str(s), m) for s in (0, 1) for m in ("sft", "lightning", "topd-10", "online", "inconsistent")
    )
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert (out / "seed-1" / "store" / "manifest.json").exists()
    # the control: the same rollouts, scored by a second (sum-first) teacher and recorded as inconsistent
    other = json.loads((out / "seed-1" / "store-other-teacher" / "manifest.json").read_text())
    assert other["teacher_consistency"]["consistent"] is False and other["teacher_consistency"]["allowed"]
    assert any("sum_first" in p.name for p in (tmp_path / "cache").iterdir())
    text = readme.read_text()
    assert (
        "Teacher consistency" in text
        and "TOPD at 10% of the horizon" in text
        and "over 2 seeds" in text
        and "| lightning |" in text
    )
    assert "regenerated the findings table" in result.stdout
