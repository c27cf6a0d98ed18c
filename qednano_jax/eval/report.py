"""Eval reports: avg@k with the std across runs, per-category means, tokens per problem (docs/recipe.md §5).

A result file is JSONL, one line per (problem, run) (written by `eval.run`). The arithmetic follows the paper's
stats: each run's mean over problems first, then the mean over the k runs (avg@k) and their sample std (ddof=1);
per category the same, restricted to that category's problems. Scores are reported in % of the maximum
(points / 7 for proofs, correct / 1 for AnswerBench). A grader failure is a score of 0 and is counted.

`python -m qednano_jax.eval.report RESULTS.jsonl [MORE.jsonl ...] --out DIR` writes `DIR/summary.md` (one table row
per result file) and `DIR/scores.png` (one bar group per result file), e.g. to compare checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class Summary:
    """Scores of one result file; percentages in [0, 100], std is None for fewer than 2 runs."""
    name: str
    benchmark: str
    num_problems: int
    runs: int
    items: int
    mean: float                     # avg@k in %: mean over runs of each run's mean over problems
    std: float | None               # std of the run means, ddof=1
    run_means: list[float]
    categories: dict[str, tuple[float, float | None]]  # category -> (avg@k %, std)
    tokens_per_problem: float       # mean generated tokens per (problem, run), all scaffold turns together
    grader_failures: int            # grader unreachable after its retries (scored 0)
    grader_no_score: int            # grader replied without a valid grade (scored 0)
    truncated: int
    incomplete_runs: list[int]      # runs missing some problems (a partial file)
    regraded: int = 0               # items whose grading failed on an earlier run and was done again


def percent(record: dict) -> float:
    """A record's score in %: points / max_points * 100 (a failed grade scores 0)."""
    if record.get("grader_failed"):
        return 0.0
    return 100.0 * float(record["score"]) / float(record["max_score"])


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def summarize(records: list[dict], name: str = "") -> Summary:
    """avg@k, std (ddof=1) across runs, per-category avg@k and token/failure counts of one result file's records."""
    if not records:
        raise ValueError(f"{name or 'results'}: no graded items to summarize")
    by_run: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_run[int(r["run"])].append(r)
    runs = sorted(by_run)
    run_means = [float(np.mean([percent(r) for r in by_run[k]])) for k in runs]
    mean, std = _mean_std(run_means)
    categories = {}
    for cat in sorted({str(r.get("category") or "all") for r in records}):
        per_run = [float(np.mean(v)) for k in runs
                   if (v := [percent(r) for r in by_run[k] if str(r.get("category") or "all") == cat])]
        categories[cat] = _mean_std(per_run)
    problems = {r["problem_id"] for r in records}
    incomplete = [k for k in runs if len({r["problem_id"] for r in by_run[k]}) < len(problems)]
    return Summary(
        name=name, benchmark=str(records[0].get("benchmark", "")), num_problems=len(problems), runs=len(runs),
        items=len(records), mean=mean, std=std, run_means=run_means, categories=categories,
        tokens_per_problem=float(np.mean([float(r.get("tokens", 0)) for r in records])),
        grader_failures=sum(bool(r.get("grader_failed")) for r in records),
        regraded=sum(int(r.get("regrades", 0)) > 0 for r in records),
        grader_no_score=sum(bool(r.get("grader_no_score")) for r in records),
        truncated=sum(bool(r.get("truncated")) for r in records), incomplete_runs=incomplete)


def read_results(path: str | os.PathLike) -> list[dict]:
    """The records of a result file, the LAST line of each (problem_id, run) item (a failed grade graded again on a
    later run appends a newer line; it carries `regrades`), in file order of first appearance. A torn last line from
    a crash is ignored (`eval.run` repairs it)."""
    latest: dict[tuple, dict] = {}
    for r in _lines(path):
        latest[(r["problem_id"], int(r["run"]))] = r
    return list(latest.values())


def _lines(path: str | os.PathLike) -> list[dict]:
    out = []
    lines = Path(path).read_bytes().split(b"\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):  # the last, unterminated line: a write cut short by a crash
                continue
            raise ValueError(f"{path}: line {i} is not valid JSON ({e})") from None
    return out


def _fmt(mean: float, std: float | None) -> str:
    return f"{mean:.1f}" + (f" ({std:.1f})" if std is not None and not math.isnan(std) else "")


def markdown_table(summaries: list[Summary]) -> str:
    """One row per result file: avg@k (std), each category, tokens/problem, failures, truncation."""
    cats = sorted({c for s in summaries for c in s.categories})
    head = ["run", "benchmark", "problems", "k", "avg@k % (std)"] + cats + \
           ["tokens/problem", "grader failures", "no grade", "truncated"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        row = [s.name, s.benchmark, str(s.num_problems), str(s.runs), _fmt(s.mean, s.std)]
        row += [_fmt(*s.categories[c]) if c in s.categories else "-" for c in cats]
        row += [f"{s.tokens_per_problem:.0f}", f"{s.grader_failures}/{s.items}", f"{s.grader_no_score}/{s.items}",
                f"{s.truncated}/{s.items}"]
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"- {s.name}: runs {s.incomplete_runs} are incomplete" for s in summaries if s.incomplete_runs]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def bar_chart(summaries: list[Summary], path: str | os.PathLike) -> Path:
    """Grouped bars: overall and per-category avg@k (%) with std error bars, one colour per result file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["overall"] + sorted({c for s in summaries for c in s.categories if c != "all"})
    width = 0.8 / len(summaries)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) * max(1, len(summaries)) ** 0.5), 3.8))
    for i, s in enumerate(summaries):
        vals = [(s.mean, s.std)] + [s.categories.get(g, (0.0, None)) for g in groups[1:]]
        xs = [g + (i - (len(summaries) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [v for v, _ in vals], width, label=s.name,
                      yerr=[e if e is not None else 0.0 for _, e in vals], capsize=3)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v, _ in vals], fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("score (% of max), avg@k")
    ax.set_ylim(0, 105)
    ax.set_title(", ".join(sorted({s.benchmark for s in summaries})))
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(result_files: list[str | os.PathLike], out_dir: str | os.PathLike,
                 names: list[str] | None = None) -> tuple[list[Summary], Path, Path]:
    """Summaries of several result files -> `out_dir/summary.md` and `out_dir/scores.png`."""
    names = names or [Path(p).stem if Path(p).stem != "results" else Path(p).parent.name for p in result_files]
    summaries = [summarize(read_results(p), name=n) for p, n in zip(result_files, names)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "summary.md"
    table.write_text(markdown_table(summaries))
    (out / "summary.json").write_text(json.dumps([dataclasses.asdict(s) for s in summaries], indent=2))
    return summaries, table, bar_chart(summaries, out / "scores.png")


def main(argv: list[str] | None = None) -> int:
    from qednano_jax import cli
    return cli.run(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from qednano_jax import cli
    from qednano_jax.config import UserError
    p = cli.ArgumentParser(prog="python -m qednano_jax.eval.report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="result JSONL files (one per run/checkpoint) to compare")
    p.add_argument("--out", required=True, help="folder for summary.md, summary.json and scores.png")
    p.add_argument("--names", nargs="*", help="one label per result file (default: file or folder name)")
    a = p.parse_args(argv)
    if a.names and len(a.names) != len(a.results):
        p.error(f"--names: got {len(a.names)} labels for {len(a.results)} result files")
    for f in a.results:
        if not Path(f).is_file():
            raise UserError(f"{f}: no such result file")
        try:
            records = read_results(f)
        except (ValueError, KeyError) as e:
            raise UserError(f"{f}: not a result file of python -m qednano_jax.eval ({e})") from None
        if not records:
            raise UserError(f"{f}: no graded items in this result file")
    _, table, chart = write_report(a.results, a.out, a.names)
    print(table.read_text() + f"\nchart: {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
