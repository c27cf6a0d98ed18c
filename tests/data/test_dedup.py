"""Dedup and decontamination (data/dedup.py, docs/recipe.md §2): planted exact and near duplicates and benchmark problems
are removed, exactly those, and the report says which row or benchmark item each one matched."""

import json
from pathlib import Path

import numpy as np
import pytest

from qednano_jax.config import load_datagen_config
from qednano_jax.data import dedup as D
from qednano_jax.data.rows import DataError
from qednano_jax.eval.benchmarks import load_benchmark

SAMPLES = Path(D.__file__).resolve().parent.parent / "samples"


def _rows():
    return [json.loads(line) for line in (SAMPLES / "fineproofs_rl.jsonl").read_text().splitlines()]


def test_normalize_and_shingles():
    assert D.normalize("Prove  that $N^2+n$\nis EVEN.") == "prove that n 2 n is even"
    assert D.text_hash("Prove that $n^2 + n$ is even.") == D.text_hash("prove that  n^2+n  is  even")
    assert D.shingles("a b c d", 3) == {"a b c", "b c d"}
    assert D.shingles("a b", 3) == {"a b"}
    a, b = D.shingles("a b c d e", 2), D.shingles("a b c d x", 2)
    assert D.jaccard(a, b) == pytest.approx(3 / 5) and D.overlap(a, b) == pytest.approx(3 / 4)


def test_minhash_estimates_jaccard():
    """The LSH is only a candidate search, but its signatures must estimate the Jaccard similarity."""
    lsh = D.MinHashLSH(256, 64)
    a = frozenset(f"w{i}" for i in range(100))
    b = frozenset(f"w{i}" for i in range(30, 130))  # J = 70 / 130
    agree = float(np.mean(lsh.signature(a) == lsh.signature(b)))
    assert agree == pytest.approx(70 / 130, abs=0.1)
    with pytest.raises(DataError, match="dedup.bands"):
        D.MinHashLSH(100, 64)


def test_planted_duplicates_and_benchmark_problems_are_removed_and_reported(tmp_path, capsys):
    rows = _rows()
    base = len(rows)
    bench_imo = load_benchmark("imo_proofbench", "sample")
    bench_pb = load_benchmark("proofbench", "sample")
    long_i = max(range(base), key=lambda i: len(rows[i]["problem"].split()))
    words = rows[long_i]["problem"].split()
    words[len(words) // 2] = "whole"  # one word changed: a near duplicate
    planted = [
        # (row, expected removal)
        ({**rows[3], "problem": "  " + rows[3]["problem"].upper().replace(" ", "   ") + " "},
         {"reason": "exact", "matched_index": 3, "similarity": 1.0}),
        ({**rows[long_i], "problem": " ".join(words), "source": "aops"},
         {"reason": "near", "matched_index": long_i}),
        ({"problem": bench_imo[0].problem, "source": "aops"},
         {"reason": "benchmark", "benchmark": "imo_proofbench=sample", "benchmark_id": bench_imo[0].id,
          "similarity": 1.0}),
        ({"problem": f"Problem 4 (a famous one). {bench_pb[2].problem} Justify every step.", "source": "olympiads"},
         {"reason": "benchmark", "benchmark": "proofbench=sample", "benchmark_id": bench_pb[2].id,
          "similarity": 1.0}),
    ]
    # interleave: planted rows after their originals, the rest of the sample rows in between
    first = max(long_i, 3) + 1
    data = rows[:first] + [p for p, _ in planted] + rows[first:]
    src = tmp_path / "problems.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in data))
    out = tmp_path / "kept.parquet"
    cfg = load_datagen_config("configs/datagen/tiny.yaml", [f"dedup.input={src}", f"dedup.output={out}"])
    report = D.run_dedup(cfg)

    assert report["rows"] == base + len(planted) and report["kept"] == base
    assert report["by_reason"] == {"exact": 1, "near": 1, "benchmark": 2}
    assert [r["index"] for r in report["removals"]] == list(range(first, first + len(planted)))
    for got, (_, want) in zip(report["removals"], planted):
        assert {k: got[k] for k in want if k != "similarity"} == {k: v for k, v in want.items() if k != "similarity"}
        if "similarity" in want:
            assert got["similarity"] == want["similarity"]
    near = report["removals"][1]
    sh = lambda t: D.shingles(t, cfg.dedup.ngram)  # noqa: E731
    assert near["similarity"] == round(D.jaccard(sh(data[first + 1]["problem"]), sh(rows[long_i]["problem"])), 4)
    assert cfg.dedup.threshold <= near["similarity"] < 1

    import datasets
    kept = datasets.load_dataset("parquet", data_files=str(out), split="train").to_list()
    assert kept == rows  # every original row, all columns, in order
    saved = json.loads(out.with_name("kept.report.json").read_text())
    assert saved["removals"] == report["removals"] and saved["kept"] == base
    printed = capsys.readouterr().out
    assert "1 exact duplicates, 1 near duplicates" in printed and "2 contaminated" in printed


def test_clean_input_keeps_everything(tmp_path):
    rows = _rows()
    kept, removed = D.dedup([r["problem"] for r in rows], D.load_benchmark_items(["imo_proofbench=sample"]))
    assert kept == list(range(len(rows))) and removed == []


def test_bad_text_column_names_the_row(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"problem": "Prove it."}) + "\n" + json.dumps({"problem": ""}) + "\n")
    cfg = load_datagen_config("configs/datagen/tiny.yaml", [f"dedup.input={src}",
                                                            f"dedup.output={tmp_path / 'o.jsonl'}"])
    with pytest.raises(DataError, match=r"p.jsonl line 2: column 'problem'"):  # 1-based, as editors count
        D.run_dedup(cfg)


def test_bundled_training_samples_are_decontaminated():
    """The project's own decontamination over what it ships: no bundled SFT or RL training problem is an exact or
    near (5-gram Jaccard >= 0.6) copy of a bundled benchmark problem, or of another training problem."""
    items = D.load_benchmark_items(["imo_proofbench=sample", "proofbench=sample", "imo_answerbench=sample"])
    assert len(items) > 10
    for name in ("fineproofs_sft.jsonl", "fineproofs_rl.jsonl"):
        rows = [json.loads(line) for line in (SAMPLES / name).read_text().splitlines()]
        kept, removed = D.dedup([r["problem"] for r in rows], items)
        assert removed == [] and kept == list(range(len(rows))), (name, removed)
