"""Test-time reasoning cache (docs/recipe.md §4 "Test-time RC"): solve, summarize the thinking, solve again from the summary.

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

from qednano_jax.rc import cycle, state as rcs
from qednano_jax.rc.prompts import NO_SUMMARY, decode, solve_prompt

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
    `problems` are the full eval prompts (docs/recipe.md §4: {problem} is the "Generate a rigorous proof ..." message).
    `sampling`/`summary_sampling` are rollout SamplingParams; each turn t offsets their seed by t so turns differ.
    """
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
