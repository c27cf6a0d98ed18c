"""Marking schemes and difficulty estimates: problems -> FineProofs-RL rows (docs/recipe.md §3 "Data: FineProofs-RL").

    python -m qednano_jax.data.rubrics configs/datagen/rubrics.yaml [key=value ...]

1. Scheme: the `writer` endpoint (the paper: Gemini-3-Pro) gets the problem and, when `problems.solution_column`
   names one, the official solution, through `rubrics.prompt_file` (ours: qednano_jax/prompts/marking_scheme.txt,
   written in our own words after the structure of docs/recipe.md §3): Checkpoints worth 7 points in whole numbers, key
   ideas >= 4 and routine work <= 3, alternative approaches as parallel chains scored by their best chain;
   Zero-credit items; Deductions. `check_scheme` verifies that structure; a scheme that fails it is reported and,
   unless `rubrics.keep_invalid`, left out of the export.
2. Difficulty: `rubrics.k` policy rollouts per problem (the paper: 128 of Qwen3-4B-Thinking-2507) through the
   Rollout interface (native engine or SGLang servers, the `rollout` section) on the RL prompt, each graded against
   the scheme by the `grader` section exactly as RL rewards are (proof after `</think>`, empty proof = 0 without a
   call, a grader failure = 0 and counted) -> `scores` (0..7), `rewards` (= scores / 7), `num_rewards`,
   `reward_mean` and `reward_std` (population std, ddof 0), the columns the RL stage filters on.

Resumable like distill: `out_dir/rubrics.jsonl` gets one line per finished problem (fsynced); a re-run skips them. A
problem whose writer call failed is not written (a re-run retries it). The export `out_dir/fineproofs_rl.{jsonl,
parquet}` has the FineProofs-RL columns (problem, source, rubrics, scores, rewards, num_rewards, reward_mean,
reward_std, then any other kept columns), which `data.path` of an RL config reads as they are.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from qednano_jax.config import ConfigError, DataGenConfig, to_dict
from qednano_jax.data.distill import Journal, cli, load_problems, write_export

JOURNAL = "rubrics.jsonl"
EXPORT = "fineproofs_rl"
PROMPT_FIELDS = frozenset({"problem", "solution"})
NO_SOLUTION = "(No official solution is given. Solve the problem yourself before writing the scheme.)"
RL_COLUMNS = ("problem", "source", "rubrics", "scores", "rewards", "num_rewards", "reward_mean", "reward_std")
TOTAL = 7


# ----------------------------------------------------------------------------------------------- the scheme

def load_scheme_prompt(path: str = "") -> str:
    """The scheme-writer template ('' = the bundled one); it must use exactly {problem} and {solution}."""
    from qednano_jax import prompts
    return prompts.load(path, "marking_scheme.txt", PROMPT_FIELDS, "rubrics.prompt_file")


def scheme_text(reply: str) -> str:
    """The scheme in a writer reply: the text after the last `</think>` (a reasoning writer), stripped."""
    return reply.rsplit("</think>", 1)[-1].strip()


_HEAD = re.compile(r"^[ \t#*]*(checkpoints|zero[- ]credit items|deductions)\b(.*)$", re.IGNORECASE | re.MULTILINE)
_POINTS = re.compile(r"\((\d+)\s*(?:pts?|points?)\b([^)]*)\)", re.IGNORECASE)
_CHAIN = re.compile(r"^[ \t#*]*chain\s+([A-Z])\b", re.IGNORECASE | re.MULTILINE)


def check_scheme(text: str) -> list[str]:
    """What is wrong with a marking scheme's structure (docs/recipe.md §3); [] when it is well formed.

    Checks: the three sections (Checkpoints, Zero-credit items, Deductions) in that order; checkpoint lines carry
    `(P pts, key|routine)` with whole P; each chain (or the single list) adds up to 7; key points >= 4 and routine
    points <= 3 within each chain when the items are tagged.
    """
    if not text.strip():
        return ["empty scheme"]
    heads = {}
    for m in _HEAD.finditer(text):
        heads.setdefault(m.group(1).lower().replace("-", " "), m.start())
    issues = [f"no '{name}' section" for name in ("checkpoints", "zero credit items", "deductions")
              if name not in heads]
    if issues:
        return issues
    if not heads["checkpoints"] < heads["zero credit items"] < heads["deductions"]:
        issues.append("sections are not in the order Checkpoints, Zero-credit items, Deductions")
    body = text[heads["checkpoints"]:heads["zero credit items"]]
    body = body.split("\n", 1)[1] if "\n" in body else ""
    chains: dict[str, list[tuple[int, str]]] = {}
    current = "-"
    for line in body.splitlines():
        m = _CHAIN.match(line)
        if m:
            current = m.group(1)
            continue
        for pts, tail in _POINTS.findall(line):
            tag = "key" if "key" in tail.lower() else "routine" if "routine" in tail.lower() else ""
            chains.setdefault(current, []).append((int(pts), tag))
    if not chains:
        return issues + ["no checkpoint with a point value like '(2 pts)'"]
    for name, items in chains.items():
        where = "checkpoints" if name == "-" else f"chain {name}"
        total = sum(p for p, _ in items)
        if total != TOTAL:
            issues.append(f"{where} add up to {total}, not {TOTAL}")
        if all(tag for _, tag in items):
            key = sum(p for p, t in items if t == "key")
            if key < 4:
                issues.append(f"{where}: key ideas carry {key} < 4 points")
            if total - key > 3:
                issues.append(f"{where}: routine work carries {total - key} > 3 points")
    return issues


def writer_prompt(template: str, problem: dict, solution_column: str) -> str:
    sol = problem.get(solution_column) if solution_column else None
    sol = sol if isinstance(sol, str) and sol.strip() else NO_SOLUTION
    return template.format(problem=problem["problem"], solution=sol)


# ----------------------------------------------------------------------------------------------- difficulty

def reward_stats(scores: list[int]) -> dict:
    """The FineProofs-RL reward columns of a list of 0..7 grades."""
    rewards = [s / TOTAL for s in scores]
    return {"scores": list(scores), "rewards": rewards, "num_rewards": len(scores),
            "reward_mean": float(np.mean(rewards)) if rewards else None,
            "reward_std": float(np.std(rewards)) if rewards else None}


def make_policy(cfg: DataGenConfig):
    """(Rollout, tokenizer) for the difficulty rollouts: the eval stage's policy loader with `rubrics.policy` as the
    checkpoint (native engine) or the SGLang servers of the `rollout` section."""
    import types

    from qednano_jax.eval.run import load_policy
    from qednano_jax.rollout import make_rollout

    r = cfg.rubrics
    if cfg.rollout.backend == "native" and not r.policy:
        raise ConfigError("rubrics.policy: the native rollout backend needs the policy's HF checkpoint dir")
    shim = types.SimpleNamespace(eval=types.SimpleNamespace(checkpoint=r.policy or "random", tokenizer=r.tokenizer,
                                                            seed=r.seed),
                                 rollout=cfg.rollout, mesh=cfg.mesh, model=cfg.model)
    try:
        model_cfg, placed, tokenizer = load_policy(shim)
    except ConfigError as e:  # the eval loader names its own fields
        raise ConfigError(str(e).replace("eval.checkpoint", "rubrics.policy").replace("eval.tokenizer",
                                                                                       "rubrics.tokenizer")) from None
    params, mesh, rules = placed if placed else (None, None, None)
    return make_rollout(cfg.rollout, model_cfg, params, tokenizer, mesh=mesh, rules=rules), tokenizer


def estimate(rollout, tokenizer, grader, rcfg, items: list[tuple[dict, str]], seed: int) -> list[dict]:
    """k graded rollouts for each (problem, scheme): reward columns plus counts of truncated and failed grades."""
    from qednano_jax.data.tokenizer import prompt_ids
    from qednano_jax.rollout.base import SamplingParams

    ids = [prompt_ids(tokenizer, rcfg.prompt_template.format(problem=p["problem"])) for p, _ in items]
    sp = SamplingParams(max_new_tokens=rcfg.max_tokens, temperature=rcfg.temperature, top_p=rcfg.top_p,
                        top_k=rcfg.top_k, seed=seed)
    groups = rollout.generate(ids, sp, n=rcfg.k)
    results = grader.grade_many([(p["problem"], scheme, grader.proof_of(c.text))
                                 for (p, scheme), g in zip(items, groups) for c in g])
    out = []
    for i, g in enumerate(groups):
        rs = results[i * rcfg.k:(i + 1) * rcfg.k]
        out.append({**reward_stats([r.score for r in rs]), "grader_failures": sum(r.failed for r in rs),
                    "no_proof": sum(r.skipped for r in rs), "truncated": sum(c.finish_reason == "length" for c in g),
                    "completion_tokens": sum(len(c.token_ids) for c in g)})
    return out


# ----------------------------------------------------------------------------------------------- the run

def rl_rows(records: list[dict], cfg: DataGenConfig) -> list[dict]:
    """Journal records -> FineProofs-RL rows (the dataset's column order, then other kept columns); schemes that
    are empty, or invalid while rubrics.keep_invalid is off, are left out."""
    rows = []
    for rec in records:
        if not rec["rubrics"].strip() or (rec["scheme_issues"] and not cfg.rubrics.keep_invalid):
            continue
        row = {c: rec[c] for c in RL_COLUMNS if c in rec}
        row.update({c: rec[c] for c in cfg.problems.keep_columns if c in rec and c not in row})
        rows.append(row)
    return rows


def run_rubrics(cfg: DataGenConfig, log: Callable[[str], None] = print) -> dict:
    """Schemes (+ difficulty) for every problem not yet in the journal, then export; returns the summary."""
    import json

    from tqdm import tqdm

    from qednano_jax.reward.grader import OpenAIGrader, make_grader

    r = cfg.rubrics
    template = load_scheme_prompt(r.prompt_file)
    extra = (cfg.problems.solution_column,) if cfg.problems.solution_column else ()
    problems = load_problems(cfg.problems, extra)
    out_dir = Path(r.out_dir)
    journal = Journal(out_dir / JOURNAL, problems)
    todo = [p for p in problems if p["problem_id"] not in journal.records]
    log(f"rubrics: {len(problems)} problems, {len(journal.records)} already in {journal.path}, {len(todo)} to do; "
        f"writer {cfg.writer.model} at {cfg.writer.base_url}"
        + (f"; difficulty: {r.k} rollouts each on {cfg.rollout.backend}, graded by {cfg.grader.model}"
           if r.difficulty else ""))
    writer = OpenAIGrader(cfg.writer, role="scheme writer")
    rollout = tokenizer = grader = None
    if r.difficulty and todo:
        rollout, tokenizer = make_policy(cfg)
        grader = make_grader(cfg.grader)
    start = time.monotonic()
    failed: dict[int, str] = {}
    bar = tqdm(total=len(problems), initial=len(journal.records), unit="problem", desc="rubrics",
               disable=not r.progress, dynamic_ncols=True)
    gen_tokens = 0
    try:
        for b in range(0, len(todo), r.batch_problems):
            batch = todo[b:b + r.batch_problems]
            answers = writer.ask_many([writer_prompt(template, p, cfg.problems.solution_column) for p in batch])
            done = []
            for p, (reply, error, _, _) in zip(batch, answers):
                if reply is None:
                    failed[p["problem_id"]] = error
                    continue
                scheme = scheme_text(reply)
                done.append((p, scheme, check_scheme(scheme)))
            usable = [(p, s) for p, s, issues in done if s.strip() and (not issues or r.keep_invalid)]
            est = {}
            if grader is not None and usable:
                seed = int(np.random.default_rng([r.seed, usable[0][0]["problem_id"]]).integers(2**31))
                for (p, _), e in zip(usable, estimate(rollout, tokenizer, grader, r, usable, seed)):
                    est[p["problem_id"]] = e
            for p, scheme, issues in done:
                e = est.get(p["problem_id"]) or {**reward_stats([]), "grader_failures": 0, "no_proof": 0,
                                                  "truncated": 0, "completion_tokens": 0}
                gen_tokens += e["completion_tokens"]
                journal.append({"problem_id": p["problem_id"], "problem": p["problem"],
                                **{c: p[c] for c in p if c not in ("problem_id", "problem")},
                                "rubrics": scheme, "scheme_issues": issues, **e})
                bar.update(1)
            bar.set_postfix(failed=len(failed), gen_tok=gen_tokens,
                            gen_tok_s=f"{gen_tokens / max(time.monotonic() - start, 1e-9):.1f}")
    finally:
        bar.close()
        journal.close()
        if rollout is not None and hasattr(rollout, "close"):
            rollout.close()
    records = journal.sorted()
    rows = rl_rows(records, cfg)
    jsonl, parquet = write_export(rows, out_dir, EXPORT)
    means = [x["reward_mean"] for x in rows if x.get("reward_mean") is not None]
    summary = {
        "problems": len(problems), "finished": len(records), "failed": len(failed),
        "failed_errors": {str(k): v for k, v in sorted(failed.items())[:20]},
        "invalid_schemes": {str(x["problem_id"]): x["scheme_issues"] for x in records if x["scheme_issues"]},
        "exported_rows": len(rows), "left_out": len(records) - len(rows),
        "rollouts": sum(x["num_rewards"] for x in records), "grader_failures": sum(x["grader_failures"]
                                                                                   for x in records),
        "reward_mean_histogram": np.histogram(means, bins=10, range=(0, 1))[0].tolist() if means else [],
        "this_run": {"seconds": round(time.monotonic() - start, 2), "completion_tokens": gen_tokens},
        "export": [str(jsonl), str(parquet)], "journal": str(journal.path), "config": to_dict(r),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    failed_note = f" ({len(failed)} failed this run: re-run to retry them)" if failed else ""
    log(f"rubrics: {len(records)}/{len(problems)} problems done{failed_note}; {len(summary['invalid_schemes'])} schemes fail the format check; {len(rows)} rows -> {jsonl} and "
        f"{parquet}; {summary['rollouts']} graded rollouts ({summary['grader_failures']} grader failures)")
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli(argv, "rubrics", __doc__, run_rubrics)


if __name__ == "__main__":
    sys.exit(main())
