"""Resume: SIGKILL a real `python -m qednano_jax.eval` mid-run, run the same command again, and get exactly the items
of an uninterrupted run: none duplicated, none lost, the killed run's lines kept byte for byte."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli_args(model_dir, out_dir):
    # the tiny proof-writing model as policy and (greedy, in-process) as its own judge: a real grader, no server
    return [sys.executable, "-m", "qednano_jax.eval", "configs/eval/tiny.yaml", f"eval.checkpoint={model_dir}",
            "eval.tokenizer=", "eval.limit=6", "eval.runs=2", "eval.batch_size=1", "eval.max_new_tokens=64",
            "eval.progress=false", f"eval.out_dir={out_dir}", "grader.backend=native", f"grader.judge_path={model_dir}",
            "grader.temperature=0", "grader.max_tokens=24", "grader.concurrency=2"]


def cli_env(tmp_path):
    # one CPU device, and a compilation cache shared by the runs so that the reruns skip most compiles
    return {**os.environ, "XLA_FLAGS": "", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def keyed(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    keys = [(r["problem_id"], r["run"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicated items"
    return {k: (r["completion"], r["proof"], r["score"], r["grader_reply"], r["tokens"]) for k, r in zip(keys, rows)}


@pytest.mark.slow  # three model-loading subprocesses (~1.5 min on 2 busy cores)
def test_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, proof_hf_dir):
    env = cli_env(tmp_path)
    ref = subprocess.run(cli_args(proof_hf_dir, tmp_path / "ref"), cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = keyed(tmp_path / "ref" / "results.jsonl")
    assert len(want) == 12 and any(v[1] for v in want.values())   # some proofs reached the judge

    out = tmp_path / "killed"
    results = out / "results.jsonl"
    proc = subprocess.Popen(cli_args(proof_hf_dir, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and results.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the eval finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    before = results.read_bytes()
    kept = before[:before.rfind(b"\n") + 1]                 # complete lines (a torn tail is cut on resume)
    n_kept = kept.count(b"\n")
    assert 3 <= n_kept < 12

    again = subprocess.run(cli_args(proof_hf_dir, out), cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{n_kept} items already graded, 0 failed gradings to redo, {12 - n_kept} to generate" in again.stdout
    after = results.read_bytes()
    assert after.startswith(kept)
    assert keyed(results) == want                            # nothing lost, nothing duplicated, same items
    assert "| killed | imo_proofbench | 6 | 2 |" in (out / "summary.md").read_text()
    # a third run finds everything graded and only rewrites the report
    done = subprocess.run(cli_args(proof_hf_dir, out), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0 and "already graded" in done.stdout and results.read_bytes() == after
