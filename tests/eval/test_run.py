"""The eval loop's bookkeeping without a model: durable results file, resume plan and seeds, config identity, CLI
errors, and the report CLI comparing result files."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qednano_jax.config import ConfigError, EvalConfig, load_eval_config
from qednano_jax.eval import report, run as eval_run
from qednano_jax.eval.benchmarks import Problem

ROOT = Path(__file__).resolve().parents[2]


def test_results_file_repairs_a_torn_line_and_refuses_duplicates(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"problem_id": "a", "run": 0, "score": 7}\n{"problem_id": "b", "ru')   # killed mid-write
    f = eval_run.ResultsFile(path)
    assert f.keys == {"a#0"}
    f.append({"problem_id": "b", "run": 0, "score": 1})
    with pytest.raises(RuntimeError, match="item a#0 is already in the file"):
        f.append({"problem_id": "a", "run": 0, "score": 0})
    f.close()
    assert [json.loads(x)["problem_id"] for x in path.read_text().splitlines()] == ["a", "b"]


def test_plan_keeps_batches_and_seeds_fixed_across_resume():
    problems = [Problem(id=str(i), problem=f"p{i}") for i in range(5)]
    ecfg = EvalConfig(runs=2, batch_size=2)
    full = eval_run.plan(problems, set(), ecfg)
    assert [(r, [p.id for p in b]) for r, b, _ in full] == [
        (0, ["0", "1"]), (0, ["2", "3"]), (0, ["4"]), (1, ["0", "1"]), (1, ["2", "3"]), (1, ["4"])]
    assert len({s for _, _, s in full}) == 6                       # every batch has its own random stream
    resumed = eval_run.plan(problems, {"0#0", "1#0", "2#0", "4#1"}, ecfg)
    seeds = {(r, b[0].id): s for r, b, s in full}
    assert [(r, [p.id for p in b], s) for r, b, s in resumed] == [
        (0, ["3"], seeds[(0, "2")]), (0, ["4"], seeds[(0, "4")]), (1, ["0", "1"], seeds[(1, "0")]),
        (1, ["2", "3"], seeds[(1, "2")])]
    assert eval_run.plan(problems, set(), EvalConfig(runs=2, batch_size=2, seed=1))[0][2] != full[0][2]


def test_a_different_eval_cannot_append_to_the_same_results(tmp_path):
    cfg = lambda *o: load_eval_config(None, list(o))
    eval_run.check_meta(tmp_path, cfg("eval.runs=1"), write=True)
    # more runs or fewer problems: the same eval, resumable
    eval_run.check_meta(tmp_path, cfg("eval.runs=3", "eval.limit=2"), write=True)
    for override, key in [("eval.scaffold=rc", "eval.scaffold"), ("eval.batch_size=4", "eval.batch_size"),
                          ("grader.model=other/judge", "grader.model"), ("grader.backend=native", "grader.backend"),
                          ("rollout.urls=[http://10.0.0.5:30000]", "rollout.urls"),
                          ("eval.checkpoint=runs/sft/hf", "eval.checkpoint")]:
        with pytest.raises(ConfigError, match=f"^{key}: .* made with {key}="):
            eval_run.check_meta(tmp_path, cfg(override))
    # a file written before the keys were qualified (bare eval field names) is still checked
    (tmp_path / eval_run.META).write_text(json.dumps({"scaffold": "single", "seed": 0}))
    with pytest.raises(ConfigError, match="^eval.seed: "):
        eval_run.check_meta(tmp_path, cfg("eval.seed=3"))


def test_failed_grades_are_graded_again_on_the_next_run(tmp_path):
    """An item whose grader call failed is re-judged from its stored proof (not regenerated); the newer line wins in
    the report, which counts it as regraded."""
    path = tmp_path / "results.jsonl"
    rows = [{"problem_id": "a", "run": 0, "score": 7, "max_score": 7, "proof": "pa", "grader_failed": False},
            {"problem_id": "b", "run": 0, "score": 0, "max_score": 7, "proof": "pb", "grader_failed": True}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ecfg = EvalConfig(runs=1, batch_size=2, out_dir=str(tmp_path), progress=False)
    problems = [Problem(id="a", problem="A"), Problem(id="b", problem="B")]
    judged = []

    def judge(items):
        judged.extend((p.id, proof) for p, proof in items)
        return [eval_run.Grade(score=3, reply="<points>3 out of 7</points>") for _ in items]

    class NoPolicy:
        def generate(self, *a, **k):
            raise AssertionError("nothing is generated again")

    eval_run.evaluate(ecfg, eval_run.benchmarks.get_format("proofbench"), problems, NoPolicy(), None, judge,
                      eval_run.extract, log=lambda s: None)
    assert judged == [("b", "pb")]
    latest = {r["problem_id"]: r for r in report.read_results(path)}
    assert latest["b"]["score"] == 3 and latest["b"]["regrades"] == 1 and not latest["b"]["grader_failed"]
    assert len(path.read_text().splitlines()) == 3   # append-only: the failed line is kept
    s = report.summarize(report.read_results(path))
    assert (s.items, s.grader_failures, s.regraded) == (2, 0, 1) and s.mean == pytest.approx(100 * (7 + 3) / 14)
    assert eval_run.ResultsFile(path).keys == {"a#0", "b#0"}


def test_configs_and_cli_errors(tmp_path):
    for name in ("tiny", "imo_proofbench", "proofbench", "imo_answerbench", "imo_proofbench_rc"):
        cfg = load_eval_config(ROOT / "configs" / "eval" / f"{name}.yaml")
        assert cfg.eval.temperature == 0.8 and cfg.eval.top_p == 1.0 and cfg.eval.top_k == -1
        if name != "tiny":   # the paper's settings (docs/recipe.md §5)
            assert (cfg.eval.max_new_tokens, cfg.eval.source, cfg.rollout.backend) == (229376, "hub", "sglang")
            assert cfg.eval.runs == (1 if name == "imo_answerbench" else 3)
    assert load_eval_config(ROOT / "configs/eval/imo_proofbench_rc.yaml").eval.rc_iterations == 3
    with pytest.raises(ConfigError, match="eval.scaffold: 'rsa' is not one of"):
        load_eval_config(None, ["eval.scaffold=rsa"])
    r = subprocess.run([sys.executable, "-m", "qednano_jax.eval", "configs/eval/tiny.yaml",
                        f"eval.source={tmp_path / 'missing.jsonl'}", f"eval.out_dir={tmp_path / 'o'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "missing.jsonl does not exist" in r.stderr


def test_report_cli_compares_result_files(tmp_path):
    rows = [{"problem_id": p, "run": k, "score": s, "max_score": 7, "category": "Basic", "tokens": 10,
             "benchmark": "imo_proofbench"} for k, (p, s) in enumerate([("a", 7), ("a", 0)])]
    for name in ("sft", "rl"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.main([str(tmp_path / "sft.jsonl"), str(tmp_path / "rl.jsonl"), "--out", str(tmp_path / "cmp"),
                 "--names", "QED-Nano-SFT", "QED-Nano"])
    table = (tmp_path / "cmp" / "summary.md").read_text()
    assert "| QED-Nano-SFT | imo_proofbench | 1 | 2 | 50.0 (70.7) |" in table and "| QED-Nano |" in table
    assert (tmp_path / "cmp" / "scores.png").stat().st_size > 5000
