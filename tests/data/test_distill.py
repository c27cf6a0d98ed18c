"""Teacher distillation (data/distill.py, docs/recipe.md §2): reply splitting, and `python -m qednano_jax.data.distill`
end to end against the real SGLang server on the tiny model: SIGKILLed mid-run and resumed without duplicated or lost
rows, graded, and exported FineProofs-SFT rows that the SFT stage loads as they are."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qednano_jax.data import distill as D

ROOT = Path(__file__).resolve().parents[2]
PROBLEMS = ["Prove that n^2 + n is even.", "Prove that the sum of two odd numbers is even.",
            "Show that 3 divides n^3 - n.", "Prove that |a + b| <= |a| + |b|.", "Prove that 2^n > n.",
            "Show that 6 divides n(n+1)(n+2)."]


def test_split_reply():
    # the server's reasoning parser filled reasoning_content
    assert D.split_reply("The proof.", "I think.\n") == ("I think.", "The proof.", True)
    assert D.split_reply("", "cut off while thinking") == ("cut off while thinking", "", False)
    # one text: split at the first </think>, so reasoning + </think> + proof rebuilds the reply
    assert D.split_reply("<think>\nidea\n</think>\n\nproof </think> more") == ("idea", "proof </think> more", True)
    assert D.split_reply("no closing tag") == ("no closing tag", "", False)
    assert D.split_reply(None) == ("", "", False)
    # a reasoning parser's reply to an empty thinking: "" beside a proof without </think> (our serve, SGLang)
    assert D.split_reply("$\\boxed{5}$", "") == ("", "$\\boxed{5}$", True)
    assert D.split_reply("idea</think>proof", "") == ("idea", "proof", True)  # a field sent empty by a parserless one


def test_parse_chat_and_request_body():
    reply = {"choices": [{"message": {"content": "a</think>b", "reasoning_content": None}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
    assert D.parse_chat(reply) == {"content": "a</think>b", "reasoning": None, "finish_reason": "stop",
                                   "prompt_tokens": 5, "completion_tokens": 3}
    with pytest.raises(KeyError):
        D.parse_chat({"error": "overloaded"})
    from qednano_jax.config import load_datagen_config
    cfg = load_datagen_config("configs/datagen/distill.yaml", ["distill.extra_body={top_p: 0.95}"])
    body = D.request_body(cfg, "Prove it.")
    assert body == {"model": "deepseek-ai/DeepSeek-Math-V2", "messages": [{"role": "user", "content": "Prove it."}],
                    "temperature": 1.0, "max_tokens": 124928, "chat_template_kwargs": {"enable_thinking": True},
                    "top_p": 0.95}


def test_prompt_options_reach_the_request_and_the_messages():
    from qednano_jax.config import load_datagen_config
    cfg = load_datagen_config("configs/datagen/tiny.yaml", ["distill.system_prompt=Be rigorous.",
                                                            "distill.prompt_template='Prove: {problem}'",
                                                            "distill.enable_thinking=false"])
    body = D.request_body(cfg, "x > 0")
    assert body["messages"] == [{"role": "system", "content": "Be rigorous."},
                                {"role": "user", "content": "Prove: x > 0"}]
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["max_tokens"] == 16
    rec = {"problem_id": 0, "problem": "x > 0", "source": "aops",
           "samples": [{"reasoning_content": "r", "proof": "p", "grade": 5}, {"reasoning_content": "r", "proof": ""}]}
    rows, no_proof = D.sft_rows([rec], cfg)
    assert no_proof == 1 and len(rows) == 1
    assert rows[0]["messages"][:2] == body["messages"] and rows[0]["gemini-3-pro-grade"] == 5


def test_grades_use_the_rubric_column_or_the_default_scheme():
    from qednano_jax.config import DistillConfig, GraderConfig
    from qednano_jax.reward import grader as G

    seen = []

    class Scripted(G.Grader):
        def _reply(self, prompt):
            seen.append(prompt)
            return (None, "HTTP 503", 2) if "BROKEN" in prompt else ("<score>6</score>", "", 1)

    g = Scripted(GraderConfig(max_failure_frac=1.0))  # per-sample grade errors are recorded, not fatal, here
    samples = [{"proof": "fine"}, {"proof": ""}, {"proof": "BROKEN"}]
    D._grade(g, {"problem": "P", "scheme": "SCHEME-A"}, samples, DistillConfig(grade=True, rubric_column="scheme"))
    assert [s["grade"] for s in samples] == [6, 0, None] and "HTTP 503" in samples[2]["grade_error"]
    assert len(seen) == 2 and all("SCHEME-A" in s for s in seen)
    D._grade(g, {"problem": "P"}, [{"proof": "fine"}], DistillConfig(grade=True, rubric_column="scheme"))
    assert DistillConfig().default_rubric in seen[-1]


def test_changed_input_under_an_existing_journal_is_an_error(tmp_path):
    (tmp_path / D.JOURNAL).write_text(json.dumps({"problem_id": 0, "problem": "old text", "samples": []}) + "\n")
    with pytest.raises(D.DataError, match="problem 0 is not the input's row 0"):
        D.Journal(tmp_path / D.JOURNAL, [{"problem_id": 0, "problem": "new text"}])


def test_torn_last_line_is_cut(tmp_path):
    path = tmp_path / D.JOURNAL
    good = json.dumps({"problem_id": 0, "problem": "p", "samples": []}) + "\n"
    path.write_text(good + '{"problem_id": 1, "prob')
    j = D.Journal(path, [{"problem_id": 0, "problem": "p"}, {"problem_id": 1, "problem": "q"}])
    j.close()
    assert list(j.records) == [0] and path.read_text() == good


# ----------------------------------------------------------------------------------------------- real SGLang server

def _cmd(server, tiny_hf_dir, problems: Path, out: Path, *extra: str) -> list[str]:
    from transformers import AutoTokenizer
    think_close = AutoTokenizer.from_pretrained(str(tiny_hf_dir)).convert_tokens_to_ids("</think>")
    url = f"{server.url}/v1"
    # logit_bias on </think>: a random model rarely closes its thinking in 12 tokens; with the bias most samples
    # have a reasoning part and a proof, so both columns are exercised
    return [sys.executable, "-m", "qednano_jax.data.distill", "configs/datagen/tiny.yaml",
            f"problems.path={problems}", "problems.limit=0", f"distill.out_dir={out}", "distill.n=2",
            f"teacher.base_url={url}", "teacher.max_tokens=12", f"grader.base_url={url}", "distill.grade=true",
            "distill.progress=false", f"distill.extra_body={{logit_bias: {{'{think_close}': 2.0}}}}", *extra]


@pytest.mark.slow  # two CLI runs (one SIGKILLed) against the CPU server: about a minute
@pytest.mark.sglang
def test_distill_end_to_end_kill_resume_and_sft_load(sglang_server, tiny_hf_dir, tmp_path):
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"problem": p, "source": "aops", "category": "Algebra"}) + "\n"
                                for p in PROBLEMS))
    out = tmp_path / "distill"
    journal = out / D.JOURNAL
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    # 1. run with one request in flight; SIGKILL it once some problems are durable
    proc = subprocess.Popen(_cmd(sglang_server, tiny_hf_dir, problems, out, "teacher.concurrency=1"), cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"distill ended before it could be killed: {proc.stdout.read().decode()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = journal.read_bytes()
    lines_before = before.decode().splitlines()
    assert 2 <= len(lines_before) < len(PROBLEMS)
    assert not (out / f"{D.EXPORT}.jsonl").exists()

    # 2. resume: only the missing problems are requested; the durable lines stay as they were
    r = subprocess.run(_cmd(sglang_server, tiny_hf_dir, problems, out, "teacher.concurrency=3"), cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    after = journal.read_bytes()
    assert after.startswith(before)
    records = [json.loads(line) for line in after.decode().splitlines()]
    assert sorted(rec["problem_id"] for rec in records) == list(range(len(PROBLEMS)))
    assert [rec["problem"] for rec in sorted(records, key=lambda x: x["problem_id"])] == PROBLEMS
    done_first = {json.loads(line)["problem_id"] for line in lines_before}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"]["prompt_tokens"] == sum(s["prompt_tokens"] for rec in records for s in rec["samples"]
                                                       if rec["problem_id"] not in done_first)
    samples = [s for rec in records for s in rec["samples"]]
    for rec in records:
        assert [s["sample"] for s in rec["samples"]] == [0, 1]
        assert (rec["source"], rec["category"]) == ("aops", "Algebra")
    for s in samples:
        assert 0 < s["completion_tokens"] <= 12 and s["finish_reason"] in ("stop", "length")
        assert s["closed"] or not s["proof"]  # closed thinking may still leave an empty proof ("...</think>")
        assert s["grade"] is None or (isinstance(s["grade"], int) and 0 <= s["grade"] <= 7)
        if not s["proof"]:
            assert s["grade"] == 0  # no proof: scored 0 without a grader call (docs/recipe.md §3)
    assert summary["samples"] == 2 * len(PROBLEMS) and summary["finished"] == len(PROBLEMS)
    assert summary["completion_tokens"] == sum(s["completion_tokens"] for s in samples)
    assert summary["unclosed_thinking"] == sum(not s["closed"] for s in samples)

    # 3. the export: FineProofs-SFT rows, one per sample with a proof, in (problem, sample) order
    rows = [json.loads(line) for line in (out / f"{D.EXPORT}.jsonl").read_text().splitlines()]
    expect = [(rec["problem"], s) for rec in sorted(records, key=lambda x: x["problem_id"]) for s in rec["samples"]
              if s["proof"]]
    assert rows, "no sample closed its thinking: the export is empty"
    assert len(rows) == len(expect) == summary["exported_rows"]
    for row, (problem, s) in zip(rows, expect):
        assert list(row) == ["problem", "reasoning_content", "proof", "source", "category", "gemini-3-pro-grade",
                             "messages"]
        assert (row["problem"], row["reasoning_content"], row["proof"]) == (problem, s["reasoning_content"],
                                                                           s["proof"])
        assert row["gemini-3-pro-grade"] == s["grade"]
        assert row["messages"] == [{"role": "user", "content": problem}, {"role": "assistant", "content": (
            f"<think>\n{s['reasoning_content']}\n</think>\n\n{s['proof']}")}]
    import datasets
    parquet = datasets.load_dataset("parquet", data_files=str(out / f"{D.EXPORT}.parquet"), split="train").to_list()
    assert parquet == rows

    # 4. the SFT stage loads it as it is
    from qednano_jax.config import DataConfig
    from qednano_jax.data import sft
    from qednano_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_hf_dir)
    for path in (out / f"{D.EXPORT}.parquet", out / f"{D.EXPORT}.jsonl"):
        ds, stats = sft.sft_batches(DataConfig(path=str(path), tokenizer=str(tiny_hf_dir), seq_len=256),
                                    batch_rows=2, tokenizer=tok, log=lambda s: None)
        assert (stats.rows, stats.used, stats.skipped_malformed) == (len(rows), len(rows), 0)
        batch = next(iter(ds))
        assert batch["tokens"].shape == (2, 256) and batch["loss_mask"].sum() > 0


def test_unreachable_teacher_fails_problems_without_writing_them(tmp_path):
    """Every request fails (connection refused, after its retry): nothing is written, the summary names the
    failures, the command exits 1, and a later run would redo those problems."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"problem": p}) + "\n" for p in PROBLEMS[:2]))
    out = tmp_path / "out"
    args = ["configs/datagen/tiny.yaml", f"problems.path={problems}", f"distill.out_dir={out}",
            f"teacher.base_url=http://127.0.0.1:{port}/v1", "teacher.retries=1", "teacher.backoff=[0.01]",
            "distill.grade=false", "distill.progress=false"]
    assert D.cli(args, "distill", D.__doc__, D.run_distill) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["finished"], summary["failed"], summary["exported_rows"]) == (0, 2, 0)
    assert all(f"127.0.0.1:{port}" in e for e in summary["failed_errors"].values())
    assert (out / D.JOURNAL).read_text() == "" and (out / f"{D.EXPORT}.jsonl").read_text() == ""
