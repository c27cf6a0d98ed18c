"""The eval loop (docs/recipe.md §5): generate proofs for a benchmark with a scaffold, grade each one, append it to a
resumable JSONL file, then write the avg@k report.

    for run r in 0..k-1, for each batch of problems not yet in results.jsonl:
        generate (single turn, or test-time RC) on the rollout backend
        grade every proof concurrently; each graded item is appended, flushed and fsynced as soon as it is done

A crash loses at most the items in flight (generated or being graded, not yet written); a re-run with the same
out_dir skips every item already in the file. A torn last line (a crash mid-write) is cut off before appending.
A grader that fails after its retries scores 0; the failure is recorded on the item and counted in the report.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import re
import threading
import zlib
from pathlib import Path
from typing import Any, Callable

from qednano_jax.config import ConfigError, to_dict
from qednano_jax.eval import benchmarks, prompts, report
from qednano_jax.eval.benchmarks import Format, Problem
from qednano_jax.journal import cut_torn_line
from qednano_jax.rc import prompts as rcp, testtime

RESULTS = "results.jsonl"
META = "eval_meta.json"
# Config fields that change what an item means (what was generated, by what, from which seeds, graded how); a
# resumed run must agree on them with the file's first run. batch_size fixes the sampling seeds (see `plan`).
_IDENTITY = tuple(f"eval.{k}" for k in (
    "benchmark", "source", "split", "columns", "scaffold", "rc_iterations", "checkpoint", "tokenizer",
    "max_new_tokens", "temperature", "top_p", "top_k", "summary_max_new_tokens", "summary_temperature",
    "summarizer_urls", "summarizer_tokenizer", "seed", "batch_size", "grading_prompt_file")) + tuple(
    f"grader.{k}" for k in ("backend", "base_url", "model", "api", "reasoning_effort", "temperature", "max_tokens",
                            "judge_path", "judge_tokenizer")) + ("rollout.backend", "rollout.urls")


def item_key(problem_id: str, run: int) -> str:
    return f"{problem_id}#{run}"


class ResultsFile:
    """Append-only JSONL of graded items, keyed by (problem_id, run); durable line by line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_line(self.path)
        records = report.read_results(self.path) if self.path.exists() else []
        # done items, and items whose grader failed (graded again from their stored proof: `evaluate`)
        self.keys = {item_key(r["problem_id"], int(r["run"])) for r in records if not r.get("grader_failed")}
        self.failed = {item_key(r["problem_id"], int(r["run"])): r for r in records if r.get("grader_failed")}
        self._lock = threading.Lock()
        self._f = open(self.path, "ab")

    def append(self, record: dict) -> None:
        key = item_key(record["problem_id"], int(record["run"]))
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self._lock:
            if key in self.keys:
                raise RuntimeError(f"{self.path}: item {key} is already in the file")
            self._f.write(line)
            self._f.flush()
            os.fsync(self._f.fileno())
            if not record.get("grader_failed"):
                self.keys.add(key)
                self.failed.pop(key, None)

    def close(self) -> None:
        self._f.close()


def identity(cfg: Any) -> dict:
    """The `_IDENTITY` fields of a full eval config (section.field -> value)."""
    out = {}
    for k in _IDENTITY:
        section, name = k.split(".")
        out[k] = to_dict(getattr(getattr(cfg, section), name))
    return out


def check_meta(out_dir: Path, cfg: Any, write: bool = False) -> None:
    """Refuse to mix items of a different eval into one results file (the error names the first differing key);
    `write`: record this eval's identity when out_dir has none yet (once its inputs are validated)."""
    now = identity(cfg)
    path = out_dir / META
    if path.exists():
        # files written before the keys were qualified hold eval fields by their bare names
        before = {(k if "." in k else f"eval.{k}"): v for k, v in json.loads(path.read_text()).items()}
        for k in _IDENTITY:
            if k in before and before[k] != now[k]:
                raise ConfigError(f"{k}: {out_dir} holds results made with {k}={before[k]!r}, this run has "
                                  f"{now[k]!r}; use another eval.out_dir (or the same settings to resume)")
    elif write:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(now, indent=2))


# ----------------------------------------------------------------------------------------------- generation

def single_turn(policy: Any, tokenizer: Any, texts: list[str], sampling: Any) -> list[testtime.RCResult]:
    """One completion per user message, in the same shape as an RC result with a single turn."""
    from qednano_jax.data.tokenizer import prompt_ids

    outs = policy.generate([prompt_ids(tokenizer, p) for p in texts], sampling, n=1)
    return [testtime.RCResult(turns=[testtime.Turn(prompt=p, text=rcp.decode(tokenizer, o[0].token_ids),
                                                   tokens=len(o[0].token_ids), finish_reason=o[0].finish_reason)])
            for p, o in zip(texts, outs)]


def generate(ecfg: Any, policy: Any, tokenizer: Any, texts: list[str], sampling: Any, summary_sampling: Any,
             summarizer: tuple[Any, Any] | None = None) -> list[testtime.RCResult]:
    """The scaffold: one turn, or test-time RC with `summarizer` = (rollout, tokenizer) (None = the policy)."""
    if ecfg.scaffold == "rc":
        other, other_tok = summarizer or (None, None)
        return testtime.run_rc(policy, tokenizer, texts, sampling, iterations=ecfg.rc_iterations,
                               summary_sampling=summary_sampling, summarizer=other, summarizer_tokenizer=other_tok)
    return single_turn(policy, tokenizer, texts, sampling)


# ----------------------------------------------------------------------------------------------- grading

@dataclasses.dataclass
class Grade:
    """What the report needs from one grading: points (0..max), the raw reply, and whether the grader failed."""
    score: int
    reply: str = ""
    failed: bool = False     # the grader could not be reached (after its retries)
    no_score: bool = False   # it answered, but without a valid grade
    error: str = ""


_FAKE_TAGS = re.compile(r"<(?=\s*/?\s*points\b)", re.IGNORECASE)


def make_judge(grader: Any, fmt: Format) -> Callable[[list[tuple[Problem, str]]], list[Grade]]:
    """Grade (problem, proof) pairs with the benchmark's grading prompt and parser over the grader's transport.

    `grader` is a reward.grader.Grader (any backend); `ask_many` sends finished prompts through its client
    (retries, backoff, timeouts, key handling, batching on the native judge) and we parse the replies with the
    eval parser (docs/recipe.md §5). An unreachable grader, and a reply without a valid grade, both score 0 and are recorded.
    """
    parse = prompts.parse_points if fmt.kind == "proof" else prompts.parse_verdict
    if grader.reference == "answer":  # grader.backend answer: a rule-based check, no judge model
        return lambda items: [Grade(score=int(ok), reply=f"final answer {'matches' if ok else 'differs from'} "
                                                         f"{p.answer!r} (math-verify)")
                              for p, proof in items for ok in [grader.matches(proof, p.answer)]]

    def judge(items: list[tuple[Problem, str]]) -> list[Grade]:
        asks = [benchmarks.grading_prompt(fmt, p, _FAKE_TAGS.sub("&lt;", proof)) for p, proof in items]
        grades = []
        for reply, error, *_ in grader.ask_many(asks):
            if reply is None:
                grades.append(Grade(score=0, failed=True, error=error or "grader unreachable"))
                continue
            score = parse(reply.rsplit(rcp.THINK_CLOSE, 1)[-1])  # a reasoning judge's verdict follows </think>
            grades.append(Grade(score=0, reply=reply, no_score=True, error="no valid grade in the grader reply")
                          if score is None else Grade(score=score, reply=reply))
        return grades

    return judge


def batches_grading(grader: Any) -> bool:
    """Whether the backend grades a list in one go (the native judge decodes a batch); HTTP graders get one
    request per item so that each item is written the moment its grade arrives."""
    from qednano_jax.reward.grader import Grader
    return type(grader).ask_many is not Grader.ask_many


def extract(text: str) -> str:
    """The graded text (docs/recipe.md §5): after the last `</think>`, cut at its first "Evaluation" / "Self Evaluation" /
    "Final Evaluation" heading (grader.extract_proof); "" when the thinking never closed (scored 0 without a grader
    call)."""
    from qednano_jax.reward.grader import extract_proof
    return extract_proof(text, strip_self_evaluation=True)


def record(fmt: Format, problem: Problem, run: int, gen: testtime.RCResult, proof: str, grade: Grade,
           scaffold: str) -> dict:
    """One JSONL line: the problem x run, what was generated, what was graded, and how."""
    last = gen.turns[-1]
    rec = {
        "problem_id": problem.id, "run": run, "benchmark": fmt.name, "category": problem.category,
        "scaffold": scaffold, "prompt": gen.turns[0].prompt, "completion": gen.text, "proof": proof,
        "score": grade.score, "max_score": fmt.max_score, "grader_reply": grade.reply,
        "grader_failed": grade.failed, "grader_no_score": grade.no_score,
        "grader_error": grade.error, "no_proof": not proof,
        "truncated": last.finish_reason == "length", "finish_reason": last.finish_reason,
        "tokens": gen.tokens, "summary_tokens": gen.summary_tokens,
    }
    if scaffold == "rc":
        rec["turns"] = [dataclasses.asdict(t) for t in gen.turns]
    return rec


def plan(problems: list[Problem], done: set[str], ecfg: Any) -> list[tuple[int, list[Problem], int]]:
    """(run, problems still to do, seed) per generate call. Batches are fixed slices of the problem list and the seed
    depends only on (run, slice), so a resumed run samples each missing item exactly as the interrupted run would
    have (exactly with batch_size 1; otherwise up to the row position inside a partly finished batch)."""
    out = []
    for run in range(ecfg.runs):
        for b in range(0, len(problems), ecfg.batch_size):
            batch = [p for p in problems[b:b + ecfg.batch_size] if item_key(p.id, run) not in done]
            if batch:
                out.append((run, batch, _seed(ecfg.seed, run, b // ecfg.batch_size)))
    return out


def _seed(*parts: int | str) -> int:
    """A well-mixed 31-bit seed per (eval seed, run, batch[, role]): batches never share a random stream."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def evaluate(ecfg: Any, fmt: Format, problems: list[Problem], policy: Any, tokenizer: Any,
             judge: Callable[[list[tuple[Problem, str]]], list[Grade]], extract: Callable[[str], str], *,
             concurrency: int = 8, batch_grading: bool = False, summarizer: tuple[Any, Any] | None = None,
             log: Callable[[str], None] = print) -> Path:
    """Generate and grade every (problem, run) not yet in out_dir/results.jsonl; returns the results path.

    Grading runs in a thread pool while the next batch generates; a proof is graded alone (HTTP graders: written
    as soon as its grade arrives) or with its whole batch (`batch_grading`, the native judge).
    """
    from tqdm import tqdm

    from qednano_jax.rollout.base import SamplingParams

    out_dir = Path(ecfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(out_dir / RESULTS)
    by_id = {p.id: p for p in problems}
    regrade = [r for r in results.failed.values() if r["problem_id"] in by_id]
    todo = plan(problems, results.keys | set(results.failed), ecfg)
    total = sum(len(batch) for _, batch, _ in todo) + len(regrade)
    log(f"eval {fmt.name}: {len(problems)} problems x {ecfg.runs} runs; {len(results.keys)} items already graded, "
        f"{len(regrade)} failed gradings to redo, {total - len(regrade)} to generate -> {results.path}")
    errors: list[BaseException] = []

    def regraded(old: dict, fut: cf.Future, bar) -> None:
        try:
            (grade,) = fut.result()
            results.append({**old, "score": grade.score, "grader_reply": grade.reply, "grader_failed": grade.failed,
                            "grader_no_score": grade.no_score, "grader_error": grade.error,
                            "regrades": int(old.get("regrades", 0)) + 1})
            bar.update(1)
        except BaseException as e:  # a bug, not a grader fault
            errors.append(e)

    def finish(unit: list[tuple[Problem, int, testtime.RCResult, str]], fut: cf.Future, bar) -> None:
        try:
            grades = fut.result()
            for (problem, run, gen, proof), grade in zip(unit, grades, strict=True):
                results.append(record(fmt, problem, run, gen, proof, grade, ecfg.scaffold))
                bar.update(1)
        except BaseException as e:  # a bug, not a grader fault (those come back as failed Grades)
            errors.append(e)

    pool = cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="grade")
    futures = []
    try:
        with tqdm(total=total, desc=f"eval {fmt.name}", disable=not ecfg.progress) as bar:
            for old in regrade:  # the stored proof, graded again (the item's generation is kept)
                fut = pool.submit(judge, [(by_id[old["problem_id"]], old["proof"])])
                futures.append(fut)
                fut.add_done_callback(lambda f, o=old: regraded(o, f, bar))
            for run, batch, seed in todo:
                sampling = SamplingParams(max_new_tokens=ecfg.max_new_tokens, temperature=ecfg.temperature,
                                          top_p=ecfg.top_p, top_k=ecfg.top_k, seed=seed)
                summary_sampling = dataclasses.replace(sampling, max_new_tokens=ecfg.summary_max_new_tokens,
                                                       temperature=ecfg.summary_temperature,
                                                       seed=_seed(seed, "summary"))
                gens = generate(ecfg, policy, tokenizer, [benchmarks.generation_prompt(fmt, p) for p in batch],
                                sampling, summary_sampling, summarizer)
                items = [(p, run, g, extract(g.text)) for p, g in zip(batch, gens)]
                for it in (it for it in items if not it[3]):   # no proof: 0 points, no grader call
                    finish([it], _done([Grade(score=0)]), bar)
                graded = [it for it in items if it[3]]
                units = [graded] if batch_grading and graded else [[it] for it in graded]
                for unit in units:
                    fut = pool.submit(judge, [(p, proof) for p, _, _, proof in unit])
                    futures.append(fut)
                    fut.add_done_callback(lambda f, u=unit: finish(u, f, bar))
                if errors:
                    raise errors[0]
            cf.wait(futures)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        results.close()
    if errors:
        raise errors[0]
    return results.path


def _done(value: Any) -> cf.Future:
    f: cf.Future = cf.Future()
    f.set_result(value)
    return f


# ----------------------------------------------------------------------------------------------- the whole eval

def check_checkpoint(ckpt: str) -> str:
    if ckpt != "random" and not (Path(ckpt) / "config.json").is_file():
        raise ConfigError(f"eval.checkpoint: {ckpt!r} is neither `random` nor an HF checkpoint dir (no config.json)")
    return ckpt


def load_policy(cfg: Any) -> tuple[Any, Any, Any]:
    """(model config, params or None, tokenizer) for `cfg.eval.checkpoint` on `cfg.rollout.backend`."""
    import jax

    from qednano_jax import sharding
    from qednano_jax.data.tokenizer import QWEN3, load_tokenizer
    from qednano_jax.model import qwen3

    ecfg = cfg.eval
    ckpt = check_checkpoint(ecfg.checkpoint)
    tok_name = ecfg.tokenizer or (QWEN3 if ckpt == "random" else ckpt)
    try:
        tokenizer = load_tokenizer(tok_name)
    except Exception as e:
        raise ConfigError(f"eval.tokenizer: cannot load tokenizer {tok_name!r}: {e}") from None
    if cfg.rollout.backend != "native":
        return cfg.model, None, tokenizer          # the server holds the weights
    try:
        mesh = sharding.make_mesh(cfg.mesh.shape)
    except ValueError as e:
        raise ConfigError(f"mesh.shape: {e}") from None
    rules = dict(cfg.mesh.rules)
    if ckpt == "random":
        model_cfg = cfg.model
        shardings = sharding.tree_shardings(qwen3.param_axes(model_cfg), rules, mesh, qwen3.param_shapes(model_cfg))
        params = jax.jit(lambda k: qwen3.init_params(model_cfg, k), out_shardings=shardings)(
            jax.random.PRNGKey(ecfg.seed))
    else:
        from qednano_jax.model.hf import load_hf
        arch, params = load_hf(ckpt, dtype=cfg.model.param_dtype, mesh=mesh, rules=rules)
        model_cfg = dataclasses.replace(arch, dtype=cfg.model.dtype, logprob_chunk=cfg.model.logprob_chunk,
                                        attention_chunk=cfg.model.attention_chunk,
                                        attention_impl=cfg.model.attention_impl)
    if len(tokenizer) > model_cfg.vocab_size:
        raise ConfigError(f"eval.tokenizer: {tok_name!r} has {len(tokenizer)} tokens but the model's vocabulary has "
                          f"{model_cfg.vocab_size} rows")
    return model_cfg, (params, mesh, rules), tokenizer


def load_summarizer(cfg: Any, tokenizer: Any) -> tuple[Any, Any] | None:
    """rc with `eval.summarizer_urls`: a client of those servers (same retry/timeout settings as `rollout`) and the
    summarizer's tokenizer; None = the policy summarizes itself."""
    ecfg = cfg.eval
    if ecfg.scaffold != "rc" or not ecfg.summarizer_urls:
        return None
    from qednano_jax.data.tokenizer import load_tokenizer
    from qednano_jax.rollout import make_rollout

    client = make_rollout(dataclasses.replace(cfg.rollout, backend="sglang", urls=ecfg.summarizer_urls), cfg.model)
    try:
        tok = load_tokenizer(ecfg.summarizer_tokenizer) if ecfg.summarizer_tokenizer else tokenizer
    except Exception as e:
        raise ConfigError(f"eval.summarizer_tokenizer: cannot load {ecfg.summarizer_tokenizer!r}: {e}") from None
    return client, tok


def run_eval(cfg: Any, log: Callable[[str], None] = print) -> report.Summary:
    """`python -m qednano_jax.eval`: generate + grade (resumable), then out_dir/{summary.md,summary.json,scores.png}."""
    from qednano_jax.reward.grader import make_grader
    from qednano_jax.rollout import make_rollout

    ecfg = cfg.eval
    fmt = benchmarks.get_format(ecfg.benchmark)
    if ecfg.grading_prompt_file:
        fmt = dataclasses.replace(fmt, grading_prompt=prompts.load_prompt(
            ecfg.grading_prompt_file, "", fmt.grading_fields, "eval.grading_prompt_file"))
    if cfg.grader.backend == "answer" and fmt.kind != "answer":
        raise ConfigError(f"grader.backend: `answer` checks final answers, but eval.benchmark {ecfg.benchmark} is "
                          "graded as proofs: use grader.backend openai or native")
    check_checkpoint(ecfg.checkpoint)  # local, before the benchmark rows (which may come from the hub)
    problems = benchmarks.load_benchmark(fmt, ecfg.source, ecfg.split, ecfg.limit, ecfg.columns)
    out_dir = Path(ecfg.out_dir)
    check_meta(out_dir, cfg)  # before anything is written
    path = out_dir / RESULTS
    done = {item_key(r["problem_id"], int(r["run"])) for r in (report.read_results(path) if path.exists() else [])
            if not r.get("grader_failed")}
    missing = sum(item_key(p.id, r) not in done for r in range(ecfg.runs) for p in problems)
    if missing:
        model_cfg, placed, tokenizer = load_policy(cfg)
        params, mesh, rules = placed if placed else (None, None, None)
        policy = make_rollout(cfg.rollout, model_cfg, params, tokenizer, mesh=mesh, rules=rules)
        grader = make_grader(cfg.grader)
        summarizer = load_summarizer(cfg, tokenizer)
        check_meta(out_dir, cfg, write=True)
        evaluate(ecfg, fmt, problems, policy, tokenizer, make_judge(grader, fmt), extract,
                 concurrency=cfg.grader.concurrency, batch_grading=batches_grading(grader), summarizer=summarizer,
                 log=log)
    else:
        log(f"eval {fmt.name}: all {len(problems)} x {ecfg.runs} items already graded in {out_dir / RESULTS}")
    name = ecfg.name or out_dir.name
    summaries, table, chart = report.write_report([out_dir / RESULTS], out_dir, [name])
    _tensorboard(out_dir, summaries[0])
    log(table.read_text() + f"\nresults: {out_dir / RESULTS}\ntable: {table}\nchart: {chart}")
    return summaries[0]


def _tensorboard(out_dir: Path, s: report.Summary) -> None:
    """avg@k, std and per-category scores as TensorBoard scalars (out_dir/tb), next to the table."""
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(out_dir / "tb")) as w:
        w.add_scalar(f"eval/{s.benchmark}/avg@{s.runs}", s.mean, 0)
        if s.std is not None:
            w.add_scalar(f"eval/{s.benchmark}/std", s.std, 0)
        for cat, (m, _) in s.categories.items():
            w.add_scalar(f"eval/{s.benchmark}/category/{cat}", m, 0)
        w.add_scalar(f"eval/{s.benchmark}/tokens_per_problem", s.tokens_per_problem, 0)
        w.add_scalar(f"eval/{s.benchmark}/grader_failures", s.grader_failures, 0)
