"""Test-time reasoning cache (SPEC.md §4 "Test-time RC"): solve, summarize the thinking, solve again from the summary.

    summary = "[No previous summary]"
    for t in 1..n:
        out_t = policy(SOLVE(problem, summary))
        if t < n: summary = summarizer(SUMMARIZE(problem, summary, thinking(out_t)))   # replaces, never appends
    answer = final output of out_n (the text after </think>)

`thinking(out)` is the part before `</think>`, or the whole output when the thinking was cut off. The summarizer is
the policy's own backend unless another one is given (QED-Nano summarizes itself at test time). The prompts are our
own words with the structure of the RC paper's prompts; the training-time solve prompt adds a closing "reason step by
step" line (`step_by_step=True`). `run_rc` threads the RC state (rc/state.py) through rc/cycle.py's host loop, the
same carry and transition as the jitted native loop and RC training; the text helpers here are for reading results.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qednano_jax.data.tokenizer import THINK_CLOSE, THINK_OPEN

NO_SUMMARY = "[No previous summary]"
_CHAT_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")

SOLVE_PROMPT = """\
Below is a mathematics problem. You may also be shown a summary of an earlier attempt at it; that attempt may be
right, partly right or wrong.

### PROBLEM
{problem}

### SUMMARY OF PREVIOUS ATTEMPT
{summary}

### INSTRUCTIONS
If there is no summary of an earlier attempt, solve the problem from the beginning.

If there is one, build on it and do better than it did, using the summary to steer your thinking. For example, you can:
- check the earlier solution carefully, step by step;
- prove the result by another route;
- look for a different strategy altogether;
- pick up where the earlier attempt stopped, if it was unfinished."""

STEP_BY_STEP = "\n\nThink it through step by step."

SUMMARY_PROMPT = """\
Below are a mathematics problem and the latest candidate solution to it. There may also be a summary of an earlier
candidate; if so, the latest candidate was written with that summary in view.

Write a summary of the latest candidate solution that:
- describes in detail what it did: the overall strategy, theorems and lemmas it used, checks it made, calculations
  and deductions;
- relates it to the earlier summary, if there is one, so that a reader sees how the new attempt differs from or
  extends the old one, and keeps every important fact from the earlier summary;
- is at most two paragraphs of plain prose, with no headings;
- is written in the first person, as by the solver;
- still summarizes the attempt when it is unfinished.

Important: add no reasoning of your own. Only summarize what the latest candidate solution contains.

### PROBLEM
{problem}

### EXISTING SUMMARY
{existing_summary}

### LATEST CANDIDATE SOLUTION
{reasoning}"""


def solve_prompt(problem: str, summary: str = NO_SUMMARY, step_by_step: bool = False) -> str:
    """The reasoning-turn user message conditioned on the current summary."""
    return SOLVE_PROMPT.format(problem=problem, summary=summary) + (STEP_BY_STEP if step_by_step else "")


def summary_prompt(problem: str, existing_summary: str, reasoning: str) -> str:
    """The summarizer's user message: problem, previous summary, latest thinking."""
    return SUMMARY_PROMPT.format(problem=problem, existing_summary=existing_summary, reasoning=reasoning)


def strip_chat_tokens(text: str) -> str:
    """Drop ChatML control tokens (end of turn, padding) and a leading `<think>` from a decoded completion."""
    for tok in _CHAT_TOKENS:
        text = text.replace(tok, "")
    text = text.lstrip()
    return text[len(THINK_OPEN):].lstrip("\n") if text.startswith(THINK_OPEN) else text


def thinking_part(text: str) -> str:
    """The reasoning before `</think>`; the whole output when the thinking never closed (truncated)."""
    text = strip_chat_tokens(text)
    return (text.split(THINK_CLOSE, 1)[0] if THINK_CLOSE in text else text).strip()


def final_part(text: str) -> str:
    """The answer after the last `</think>`; "" when the thinking never closed (SPEC §3: no proof)."""
    text = strip_chat_tokens(text)
    return text.rsplit(THINK_CLOSE, 1)[1].strip() if THINK_CLOSE in text else ""


def summary_text(text: str) -> str:
    """A summarizer reply: its final part when it thought first, else the whole reply."""
    text = strip_chat_tokens(text)
    return final_part(text) if THINK_CLOSE in text else text.strip()


def decode(tokenizer: Any, token_ids: list[int]) -> str:
    """Completion text with `</think>` kept (it is a special token in some tokenizers) and chat tokens removed."""
    return strip_chat_tokens(tokenizer.decode(list(token_ids), skip_special_tokens=False))


@dataclasses.dataclass
class Turn:
    """One reasoning turn and the summary written after it (None on the last turn)."""
    prompt: str
    text: str
    tokens: int
    finish_reason: str
    summary: str | None = None
    summary_tokens: int = 0


@dataclasses.dataclass
class RCResult:
    turns: list[Turn]

    @property
    def text(self) -> str:
        """The last turn's whole output: what gets graded (its part after `</think>`)."""
        return self.turns[-1].text

    @property
    def tokens(self) -> int:
        """Policy tokens over all turns (summaries not included)."""
        return sum(t.tokens for t in self.turns)

    @property
    def summary_tokens(self) -> int:
        return sum(t.summary_tokens for t in self.turns)


def run_rc(policy: Any, tokenizer: Any, problems: list[str], sampling: Any, *, iterations: int = 3,
           summary_sampling: Any = None, summarizer: Any = None, summarizer_tokenizer: Any = None) -> list[RCResult]:
    """Test-time RC over a batch of problems on any Rollout backend (one batched `generate` per turn and role).

    The loop is rc/cycle.py's host loop over the RC state (rc/state.py), the same carry and transition the jitted
    native loop and RC training use: prompts are concatenated token pieces, summaries stay the summarizer's tokens.
    `problems` are the full eval prompts (SPEC §4: {problem} is the "Generate a rigorous proof ..." message).
    `sampling`/`summary_sampling` are rollout SamplingParams; each turn t offsets their seed by t so turns differ.
    """
    from qednano_jax.rc import cycle, state as rcs  # they import this module's prompts

    if iterations < 1:
        raise ValueError(f"rc iterations: expected >= 1, got {iterations}")
    summary_sampling = summary_sampling or sampling
    tpl = cycle.make_templates(tokenizer, summarizer_tokenizer)
    problem_bp, problem_len_b = cycle.tokenize_texts(tokenizer, problems)
    init = tokenizer(NO_SUMMARY, add_special_tokens=False)["input_ids"]
    state = rcs.init_state(list(range(len(problems))), init, turns=iterations,
                           summary_width=max(summary_sampling.max_new_tokens, len(init)),
                           reasoning_width=sampling.max_new_tokens)
    state = cycle.rc_loop_host(policy, summarizer or policy, tpl, problem_bp, problem_len_b, state,
                               policy_sampling=sampling, summary_sampling=summary_sampling, summarize_last=False)
    return results(state, tokenizer, problems)


def results(state: Any, tokenizer: Any, problems: list[str], step_by_step: bool = False) -> list[RCResult]:
    """An RC state as text: one RCResult per problem, a Turn per reasoning turn (its prompt rendered as text)."""
    import numpy as np

    hist, hlen = np.asarray(state.history), np.asarray(state.history_len)
    outs, lens, stopped = np.asarray(state.outputs), np.asarray(state.lengths), np.asarray(state.stopped)
    stoks, turn = np.asarray(state.summary_tokens), np.asarray(state.turn)
    res = []
    for i, problem in enumerate(problems):
        turns = []
        for t in range(int(turn[i])):
            before = decode(tokenizer, hist[i, t, :hlen[i, t]].tolist())
            summarized = t + 1 < hist.shape[1] and stoks[i, t] > 0
            turns.append(Turn(prompt=solve_prompt(problem, before, step_by_step),
                              text=decode(tokenizer, outs[i, t, :lens[i, t]].tolist()), tokens=int(lens[i, t]),
                              finish_reason="stop" if stopped[i, t] else "length",
                              summary=decode(tokenizer, hist[i, t + 1, :hlen[i, t + 1]].tolist()).strip()
                              if summarized else None, summary_tokens=int(stoks[i, t])))
        res.append(RCResult(turns=turns))
    return res
