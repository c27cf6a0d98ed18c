"""Every command line turns a user mistake into ONE line on stderr naming the culprit, exit code 2, no traceback, and
nothing written (qednano_jax/cli.py): a wrong key, a wrong type, a missing file and a malformed data file for
train, eval, eval.report, plan, serve, data.distill, data.rubrics and data.dedup. The CLIs' `main` functions run in
this process (what `python -m` runs); one case also goes through a real `python -m` subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "P", "reasoning_content": "r", "proof": "p", "rubrics": "7 pts",
                               "question_id": "q1", "grading_guidelines": "g", "solution": "s"}) + "\n"
                   + "{not json\n")
    return {"BAD": str(bad), "MISSING": str(tmp_path / "missing.jsonl"), "OUT": str(tmp_path / "out")}


def _main(name):
    if name == "train":
        from qednano_jax.train.cli import main
    elif name == "eval":
        from qednano_jax.eval.__main__ import main
    elif name == "eval.report":
        from qednano_jax.eval.report import main
    elif name == "plan":
        from qednano_jax.plan import main
    elif name == "serve":
        from qednano_jax.serve import main
    elif name == "data.distill":
        from qednano_jax.data.distill import main
    elif name == "data.rubrics":
        from qednano_jax.data.rubrics import main
    else:
        from qednano_jax.data.dedup import main
    return main


DG = "configs/datagen/tiny.yaml"
CASES = [  # (cli, argv, what the one line must name)
    ("train", ["train.stepz=3", "train.run_dir=OUT"], "train.stepz"),
    ("train", ["train.steps=many", "train.run_dir=OUT"], "train.steps"),
    ("train", ["data.path=MISSING", "train.run_dir=OUT"], "missing.jsonl does not exist"),
    ("train", ["data.path=BAD", "train.run_dir=OUT"], "bad.jsonl line 2: not JSON"),
    ("train", ["configs/rl-tiny.yaml", "data.path=BAD", "train.run_dir=OUT"], "bad.jsonl line 2: not JSON"),
    ("eval", ["eval.benchmark=foo", "eval.out_dir=OUT"], "eval.benchmark"),
    ("eval", ["eval.runs=zero", "eval.out_dir=OUT"], "eval.runs"),
    ("eval", ["eval.source=MISSING", "eval.out_dir=OUT"], "missing.jsonl does not exist"),
    ("eval", ["eval.source=BAD", "eval.out_dir=OUT"], "bad.jsonl line 2: not JSON"),
    ("eval.report", ["MISSING", "--out", "OUT"], "missing.jsonl: no such result file"),
    ("eval.report", ["BAD", "--out", "OUT"], "bad.jsonl: not a result file"),
    ("eval.report", ["BAD", "--out", "OUT", "--colour"], "--colour"),
    ("plan", ["plan.strategiez=[fsdp]"], "plan.strategiez"),
    ("plan", ["plan.devices=eight"], "plan.devices"),
    ("plan", ["configs/missing.yaml"], "missing.yaml"),
    ("serve", ["--model-path", "OUT", "--port", "x"], "--port"),
    ("serve", ["--model-path", "MISSING"], "missing.jsonl"),
    ("serve", ["--model-path", "OUT", "--batch", "3"], "--batch"),
    ("data.distill", [DG, "distill.nn=3"], "distill.nn"),
    ("data.distill", [DG, "distill.n=lots"], "distill.n"),
    ("data.distill", [DG, "problems.path=MISSING", "distill.out_dir=OUT"], "missing.jsonl does not exist"),
    ("data.distill", [DG, "problems.path=BAD", "distill.out_dir=OUT"], "bad.jsonl line 2: not JSON"),
    ("data.rubrics", [DG, "rubrics.kk=2"], "rubrics.kk"),
    ("data.rubrics", [DG, "problems.path=MISSING", "rubrics.out_dir=OUT"], "missing.jsonl does not exist"),
    ("data.rubrics", [DG, "problems.path=BAD", "rubrics.out_dir=OUT"], "bad.jsonl line 2: not JSON"),
    ("data.dedup", [DG, "dedup.ngrams=5"], "dedup.ngrams"),
    ("data.dedup", [DG, "dedup.input=MISSING", "dedup.output=OUT/o.jsonl"], "missing.jsonl does not exist"),
    ("data.dedup", [DG, "dedup.input=BAD", "dedup.output=OUT/o.jsonl"], "bad.jsonl line 2: not JSON"),
]


@pytest.mark.parametrize("cli,argv,culprit", CASES, ids=[f"{c}:{' '.join(a)[-40:]}" for c, a, _ in CASES])
def test_a_user_mistake_is_one_line_and_exit_2(cli, argv, culprit, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    files = _files(tmp_path)
    for k, v in files.items():  # the placeholders BAD, MISSING, OUT -> this test's paths
        argv = [a.replace(k, v) for a in argv]
    try:
        code = _main(cli)(argv)
    except SystemExit as e:  # argparse's own errors end this way (through cli.ArgumentParser)
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert culprit in err[0], err
    assert not Path(files["OUT"]).exists()  # nothing written


def test_the_real_entry_point_prints_one_line(tmp_path):
    files = _files(tmp_path)
    env = {**os.environ, "XLA_FLAGS": ""}
    p = subprocess.run([sys.executable, "-m", "qednano_jax.train", f"data.path={files['BAD']}",
                        f"train.run_dir={files['OUT']}"], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: {files['BAD']} line 2: not JSON (Expecting property name enclosed in double quotes at column 2)"]
    assert "Traceback" not in p.stderr and not Path(files["OUT"]).exists()
