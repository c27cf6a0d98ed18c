"""Teacher distillation: problems -> teacher proofs -> FineProofs-SFT rows (docs/recipe.md §2 "Data generation").

    python -m qednano_jax.data.distill configs/datagen/distill.yaml [key=value ...]

Each problem (`problems.text_column` of a local file or hub dataset) becomes the user message (`distill.
prompt_template`; no system prompt by default) of `distill.n` chat-completion requests to the `teacher` endpoint
(any OpenAI-compatible `/v1/chat/completions`: SGLang's, vLLM's, a hosted API), with thinking enabled through
`chat_template_kwargs.enable_thinking`. The paper: DeepSeek-Math-V2 on SGLang, temperature 1.0, 124,928 new tokens,
1 or 3 samples per problem. Requests go through the grader's HTTP transport (`OpenAIGrader.request`: key from the
environment, timeout, bounded retries with backoff), `teacher.concurrency` at a time.

A reply is split into `reasoning_content` and `proof` (`split_reply`): the `reasoning_content` field when the server
separates reasoning (SGLang with `--reasoning-parser`), else the text before the first `</think>`. A sample whose
thinking never closed (truncated) has no proof: it is kept in the journal and counted, and left out of the export
(the SFT stage needs a proof). With `distill.grade`, each proof is graded 0..7 by the `grader` section into
`distill.grade_field` (the paper graded with Gemini-3-Pro into `gemini-3-pro-grade`).

Resumable: `out_dir/distill.jsonl` gets one line per finished problem (all n samples), appended, flushed and
fsynced; a re-run skips the problems already there, so a killed run loses only the problems in flight. At the end
the journal is exported as FineProofs-SFT rows to `out_dir/fineproofs_sft.{jsonl,parquet}`, which `data.path` of
an SFT config reads as they are, and `out_dir/summary.json` says what happened.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from qednano_jax.config import DataGenConfig, describe, load_datagen_config, to_dict
from qednano_jax.data.rows import DataError, check_mapping, load_rows
from qednano_jax.journal import cut_torn_line

JOURNAL = "distill.jsonl"
EXPORT = "fineproofs_sft"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


# ----------------------------------------------------------------------------------------------- problems

def load_problems(pcfg, extra_columns: tuple[str, ...] = ()) -> list[dict]:
    """The input problems as {problem_id, problem, <keep_columns present>, <extra_columns present>}; problem_id is
    the row's index. A missing text column or an empty problem is an error naming the row and the column."""
    rows = load_rows(pcfg.path, name=pcfg.name, split=pcfg.split, key="problems.path")
    if pcfg.limit:
        rows = rows[: pcfg.limit]
    first = check_mapping(rows, 0)
    if pcfg.text_column not in first:
        raise DataError(f"problems.text_column: {pcfg.path} has no column {pcfg.text_column!r} (columns: "
                        f"{sorted(first)})")
    out = []
    for i in range(len(rows)):
        row = check_mapping(rows, i)
        text = row.get(pcfg.text_column)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{rows.where(i)}: column {pcfg.text_column!r} is "
                            f"{'empty' if isinstance(text, str) else type(text).__name__}, expected the problem text")
        item = {"problem_id": i, "problem": text}
        for c in (*pcfg.keep_columns, *extra_columns):
            if c and c in row and c not in item:
                item[c] = row[c]
        out.append(item)
    return out


# ----------------------------------------------------------------------------------------------- the journal

class Journal:
    """Append-only JSONL with one line per finished problem (key `problem_id`), durable line by line.

    A torn last line (the process died mid-write) is cut on open. A line whose problem text differs from the
    input's row of the same id means the input changed under an existing out_dir: that is an error, never a mix.
    """

    def __init__(self, path: Path, problems: list[dict]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[int, dict] = {}
        if self.path.exists():
            cut_torn_line(self.path)
            by_id = {p["problem_id"]: p["problem"] for p in problems}
            for n, line in enumerate(self.path.read_text().splitlines(), 1):
                rec = json.loads(line)
                pid = rec["problem_id"]
                if by_id.get(pid) != rec["problem"]:
                    raise DataError(f"{self.path}: line {n}: problem {pid} is not the input's row {pid} (did "
                                    "problems.path or problems.limit change? use a fresh out_dir)")
                if pid in self.records:
                    raise DataError(f"{self.path}: line {n}: problem {pid} appears twice")
                self.records[pid] = rec
        self._lock = threading.Lock()
        self._f = open(self.path, "ab")

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self._lock:
            if record["problem_id"] in self.records:
                raise RuntimeError(f"{self.path}: problem {record['problem_id']} is already in the journal")
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())
            self.records[record["problem_id"]] = record

    def close(self) -> None:
        self._f.close()

    def sorted(self) -> list[dict]:
        return [self.records[k] for k in sorted(self.records)]


def write_export(rows: list[dict], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """rows -> out_dir/stem.jsonl and out_dir/stem.parquet (each written to a temp name, then renamed)."""
    import datasets

    jsonl, parquet = out_dir / f"{stem}.jsonl", out_dir / f"{stem}.parquet"
    tmp = jsonl.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(jsonl)
    if rows:
        tmp = parquet.with_suffix(".parquet.tmp")
        datasets.Dataset.from_list(rows).to_parquet(str(tmp))
        tmp.replace(parquet)
    return jsonl, parquet


# ----------------------------------------------------------------------------------------------- one request

def split_reply(content: str | None, reasoning: str | None = None) -> tuple[str, str, bool]:
    """(reasoning_content, proof, closed) of a teacher reply.

    A `reasoning` (the API's `reasoning_content` field: the server's reasoning parser split the reply) is the
    reasoning and `content` the proof; an empty string there is an empty thinking when `content` has no `</think>`
    of its own (None: the server sent no such field). Otherwise `content` holds both: the reasoning is the text
    before the first `</think>` (a leading `<think>` dropped) and the proof everything after it, so
    `reasoning + </think> + proof` rebuilds the reply. No `</think>` means the thinking never closed (truncated):
    no proof, closed = False.
    """
    content = content or ""
    if reasoning is not None and (reasoning.strip() or THINK_CLOSE not in content):
        return reasoning.strip(), content.strip(), bool(content.strip())
    text = content.lstrip()
    if text.startswith(THINK_OPEN):
        text = text[len(THINK_OPEN):]
    if THINK_CLOSE not in text:
        return text.strip(), "", False
    head, tail = text.split(THINK_CLOSE, 1)
    return head.strip(), tail.strip(), True


def parse_chat(data: dict) -> dict:
    """A chat-completions reply -> {content, reasoning, finish_reason, prompt_tokens, completion_tokens}. A body
    without `choices[0].message` raises (the transport retries it as malformed)."""
    choice = data["choices"][0]
    msg = choice["message"]
    if not isinstance(msg, dict):
        raise ValueError("choices[0].message is not an object")
    usage = data.get("usage") or {}
    return {"content": msg.get("content") or "", "reasoning": msg.get("reasoning_content"),
            "finish_reason": choice.get("finish_reason") or "",
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": int(usage.get("completion_tokens") or 0)}


def user_message(dcfg, problem: str) -> str:
    return dcfg.prompt_template.format(problem=problem)


def chat_messages(dcfg, problem: str) -> list[dict]:
    sys_msg = [{"role": "system", "content": dcfg.system_prompt}] if dcfg.system_prompt else []
    return sys_msg + [{"role": "user", "content": user_message(dcfg, problem)}]


def request_body(cfg: DataGenConfig, problem: str) -> dict:
    """The chat-completions body of one teacher sample (every sampling field explicit; extra_body merged last)."""
    t, d = cfg.teacher, cfg.distill
    body = {"model": t.model, "messages": chat_messages(d, problem), "temperature": t.temperature,
            "max_tokens": t.max_tokens, "chat_template_kwargs": {"enable_thinking": d.enable_thinking}}
    if t.reasoning_effort:
        body["reasoning_effort"] = t.reasoning_effort
    return {**body, **d.extra_body}


def assistant_content(reasoning: str, proof: str) -> str:
    """The assistant turn of FineProofs-SFT `messages` (as the dataset writes it)."""
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{proof}"


# ----------------------------------------------------------------------------------------------- the run

def sft_rows(records: list[dict], cfg: DataGenConfig) -> tuple[list[dict], int]:
    """Journal records -> FineProofs-SFT rows (problem, reasoning_content, proof, <kept columns>, <grade>, messages)
    in (problem, sample) order; samples without a proof are left out and counted."""
    rows, no_proof = [], 0
    for rec in records:
        for s in rec["samples"]:
            if not s["proof"].strip():
                no_proof += 1
                continue
            row = {"problem": rec["problem"], "reasoning_content": s["reasoning_content"], "proof": s["proof"]}
            row.update({c: rec[c] for c in cfg.problems.keep_columns if c in rec})
            if cfg.distill.grade:
                row[cfg.distill.grade_field] = s.get("grade")
            row["messages"] = chat_messages(cfg.distill, rec["problem"]) + [
                {"role": "assistant", "content": assistant_content(s["reasoning_content"], s["proof"])}]
            rows.append(row)
    return rows, no_proof


def run_distill(cfg: DataGenConfig, log: Callable[[str], None] = print) -> dict:
    """Distill every problem not yet in the journal, then export; returns (and writes) the summary."""
    from tqdm import tqdm

    from qednano_jax.reward.grader import OpenAIGrader, make_grader

    d = cfg.distill
    extra = (d.rubric_column,) if d.grade and d.rubric_column else ()
    problems = load_problems(cfg.problems, extra)
    out_dir = Path(d.out_dir)
    journal = Journal(out_dir / JOURNAL, problems)
    todo = [p for p in problems if p["problem_id"] not in journal.records]
    log(f"distill: {len(problems)} problems, {len(journal.records)} already in {journal.path}, {len(todo)} to do "
        f"({d.n} samples each) from {cfg.teacher.model} at {cfg.teacher.base_url}")
    teacher = OpenAIGrader(cfg.teacher, role="teacher")
    grader = make_grader(cfg.grader) if d.grade and todo else None
    start = time.monotonic()
    tokens = {"prompt": 0, "completion": 0}
    failed: dict[int, str] = {}

    def sample(p: dict, s: int):
        t0 = time.monotonic()
        reply, error, attempts = teacher.request(request_body(cfg, p["problem"]), parse_chat)
        return p, s, reply, error, attempts, time.monotonic() - t0

    bar = tqdm(total=len(problems), initial=len(journal.records), unit="problem", desc="distill",
               disable=not d.progress, dynamic_ncols=True)
    pending: dict[int, dict[int, dict]] = {}
    pool = cf.ThreadPoolExecutor(cfg.teacher.concurrency, thread_name_prefix="teacher")
    try:
        futures = [pool.submit(sample, p, s) for p in todo for s in range(d.n)]
        for fut in cf.as_completed(futures):
            p, s, reply, error, attempts, latency = fut.result()
            pid = p["problem_id"]
            if reply is None:
                failed.setdefault(pid, error)
                continue
            tokens["prompt"] += reply["prompt_tokens"]
            tokens["completion"] += reply["completion_tokens"]
            reasoning, proof, closed = split_reply(reply["content"], reply["reasoning"])
            pending.setdefault(pid, {})[s] = {
                "sample": s, "reasoning_content": reasoning, "proof": proof, "closed": closed,
                "finish_reason": reply["finish_reason"], "prompt_tokens": reply["prompt_tokens"],
                "completion_tokens": reply["completion_tokens"], "attempts": attempts,
                "latency_s": round(latency, 3)}
            if len(pending[pid]) < d.n or pid in failed:
                continue
            got = pending.pop(pid)
            samples = [got[k] for k in range(d.n)]
            if grader is not None:
                _grade(grader, p, samples, d)
            journal.append({**p, "samples": samples})
            bar.update(1)
            elapsed = max(time.monotonic() - start, 1e-9)
            bar.set_postfix(prompt_tok=tokens["prompt"], gen_tok=tokens["completion"],
                            gen_tok_s=f"{tokens['completion'] / elapsed:.1f}", failed=len(failed))
    finally:  # on Ctrl-C, drop the queued requests instead of waiting for them
        pool.shutdown(wait=False, cancel_futures=True)
        bar.close()
        journal.close()
    records = journal.sorted()
    rows, no_proof = sft_rows(records, cfg)
    jsonl, parquet = write_export(rows, out_dir, EXPORT)
    samples = [s for r in records for s in r["samples"]]
    summary = {
        "problems": len(problems), "finished": len(records), "failed": len(failed),
        "failed_errors": {str(k): v for k, v in sorted(failed.items())[:20]},
        "samples": len(samples), "unclosed_thinking": sum(not s["closed"] for s in samples),
        "finish_reasons": _count(s["finish_reason"] for s in samples),
        "exported_rows": len(rows), "left_out_no_proof": no_proof,
        "prompt_tokens": sum(s["prompt_tokens"] for s in samples),
        "completion_tokens": sum(s["completion_tokens"] for s in samples),
        "this_run": {"seconds": round(time.monotonic() - start, 2), **{f"{k}_tokens": v for k, v in tokens.items()}},
        "grades": _count(s.get("grade") for s in samples) if d.grade else None,
        "export": [str(jsonl), str(parquet)], "journal": str(journal.path), "config": to_dict(cfg.distill),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    failed_note = f" ({summary['failed']} failed this run: re-run to retry them)" if summary["failed"] else ""
    log(f"distill: {summary['finished']}/{len(problems)} problems done{failed_note}; {len(samples)} samples, {summary['unclosed_thinking']} with unclosed thinking; "
        f"{len(rows)} rows -> {jsonl} and {parquet}; tokens: {summary['prompt_tokens']} prompt, "
        f"{summary['completion_tokens']} generated")
    return summary


def _grade(grader, p: dict, samples: list[dict], d) -> None:
    """Grade each sample's proof into sample['grade'] (None when the grader failed or gave no score)."""
    rubric = p.get(d.rubric_column) if d.rubric_column else None
    rubric = rubric if isinstance(rubric, str) and rubric.strip() else d.default_rubric
    results = grader.grade_many([(p["problem"], rubric, s["proof"]) for s in samples])
    for s, r in zip(samples, results):
        s["grade"] = None if (r.failed or r.no_score) else r.score
        if r.failed:
            s["grade_error"] = r.error


def _count(values) -> dict:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------- CLI

def cli(argv: list[str] | None, prog: str, doc: str, run: Callable[[DataGenConfig], dict]) -> int:
    """`python -m qednano_jax.data.<prog> CONFIG [key=value ...]`; exit 1 when some problems failed."""
    from qednano_jax import cli
    p = cli.ArgumentParser(prog=f"python -m qednano_jax.data.{prog}", description=doc.split("\n\n")[0],
                                epilog="config fields:\n  " + "\n  ".join(describe(DataGenConfig)),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="configs/datagen/*.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. distill.n=3")
    args = p.parse_args(argv)
    return cli.run(lambda: 1 if run(load_datagen_config(args.config, args.overrides)).get("failed") else 0)


def main(argv: list[str] | None = None) -> int:
    return cli(argv, "distill", __doc__, run_distill)


if __name__ == "__main__":
    sys.exit(main())
