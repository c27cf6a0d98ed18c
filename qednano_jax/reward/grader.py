"""The rubric grader: proof extraction, the grading prompt, score parsing, and grader backends (docs/recipe.md §3 "Reward").

    completion --extract_proof--> proof --prompt(problem, marking scheme, proof)--> grader --parse_score--> 0..7
    reward = score / 7

A completion without `</think>` (truncated thinking) has no proof: it scores 0 without a grader call. Whatever
goes wrong on the grader side (timeouts, HTTP errors, a reply without a score) also scores 0, never raises, and is
counted in `GraderStats`, so a flaky grader cannot stop an RL run (docs/design.md principle 3).

Backends behind one interface (`Grader.grade` / `Grader.grade_many`):
- `OpenAIGrader`: any OpenAI-compatible endpoint, chat completions or the Responses API (the paper: GPT-OSS-20B on
  vLLM through the Responses API, reasoning effort medium, temperature 1.0, 81,920 output tokens, 900 s timeout,
  3 retries with backoff 15/30/60 s; configs/grader/gpt-oss-20b.yaml).
- `NativeGrader`: a judge checkpoint run in-process on the native rollout engine, with no server (see its
  docstring); the embedded grader of the tiny CPU RL config.
- `AnswerGrader`: no model at all: a rule-based final-answer check (HF's math-verify) against the row's `answer`,
  score 7 or 0. For final-answer problems (the tiny arithmetic demo, IMO-AnswerBench-style evals), not proofs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import threading
import time
from typing import Iterable, Sequence

from qednano_jax import transport
from qednano_jax.config import ConfigError, GraderConfig, RunStopped


MAX_SCORE = 7
THINK_CLOSE = "</think>"
PROMPT_FIELDS = frozenset({"problem", "marking_scheme", "solution"})

# ----------------------------------------------------------------------------------------------- text in, text out

_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
# a Markdown heading line whose whole title is one of these words, optionally bold (released evaluation rule)
_SELF_EVAL = re.compile(r"^#+[ \t]*\**[ \t]*(?:Self Evaluation|Final Evaluation|Evaluation)[ \t]*\**[ \t]*$",
                        re.MULTILINE)


def extract_proof(completion: str, strip_self_evaluation: bool = False) -> str:
    """The proof of a policy completion: the text after the LAST `</think>`, stripped (docs/recipe.md §3, step 1).

    No `</think>` means the thinking was truncated: the proof is "" and scores 0 without a grader call. With
    `strip_self_evaluation`, everything from the FIRST Markdown heading titled exactly "Evaluation", "Self
    Evaluation" or "Final Evaluation" (any number of `#`, optional `*` bold markers and spaces around the words,
    case-sensitive) to the end is cut off, and nothing else, as the released evaluation does (docs/recipe.md §5):
    bold or plain "Self-evaluation:" lines and lower-case headings stay.
    """
    if THINK_CLOSE not in completion:
        return ""
    proof = completion.rsplit(THINK_CLOSE, 1)[1].strip()
    for tok in _END_TOKENS:
        proof = proof.removesuffix(tok).rstrip()
    if strip_self_evaluation:
        head = _SELF_EVAL.search(proof)
        if head:
            proof = proof[:head.start()].rstrip()
    return proof


def format_marking_scheme(rubric) -> str:
    """A marking scheme as Markdown text (docs/recipe.md §3, step 2): a string is used as it is; a list of
    {title, points, desc} checkpoints becomes `# {title} ({points} points)` + `Description: {desc}` blocks."""
    if isinstance(rubric, str):
        return rubric
    if isinstance(rubric, (list, tuple)) and all(isinstance(c, dict) for c in rubric):
        try:
            return "\n\n".join(f"# {c['title']} ({c['points']} points)\nDescription: {c['desc']}" for c in rubric)
        except KeyError as e:
            raise ValueError(f"marking scheme: a checkpoint lacks the key {e} (expected title, points, desc)") from None
    raise ValueError(f"marking scheme: expected a string or a list of {{title, points, desc}}, got {type(rubric)}")


def load_prompt(path: str | os.PathLike = "") -> str:
    """The grading prompt template ('' = the bundled one); it must use exactly {problem} {marking_scheme} {solution}."""
    from qednano_jax import prompts
    return prompts.load(path, "grader.txt", PROMPT_FIELDS, "grader.prompt_file")


_OUR_TAGS = re.compile(r"<(?=\s*/?\s*(?:score|assessment|errors)\b)", re.IGNORECASE)


def render_prompt(template: str, problem: str, marking_scheme, proof: str) -> str:
    """Fill the template. In the proof, the `<` of any tag named like our output tags (score, assessment, errors)
    becomes `&lt;`: the grader still reads it, but if it echoes the proof, no well-formed fake tag comes back."""
    return template.format(problem=problem, marking_scheme=format_marking_scheme(marking_scheme),
                           solution=_OUR_TAGS.sub("&lt;", proof))


_SCORE = re.compile(r"<score>\s*(\d+)\s*</score>", re.IGNORECASE)
_QUOTING_BLOCK = re.compile(r"<(assessment|errors)\b[^>]*>.*?(?:</\1\s*>|\Z)", re.IGNORECASE | re.DOTALL)


def parse_score(reply: str | None) -> int | None:
    """The grade in a grader reply, or None when it holds no valid one (the caller then scores 0).

    Only the grader's reply is parsed; the proof is in the prompt. Still, a grader may quote the proof, so:
    1. if the reply carries inline reasoning (`... </think> answer`), only the answer after the last `</think>`
       is read;
    2. the <assessment> and <errors> blocks, where quoted proof text belongs, are removed (an unclosed block runs
       to the end of the reply);
    3. of the <score>N</score> tags left, the LAST one is the grade (a grader that restates anything does so
       before its final verdict); N outside 0..7 means no valid score, it is never clamped.
    `render_prompt` also escapes score tags inside the proof, so an echoed proof cannot produce one.
    (The paper's code took the first `<score>(\\d+)</score>` match anywhere and used 0 when there was none.)
    """
    if not reply:
        return None
    text = reply.rsplit(THINK_CLOSE, 1)[-1]
    text = _QUOTING_BLOCK.sub(" ", text)
    found = _SCORE.findall(text)
    if not found:
        return None
    n = int(found[-1])
    return n if 0 <= n <= MAX_SCORE else None


# ----------------------------------------------------------------------------------------------- results, stats

class GraderError(RunStopped):
    """Too many grader calls of one batch failed (grader.max_failure_frac): the message names the endpoint."""


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """One grade. `score` is 0 whenever `failed` (the grader could not be reached), `no_score` (its reply held no
    valid score) or `skipped` (empty proof: no grader call). `attempts` counts requests; `latency` is seconds."""
    score: int
    reward: float
    reply: str = ""
    failed: bool = False
    no_score: bool = False
    skipped: bool = False
    error: str = ""
    attempts: int = 0
    latency: float = 0.0


@dataclasses.dataclass
class GraderStats:
    """Running counters for metrics (plain ints, so a checkpoint can save `dataclasses.asdict(stats)`)."""
    calls: int = 0      # proofs sent to the grader
    retries: int = 0    # requests beyond the first of a call
    failures: int = 0   # calls that failed after every retry (scored 0)
    no_score: int = 0   # replies without a valid score (scored 0)
    empty: int = 0      # completions without a proof (scored 0, no call)

    def add(self, r: GradeResult) -> None:
        if r.skipped:
            self.empty += 1
            return
        self.calls += 1
        self.retries += max(r.attempts - 1, 0)
        self.failures += int(r.failed)
        self.no_score += int(r.no_score)


# ----------------------------------------------------------------------------------------------- the interface

Answer = tuple  # (reply: str | None, error: str, attempts: int, latency: float); reply None = unreachable


class Grader:
    """Grades proofs against marking schemes. A backend implements `_reply(prompt) -> (reply, error, attempts)`,
    reply None when the grader could not be reached, and may override `ask_many` to batch; the rest is shared.
    `reference` names the row field a proof is graded against (FineProofs-RL's marking scheme)."""
    reference = "rubrics"

    def __init__(self, cfg: GraderConfig):
        self.cfg = cfg
        self.template = load_prompt(cfg.prompt_file)
        self.stats = GraderStats()
        self._lock = threading.Lock()

    def proof_of(self, completion: str) -> str:
        """`extract_proof` with this grader's `strip_self_evaluation` setting."""
        return extract_proof(completion, self.cfg.strip_self_evaluation)

    def grade(self, problem: str, rubric, proof: str) -> GradeResult:
        """Score one proof 0..7; never raises on grader trouble (it scores 0 and is counted)."""
        return self.grade_many([(problem, rubric, proof)])[0]

    def grade_many(self, items: Iterable[Sequence]) -> list[GradeResult]:
        """Grade (problem, rubric, proof) triples, at most `cfg.concurrency` at once; results in order. Empty proofs
        score 0 without a grader call."""
        items = list(items)
        todo = [i for i, (_, _, proof) in enumerate(items) if proof.strip()]
        answers = dict(zip(todo, self.ask_many([render_prompt(self.template, *items[i]) for i in todo])))
        results = []
        for i in range(len(items)):
            if i not in answers:
                results.append(GradeResult(score=0, reward=0.0, skipped=True))
                continue
            reply, error, attempts, latency = answers[i]
            score = None if reply is None else parse_score(reply)
            results.append(GradeResult(score=score or 0, reward=(score or 0) / MAX_SCORE, reply=reply or "",
                                       failed=reply is None, no_score=reply is not None and score is None,
                                       error=error, attempts=attempts, latency=latency))
        with self._lock:
            for r in results:
                self.stats.add(r)
        self.check_failures(results)
        return results

    def check_failures(self, results: Sequence[GradeResult]) -> None:
        """Stop (GraderError) when more than `max_failure_frac` of one batch's grader calls failed: an endpoint
        that is down or misconfigured would otherwise give every sample reward 0 and train on nothing."""
        called = [r for r in results if not r.skipped]
        failed = [r for r in called if r.failed]
        if called and len(failed) / len(called) > self.cfg.max_failure_frac:
            raise GraderError(f"grader: {len(failed)} of {len(called)} grading calls of this batch failed (more "
                              f"than grader.max_failure_frac = {self.cfg.max_failure_frac:g}); last error: "
                              f"{failed[-1].error}")

    def ask(self, prompt: str) -> tuple[str | None, str, int]:
        """Send a finished prompt through this backend (retries, timeouts, key handling included) and return
        (reply, error, attempts); reply is None when the grader could not be reached or its reply was malformed
        (qednano_jax/transport.py). Anything else, a bug in building the request above all, raises. For callers
        with their own prompt and parser (eval's benchmark judges, docs/recipe.md §5); `grade` is built on it."""
        return self._reply(prompt)

    def ask_many(self, prompts: list[str]) -> list[Answer]:
        """`ask` for each prompt, `cfg.concurrency` at a time; (reply, error, attempts, latency) in order."""
        def one(prompt):
            start = time.monotonic()
            return (*self.ask(prompt), time.monotonic() - start)

        if len(prompts) <= 1:
            return [one(p) for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(min(self.cfg.concurrency, len(prompts)),
                                                   thread_name_prefix="grader") as pool:
            return list(pool.map(one, prompts))

    def _reply(self, prompt: str) -> tuple[str | None, str, int]:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------- OpenAI-compatible

class OpenAIGrader(Grader):
    """A grader behind an OpenAI-compatible endpoint: `POST {base_url}/chat/completions` or `{base_url}/responses`.

    The key is read from the environment variable named by `cfg.api_key_env` (no Authorization header when it is
    unset), sent only in that header, and scrubbed from every error message. Transport errors, timeouts, HTTP 408,
    429 and 5xx and malformed bodies are retried `cfg.retries` times, waiting `cfg.backoff[i]` seconds before retry
    i (the last value repeats); other HTTP 4xx fail at once (retrying a bad request cannot help).
    """

    def __init__(self, cfg: GraderConfig, role: str = "grader"):
        super().__init__(cfg)
        if cfg.retries and not cfg.backoff:
            raise ConfigError("grader.backoff: give at least one wait (seconds) when grader.retries > 0")
        if any(b < 0 for b in cfg.backoff):
            raise ConfigError(f"grader.backoff: waits must be >= 0, got {list(cfg.backoff)}")
        self.url = cfg.base_url.rstrip("/") + ("/responses" if cfg.api == "responses" else "/chat/completions")
        self.endpoint = transport.Endpoint(self.url, role=role, timeout=cfg.timeout, retries=cfg.retries,
                                           backoff=cfg.backoff, api_key_env=cfg.api_key_env)

    def _body(self, prompt: str) -> dict:
        cfg = self.cfg
        if cfg.api == "responses":
            body = {"model": cfg.model, "input": prompt, "temperature": cfg.temperature,
                    "max_output_tokens": cfg.max_tokens}
            if cfg.reasoning_effort:
                body["reasoning"] = {"effort": cfg.reasoning_effort}
        else:
            body = {"model": cfg.model, "messages": [{"role": "user", "content": prompt}],
                    "temperature": cfg.temperature, "max_tokens": cfg.max_tokens}
            if cfg.reasoning_effort:
                body["reasoning_effort"] = cfg.reasoning_effort
        return body

    @staticmethod
    def _text(data) -> str:
        """The assistant text of a chat-completions or Responses reply (reasoning items are not part of it)."""
        if not isinstance(data, dict):
            raise ValueError("reply body is not a JSON object")
        if "choices" in data:
            return data["choices"][0]["message"].get("content") or ""
        if isinstance(data.get("output_text"), str):
            return data["output_text"]
        if isinstance(data.get("output"), list):
            return "".join(c.get("text", "") for item in data["output"] if item.get("type") == "message"
                           for c in item.get("content") or [] if c.get("type") in ("output_text", "text"))
        raise ValueError(f"reply has neither 'choices' nor 'output' (keys: {sorted(data)[:8]})")

    def _reply(self, prompt: str) -> tuple[str | None, str, int]:
        return self.endpoint.request(self._body(prompt), self._text)

    def request(self, body: dict, parse=None) -> tuple[object | None, str, int]:
        """POST a finished JSON `body` to the endpoint (qednano_jax/transport.py: this grader's key, timeout,
        retries and backoff) and return (parse(reply JSON), error, attempts); None when every attempt failed."""
        return self.endpoint.request(body, parse)


# ----------------------------------------------------------------------------------------------- native judge

class NativeGrader(Grader):
    """A judge checkpoint run in-process on the native rollout engine (rollout/native.py): no server at all, the
    embedded grader of the tiny CPU RL config (issue 5).

    Each grading prompt goes through the judge's own chat template (`data.tokenizer.prompt_ids`, which opens the
    thinking block like the policy's), all prompts of a `grade_many` call are decoded as one batch at
    `cfg.temperature` (0 = greedy), and the decoded text is parsed like an HTTP grader's reply (only the part after
    the judge's `</think>` counts). A reply is capped at `cfg.max_tokens` and at the judge's context
    (max_position_embeddings); a prompt that leaves no room fails (score 0, counted). Pass `engine` and `tokenizer`
    to share an engine already in memory; otherwise `cfg.judge_path` is loaded.
    """

    def __init__(self, cfg: GraderConfig, engine=None, tokenizer=None):
        super().__init__(cfg)
        from qednano_jax.data.tokenizer import load_tokenizer
        if engine is None:
            if not cfg.judge_path:
                raise ConfigError("grader.judge_path: the native grader needs the judge's HF checkpoint directory")
            from qednano_jax.model.hf import load_hf
            from qednano_jax.rollout.native import NativeRollout
            tokenizer = tokenizer or load_tokenizer(cfg.judge_tokenizer or cfg.judge_path)
            model_cfg, params = load_hf(cfg.judge_path)
            engine = NativeRollout(model_cfg, params, tokenizer, max_batch=cfg.concurrency)
        self.engine = engine
        self.tokenizer = tokenizer or engine.tokenizer
        if self.tokenizer is None:
            raise ConfigError("grader.judge_tokenizer: the native grader needs the judge's tokenizer")

    def ask_many(self, prompts: list[str]) -> list[Answer]:
        from qednano_jax.data.tokenizer import prompt_ids
        from qednano_jax.rollout.base import SamplingParams
        start = time.monotonic()
        limit = self.engine.cfg.max_position_embeddings
        stop = () if self.tokenizer.eos_token_id is None else (int(self.tokenizer.eos_token_id),)
        seed = self.engine.seed_for_call()
        out: list = [None] * len(prompts)
        rows, where = [], []
        for i, prompt in enumerate(prompts):
            ids = prompt_ids(self.tokenizer, prompt)
            room = min(self.cfg.max_tokens, limit - len(ids))
            if room < 1:
                out[i] = (None, f"native judge: the grading prompt has {len(ids)} tokens, which leaves no room for "
                                f"a reply in the judge's {limit}-token context (model.max_position_embeddings)", 1)
                continue
            rows.append((ids, SamplingParams(max_new_tokens=room, temperature=self.cfg.temperature,
                                             stop_token_ids=stop), seed, i))
            where.append(i)
        if rows:  # an in-process judge has no transport to fail: an error here is a bug, and it raises
            for i, c in zip(where, self.engine.generate_rows(rows)):
                # decoded here with special tokens kept: a tokenizer may mark </think> special, and the
                # parser needs it to skip the judge's reasoning
                out[i] = (self.tokenizer.decode(c.token_ids, skip_special_tokens=False), "", 1)
        latency = time.monotonic() - start
        return [(*o, latency) for o in out]

    def _reply(self, prompt: str) -> tuple[str | None, str, int]:
        return self.ask_many([prompt])[0][:3]


# ----------------------------------------------------------------------------------------------- final answers

class AnswerGrader(Grader):
    """Final-answer problems checked by rule (math-verify: the first `\\boxed{}` of the proof, else its last
    expression, compared with the reference answer symbolically): score 7 when they agree, else 0; reward 1 or 0.

    `grade_many` takes (problem, reference answer, proof) triples: RL rows need an `answer` field instead of a marking
    scheme (data/rl.py). Nothing here can fail for transport reasons, so `failed` is never set; an answer that
    math-verify cannot parse is a wrong answer (score 0, `no_score` false), not a fault.
    """
    reference = "answer"

    def __init__(self, cfg: GraderConfig):
        import logging
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" on every call: we run in threads
        self.cfg, self.template, self.stats, self._lock = cfg, "", GraderStats(), threading.Lock()

    @staticmethod
    def matches(proof: str, answer: str) -> bool:
        """Whether the final answer of `proof` equals `answer` (signal-based timeouts off: graders run in threads)."""
        import math_verify
        gold = math_verify.parse(answer, parsing_timeout=None) or math_verify.parse(f"${answer}$", parsing_timeout=None)
        got = math_verify.parse(proof, extraction_mode="first_match", parsing_timeout=None)
        return bool(gold and got and math_verify.verify(gold, got, timeout_seconds=None))

    def grade_many(self, items: Iterable[Sequence]) -> list[GradeResult]:
        results = []
        for _, answer, proof in items:
            if not proof.strip():
                results.append(GradeResult(score=0, reward=0.0, skipped=True))
                continue
            ok = self.matches(proof, str(answer))
            results.append(GradeResult(score=MAX_SCORE if ok else 0, reward=1.0 if ok else 0.0, attempts=1,
                                       reply=f"final answer {'matches' if ok else 'differs from'} {answer!r}"))
        with self._lock:
            for r in results:
                self.stats.add(r)
        return results

    def _reply(self, prompt: str) -> tuple[str | None, str, int]:
        raise ConfigError("grader.backend answer checks final answers by rule; it has no model to send a prompt to "
                          "(use openai or native for proofs)")


GRADERS = {"openai": OpenAIGrader, "native": NativeGrader, "answer": AnswerGrader}  # grader.backend -> class


def make_grader(cfg: GraderConfig, **kwargs) -> Grader:
    """The grader backend named by `cfg.backend` (kwargs go to it, e.g. `engine=`/`tokenizer=` for native)."""
    return GRADERS[cfg.backend](cfg, **kwargs)
