"""Benchmark formats: the shipped sample rows, column tables, clear errors; prompts and grade parsers."""
import json

import pytest

from qednano_jax.eval import benchmarks, prompts
from qednano_jax.eval.benchmarks import FORMATS, load_benchmark


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_shipped_samples_load_with_the_real_column_names(name):
    fmt = FORMATS[name]
    rows = load_benchmark(name, "sample")
    assert len(rows) >= 10
    assert len({r.id for r in rows}) == len(rows)
    for r in rows:
        assert r.problem.strip() and r.id
        for f in fmt.required:
            assert getattr(r, f).strip(), (name, r.id, f)
    assert load_benchmark(name, "sample", limit=3) == rows[:3]
    cats = {r.category for r in rows}
    assert cats == {"imo_proofbench": {"Basic", "Advanced"}, "proofbench": {"Others"},  # ProofBench: from the id
                    "imo_answerbench": {"Algebra", "Combinatorics", "Geometry", "Number theory"}}[name]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_column_table_override_and_missing_column_error(tmp_path):
    f = write_rows(tmp_path / "pb.jsonl", [
        {"question_id": "PB-Basic-001", "problem": "Show 1+1=2.", "solution": "Count.", "grading_guidelines": "7 if ok",
         "Category": "Algebra"},
        {"question_id": "PB-Advanced-001", "problem": "Show 2+2=4.", "solution": "Count.", "grading_guidelines": "7",
         "Category": "Number theory"}])
    rows = load_benchmark("imo_proofbench", str(f), columns={"category": "Category"})
    assert [(r.id, r.category, r.guidelines) for r in rows] == [("PB-Basic-001", "Algebra", "7 if ok"),
                                                              ("PB-Advanced-001", "Number theory", "7")]
    assert rows[0].category and not rows[0].answer
    # without the override the level comes from the id (PB-Basic-... / PB-Advanced-...), as the paper splits it
    assert [r.category for r in load_benchmark("imo_proofbench", str(f))] == ["Basic", "Advanced"]
    with pytest.raises(ValueError, match=r"needs column 'answer' \(for answer\).*eval.columns.answer"):
        load_benchmark("imo_answerbench", str(f))
    with pytest.raises(ValueError, match="unknown field 'rubric'"):
        load_benchmark("imo_proofbench", str(f), columns={"rubric": "x"})
    dup = write_rows(tmp_path / "dup.jsonl", [{"question_id": "a", "problem": "p", "answer": "1"}] * 2)
    with pytest.raises(ValueError, match="dup.jsonl line 2: duplicate 'question_id' 'a'"):
        load_benchmark("imo_answerbench", str(dup))
    (tmp_path / "x.txt").write_text("problem_id problem answer\n")
    with pytest.raises(ValueError, match=r"x.txt: unsupported data file"):
        load_benchmark("imo_answerbench", str(tmp_path / "x.txt"))
    with pytest.raises(ValueError, match="unknown benchmark format 'mathbench'"):
        load_benchmark("mathbench")


def test_csv_source_and_prompts(tmp_path):
    f = tmp_path / "ab.csv"
    f.write_text('question_id,problem,answer,category\nAB-1,"Find x with x+1=3, x real.",2,Algebra\n')
    (row,) = load_benchmark("imo_answerbench", str(f))
    assert row == benchmarks.Problem(id="AB-1", problem="Find x with x+1=3, x real.", answer="2", category="Algebra")
    fmt = FORMATS["imo_answerbench"]
    assert benchmarks.generation_prompt(fmt, row) == ("Find x with x+1=3, x real.\n\nPlease reason step by step, "
                                                      "and put your final answer within \\boxed{}.")
    judge = benchmarks.grading_prompt(fmt, row, "so \\boxed{2}")
    assert "### Reference answer\n2\n" in judge and "so \\boxed{2}" in judge and "\\boxed{Correct}" in judge
    proof_fmt = FORMATS["imo_proofbench"]
    assert benchmarks.generation_prompt(proof_fmt, row) == ("Generate a rigorous proof to the following question:"
                                                            "\n\nFind x with x+1=3, x real.")
    g = benchmarks.grading_prompt(proof_fmt, benchmarks.Problem(id="1", problem="P{x}", solution="S", guidelines="G"),
                                  "proof with {braces}")
    assert "P{x}" in g and "### Reference solution\nS\n" in g and "### Grading guidelines\nG\n" in g
    assert "proof with {braces}" in g and "<points>N out of 7</points>" in g


def test_grade_parsers():
    assert prompts.parse_points("ok <points>6 out of 7</points>") == 6
    assert prompts.parse_points("<points>7 out of 7</points> then <POINTS> 1 out of 7 </points>") == 1  # last wins
    assert prompts.parse_points("<points>9 out of 7</points>") is None
    assert prompts.parse_points("seven points") is None and prompts.parse_points(None) is None
    assert prompts.parse_verdict("The answers match. \\boxed{Correct}") == 1
    assert prompts.parse_verdict("\\boxed{Correct} ... on reflection \\boxed{\\text{Incorrect}}") == 0
    assert prompts.parse_verdict("<verdict>correct</verdict>") == 1
    assert prompts.parse_verdict("\\boxed{42}") is None
