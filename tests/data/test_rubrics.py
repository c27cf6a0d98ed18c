"""Marking schemes and difficulty estimates (data/rubrics.py, docs/recipe.md §3): the scheme format check, the reward
columns, the bundled writer prompt, and `python -m qednano_jax.data.rubrics` end to end against the real SGLang server
(writer, policy rollouts and grader): SIGKILLed mid-run and resumed without duplicated or lost rows, exported as
FineProofs-RL rows that the RL stage loads and filters."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qednano_jax.data import rubrics as R

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_RL = ROOT / "qednano_jax" / "samples" / "fineproofs_rl.jsonl"
PROBLEMS = ["Prove that n^2 + n is even.", "Prove that the sum of two odd numbers is even.",
            "Show that 3 divides n^3 - n.", "Prove that |a + b| <= |a| + |b|.", "Prove that 2^n > n."]

GOOD = """Checkpoints (7 pts total)
1. (4 pts, key) Factor n^2 + n = n(n + 1).
2. (2 pts, routine) One of two consecutive integers is even.
3. (1 pt, routine) Conclude.

Zero-credit items
- Checking n = 1, 2, 3 only.

Deductions
- -1: an arithmetic slip.
- Cap at 3/7: assuming n is even."""


def _rows():
    return [json.loads(line) for line in SAMPLE_RL.read_text().splitlines()]


def test_every_sample_rubric_passes_the_format_check():
    for i, row in enumerate(_rows()):
        assert R.check_scheme(row["rubrics"]) == [], f"sample row {i}"
    assert R.check_scheme(GOOD) == []
    assert R.check_scheme("## Checkpoints\n" + GOOD.split("\n", 1)[1]) == []  # markdown headings are fine


@pytest.mark.parametrize("bad, issue", [
    ("", "empty scheme"),
    (GOOD.replace("Zero-credit items", "Notes"), "no 'zero credit items' section"),
    (GOOD.replace("(2 pts, routine)", "(3 pts, routine)"), "checkpoints add up to 8, not 7"),
    (GOOD.replace("(4 pts, key)", "(3 pts, key)").replace("(1 pt, routine)", "(2 pts, routine)"),
     "checkpoints: key ideas carry 3 < 4 points"),
    (GOOD.replace("(4 pts, key) Factor", "(no points) Factor").replace("(2 pts", "(x pts").replace("(1 pt", "(y pt"),
     "no checkpoint with a point value"),
    ("Checkpoints (7 pts total)\nChain A (x):\nA1. (4 pts, key) a\nA2. (3 pts, routine) b\nChain B (y):\n"
     "B1. (4 pts, key) c\nZero-credit items\n- none\nDeductions\n- -1: slip", "chain B add up to 4, not 7"),
    ("Deductions\n- -1\nZero-credit items\n- x\nCheckpoints\n1. (7 pts, key) all", "not in the order"),
])
def test_malformed_schemes_are_named(bad, issue):
    assert any(issue in msg for msg in R.check_scheme(bad)), R.check_scheme(bad)


def test_reward_columns_follow_the_dataset():
    """scores -> rewards = scores / 7, reward_mean, population reward_std: as in the sample FineProofs-RL rows."""
    for row in _rows():
        got = R.reward_stats(row["scores"])
        assert got["rewards"] == pytest.approx(row["rewards"]) and got["num_rewards"] == row["num_rewards"]
        assert got["reward_mean"] == pytest.approx(row["reward_mean"], abs=1e-4)
        assert got["reward_std"] == pytest.approx(row["reward_std"], abs=1e-4)
    assert R.reward_stats([7, 0]) == {"scores": [7, 0], "rewards": [1.0, 0.0], "num_rewards": 2,
                                      "reward_mean": 0.5, "reward_std": 0.5}


def test_bundled_writer_prompt():
    text = R.load_scheme_prompt()
    prompt = R.writer_prompt(text, {"problem": "Prove X."}, "")
    assert "Prove X." in prompt and R.NO_SOLUTION in prompt
    assert "Official solution here." in R.writer_prompt(text, {"problem": "P", "sol": "Official solution here."},
                                                       "sol")
    for needle in ("Checkpoints (7 pts total)", "Zero-credit items", "Deductions", "at least 4", "at most 3",
                   "Chain A", "best chain", "Cap at x/7"):
        assert needle in text, needle
    # the example line formats the prompt asks for are the ones the checker reads
    assert R.check_scheme("Checkpoints (7 pts total)\n1. (4 pts, key) a\n2. (3 pts, routine) b\n"
                          "Zero-credit items\n- c\nDeductions\n- -1: d") == []


def test_bad_prompt_file_is_named(tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_text("Scheme for {problem} with {answer}")
    with pytest.raises(R.ConfigError, match="rubrics.prompt_file"):
        R.load_scheme_prompt(str(bad))


# ----------------------------------------------------------------------------------------------- real SGLang server

def _cmd(server, tiny_hf_dir, problems: Path, out: Path, *extra: str) -> list[str]:
    url = server.url
    return [sys.executable, "-m", "qednano_jax.data.rubrics", "configs/datagen/tiny.yaml",
            f"problems.path={problems}", "problems.limit=0", f"rubrics.out_dir={out}", f"writer.base_url={url}/v1",
            f"grader.base_url={url}/v1", f"rollout.urls=[{url}]", f"rubrics.tokenizer={tiny_hf_dir}", "rubrics.k=3",
            "rubrics.max_tokens=12", "writer.max_tokens=12", "rubrics.progress=false", *extra]


@pytest.mark.slow  # two CLI runs (one SIGKILLed) against the CPU server: about a minute
@pytest.mark.sglang
def test_rubrics_end_to_end_kill_resume_and_rl_load(sglang_server, tiny_hf_dir, tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"problem": p, "source": "olympiads"}) + "\n" for p in PROBLEMS))
    out = tmp_path / "rubrics"
    journal = out / R.JOURNAL
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    proc = subprocess.Popen(_cmd(sglang_server, tiny_hf_dir, problems, out, "rubrics.batch_problems=1"), cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"rubrics ended before it could be killed: {proc.stdout.read().decode()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = journal.read_bytes()
    assert 1 <= before.count(b"\n") < len(PROBLEMS)

    r = subprocess.run(_cmd(sglang_server, tiny_hf_dir, problems, out, "rubrics.batch_problems=2"), cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = journal.read_bytes()
    assert after.startswith(before)
    records = sorted((json.loads(line) for line in after.decode().splitlines()), key=lambda x: x["problem_id"])
    assert [x["problem_id"] for x in records] == list(range(len(PROBLEMS)))
    assert [x["problem"] for x in records] == PROBLEMS
    for x in records:
        assert x["scheme_issues"] == R.check_scheme(x["rubrics"])
        if x["rubrics"].strip():  # difficulty is estimated for every usable scheme (keep_invalid in tiny.yaml)
            assert x["num_rewards"] == 3 and len(x["scores"]) == 3
            assert all(isinstance(s, int) and 0 <= s <= 7 for s in x["scores"])
            assert x["rewards"] == pytest.approx([s / 7 for s in x["scores"]])
            assert x["reward_mean"] == pytest.approx(np.mean(x["rewards"]))
            assert x["reward_std"] == pytest.approx(np.std(x["rewards"]))
            assert x["no_proof"] + x["grader_failures"] <= 3 and 0 < x["completion_tokens"] <= 3 * 12

    rows = [json.loads(line) for line in (out / f"{R.EXPORT}.jsonl").read_text().splitlines()]
    usable = [x for x in records if x["rubrics"].strip()]
    assert len(rows) == len(usable) and rows, "every scheme came back empty"
    for row, x in zip(rows, usable):
        assert list(row) == list(R.RL_COLUMNS)
        assert {k: row[k] for k in R.RL_COLUMNS} == {k: x[k] for k in R.RL_COLUMNS}
    import datasets
    parquet = datasets.load_dataset("parquet", data_files=str(out / f"{R.EXPORT}.parquet"), split="train").to_list()
    assert parquet == rows
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["finished"], summary["exported_rows"], summary["rollouts"]) == (
        len(PROBLEMS), len(rows), sum(x["num_rewards"] for x in records))

    # the RL stage loads the export and filters on reward_mean
    from qednano_jax.data import rl
    from qednano_jax.data.sft import load_rows
    from qednano_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_hf_dir)
    loaded = load_rows(str(out / f"{R.EXPORT}.parquet"))
    prompts, stats = rl.build_prompts(loaded, tok)
    assert stats.used == len(rows) and [p.rubric for p in prompts] == [x["rubrics"] for x in rows]
    means = [x["reward_mean"] for x in rows]
    cut = float(np.median(means))
    _, stats = rl.build_prompts(loaded, tok, min_reward_mean=0.0, max_reward_mean=min(cut, 0.999))
    assert stats.used == sum(m <= min(cut, 0.999) for m in means)
    assert stats.filtered_reward_mean == len(rows) - stats.used


class _ScriptedRollout:
    """A Rollout whose completions are known texts (the real SGLang path is the end-to-end test below)."""

    def __init__(self, texts):
        self.texts, self.calls = texts, []

    def generate(self, prompts, sampling, n=1):
        from qednano_jax.rollout.base import Completion
        self.calls.append((prompts, sampling, n))
        return [[Completion(token_ids=[1] * (j + 1), logprobs=[0.0] * (j + 1), text=self.texts[i][j],
                            finish_reason="length" if "</think>" not in self.texts[i][j] else "stop",
                            weight_version="0", prompt_tokens=len(p)) for j in range(n)]
                for i, p in enumerate(prompts)]


def test_estimate_grades_each_rollout_against_its_scheme():
    """Proof = text after </think>; no proof = 0 without a call; a grader failure = 0 and counted; the grader
    sees the problem's own scheme."""
    from qednano_jax.config import GraderConfig, RubricsConfig
    from qednano_jax.data.tokenizer import load_tokenizer
    from qednano_jax.reward import grader as G

    seen = []

    class Scripted(G.Grader):
        def _reply(self, prompt):
            seen.append(prompt)
            if "FAIL" in prompt:
                return None, "HTTP 503", 4
            return f"<score>{prompt.split('PTS', 1)[1][0]}</score>", "", 1

    texts = [["a</think>PTS7", "b</think>PTS3", "never closed"],
             ["c</think>PTS5", "d</think>FAIL", "e</think>PTS0"]]
    rollout = _ScriptedRollout(texts)
    items = [({"problem": "P one"}, "scheme one"), ({"problem": "P two"}, "scheme two")]
    rcfg = RubricsConfig(k=3, max_tokens=5, temperature=0.7, top_p=0.9, top_k=20)
    out = R.estimate(rollout, load_tokenizer("qwen3"), Scripted(GraderConfig()), rcfg, items, seed=11)
    assert [o["scores"] for o in out] == [[7, 3, 0], [5, 0, 0]]
    assert out[0]["reward_mean"] == pytest.approx(10 / 21) and out[1]["rewards"] == pytest.approx([5 / 7, 0, 0])
    assert [(o["no_proof"], o["grader_failures"], o["truncated"]) for o in out] == [(1, 0, 1), (0, 1, 0)]
    assert len(seen) == 5 and all("scheme one" in s for s in seen[:2]) and all("scheme two" in s for s in seen[2:])
    prompts, sp, n = rollout.calls[0]
    assert n == 3 and (sp.max_new_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (5, 0.7, 0.9, 20, 11)
    from qednano_jax.data.tokenizer import prompt_ids
    assert prompts[0] == prompt_ids(load_tokenizer("qwen3"), rcfg.prompt_template.format(problem="P one"))


def test_native_policy_rollouts(tiny_hf_dir):
    """rollout.backend native: the policy checkpoint (rubrics.policy) runs in-process; k completions per problem of
    at most rubrics.max_tokens tokens, each graded (here by a grader that always answers 4)."""
    from qednano_jax.config import GraderConfig, load_datagen_config
    from qednano_jax.reward import grader as G

    class Four(G.Grader):
        def _reply(self, prompt):
            return "<score>4</score>", "", 1

    cfg = load_datagen_config("configs/datagen/tiny.yaml", ["rollout.backend=native", f"rubrics.policy={tiny_hf_dir}",
                                                            f"rubrics.tokenizer={tiny_hf_dir}", "rubrics.k=2",
                                                            "rubrics.max_tokens=6"])
    with pytest.raises(R.ConfigError, match="rubrics.policy"):
        R.make_policy(load_datagen_config("configs/datagen/tiny.yaml", ["rollout.backend=native"]))
    rollout, tok = R.make_policy(cfg)
    items = [({"problem": "Prove that n^2 + n is even."}, "scheme"), ({"problem": "Show 3 | n^3 - n."}, "scheme")]
    out = R.estimate(rollout, tok, Four(GraderConfig()), cfg.rubrics, items, seed=3)
    for o in out:
        assert o["num_rewards"] == 2 and 2 <= o["completion_tokens"] <= 12
        closed = 2 - o["no_proof"]
        assert sorted(o["scores"]) == [0] * o["no_proof"] + [4] * closed
    again = R.estimate(rollout, tok, Four(GraderConfig()), cfg.rubrics, items, seed=3)
    assert again == out  # seeded sampling
