"""Score arithmetic against hand-computed values: avg@k, std across runs (ddof=1), per-category means, tokens."""
import json
import math

import pytest

from qednano_jax.eval import report


def rec(pid, run, score, cat, tokens=100, failed=False, max_score=7, truncated=False):
    return {"problem_id": pid, "run": run, "score": score, "max_score": max_score, "category": cat,
            "tokens": tokens, "grader_failed": failed, "truncated": truncated, "benchmark": "imo_proofbench"}


# 3 problems x 3 runs. Problem a and b are "Basic", c is "Advanced".
#          a   b   c      run mean (% of 21 points)
# run 0:   7   0   6      13/21
# run 1:   6   1   0       7/21
# run 2:   7   7   1      15/21
ROWS = [rec("a", 0, 7, "Basic", 10), rec("b", 0, 0, "Basic", 20), rec("c", 0, 6, "Advanced", 30),
        rec("a", 1, 6, "Basic", 40), rec("b", 1, 1, "Basic", 50), rec("c", 1, 0, "Advanced", 60),
        rec("a", 2, 7, "Basic", 70), rec("b", 2, 7, "Basic", 80), rec("c", 2, 1, "Advanced", 90)]


def test_avg_at_k_std_and_categories_match_hand_computation():
    s = report.summarize(ROWS, name="x")
    run_means = [100 * 13 / 21, 100 * 7 / 21, 100 * 15 / 21]
    assert s.run_means == pytest.approx(run_means)
    assert s.mean == pytest.approx(100 * 35 / 63)                       # (13 + 7 + 15) / 3 / 21
    # ddof=1 by hand: deviations of (13, 7, 15)/21 from 35/3/21 are (4/3, -14/3, 10/3)/21
    var = ((4 / 3) ** 2 + (14 / 3) ** 2 + (10 / 3) ** 2) / 2
    assert s.std == pytest.approx(100 * math.sqrt(var) / 21)
    # Basic: per run (7+0)/14, (6+1)/14, (7+7)/14 -> 50, 50, 100 %
    basic_mean, basic_std = s.categories["Basic"]
    assert basic_mean == pytest.approx(200 / 3)
    assert basic_std == pytest.approx(math.sqrt(((50 / 3) ** 2 * 2 + (100 / 3) ** 2) / 2))
    # Advanced: 6/7, 0/7, 1/7 -> mean 1/3 of 100 %
    assert s.categories["Advanced"][0] == pytest.approx(100 / 3)
    assert s.tokens_per_problem == pytest.approx(50.0)
    assert (s.runs, s.num_problems, s.items, s.grader_failures, s.incomplete_runs) == (3, 3, 9, 0, [])


def test_single_run_has_no_std_and_failures_score_zero():
    rows = [rec("a", 0, 7, "", failed=True), rec("b", 0, 7, ""), rec("c", 0, 1, "", max_score=1)]
    s = report.summarize(rows)
    assert s.std is None
    assert s.mean == pytest.approx((0 + 100 + 100) / 3)           # the failed grade counts as 0 whatever its score
    assert s.grader_failures == 1
    assert list(s.categories) == ["all"]


def test_answerbench_binary_scores_and_incomplete_runs():
    rows = [rec("a", 0, 1, "Algebra", max_score=1), rec("b", 0, 0, "Algebra", max_score=1),
            rec("a", 1, 1, "Algebra", max_score=1)]                 # run 1 lacks problem b
    s = report.summarize(rows)
    assert s.run_means == pytest.approx([50.0, 100.0])
    assert s.std == pytest.approx(math.sqrt(2 * 25 ** 2))          # ddof=1 of (50, 100)
    assert s.incomplete_runs == [1]
    assert "incomplete" in report.markdown_table([s])


def test_table_chart_and_torn_last_line(tmp_path):
    a, b = tmp_path / "ckpt-a.jsonl", tmp_path / "ckpt-b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    b.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]) + '{"problem_id": "a", "ru')  # crash mid-write
    assert len(report.read_results(b)) == 3
    summaries, table, chart = report.write_report([a, b], tmp_path / "out")
    text = table.read_text()
    assert "| ckpt-a | imo_proofbench | 3 | 3 | 55.6 (" in text and "| ckpt-b | imo_proofbench | 3 | 1 | 61.9 |" in text
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\nnot json\n{"x": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        report.read_results(bad)
