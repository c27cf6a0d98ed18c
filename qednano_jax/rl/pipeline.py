"""The rollout side of RL: generate each step's completions in a background thread and grade each generate call
in a thread pool as it returns (`RolloutPipeline`), with sampling seeds fixed by the schedule (`batch_seed`)."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Callable, Sequence

import numpy as np

from qednano_jax.data import rl as rl_data
from qednano_jax.reward.grader import GradeResult, Grader
from qednano_jax.rl.batch import Batch, Group
from qednano_jax.rollout.base import Completion, SamplingParams

# reward_fn(items) -> one GradeResult per (prompt, completion, completion text with special tokens kept)
RewardFn = Callable[[list[tuple[rl_data.RLPrompt, Completion, str]]], list[GradeResult]]


def completion_text(tokenizer, c: Completion) -> str:
    """The completion as text with special tokens kept (a tiny tokenizer may mark `</think>` special, and the proof
    is what follows the last `</think>`)."""
    return tokenizer.decode(c.token_ids, skip_special_tokens=False)


def grader_reward_fn(grader: Grader) -> RewardFn:
    """The paper's reward (docs/recipe.md §3): proof = text after the last `</think>`, graded against the prompt's marking
    scheme (or, for `AnswerGrader`, checked against its reference answer); reward = score / 7, and 0 for an empty
    proof or any grader fault (counted in `grader.stats`)."""
    def reward(items):
        return grader.grade_many([(p.problem, p.answer if grader.reference == "answer" else p.rubric,
                                   grader.proof_of(text)) for p, _, text in items])
    return reward


def batch_seed(seed: int, batch_index: int, call: int) -> int:
    """The sampling seed of generate call `call` of batch `batch_index` (fixed by the schedule, not by timing)."""
    return int(np.random.default_rng([seed, batch_index, call]).integers(0, 2**31 - 1))


class RolloutPipeline:
    """Generates batches in a background thread and grades each generate call in a thread pool as it returns.

    `launch(positions, index)` returns a Future of a `Batch`; batches are generated one after another, in launch
    order, with whatever weights the backend holds (the loop refits only when no batch is in flight).
    """

    def __init__(self, rollout, prompts: Sequence[rl_data.RLPrompt], reward_fn: RewardFn, tokenizer, rl_cfg,
                 stop_token_ids: Sequence[int] = (), grade_workers: int = 4):
        self.rollout, self.prompts, self.reward_fn, self.tokenizer, self.rl = (rollout, prompts, reward_fn,
                                                                               tokenizer, rl_cfg)
        self.stop = tuple(stop_token_ids)
        self._gen = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rl-generate")
        self._grade = concurrent.futures.ThreadPoolExecutor(grade_workers, thread_name_prefix="rl-grade")

    def sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.rl.max_tokens, temperature=self.rl.temperature,
                              top_p=self.rl.top_p, top_k=self.rl.top_k, stop_token_ids=self.stop, seed=seed)

    def launch(self, positions: list[int], index: int) -> concurrent.futures.Future:
        return self._gen.submit(self._generate, list(positions), index)

    def _grade_call(self, positions, completions) -> list[Group]:
        items = [(self.prompts[p], c, completion_text(self.tokenizer, c)) for p, cs in zip(positions, completions)
                 for c in cs]
        results = self.reward_fn(items)
        if len(results) != len(items):
            raise RuntimeError(f"reward_fn returned {len(results)} results for {len(items)} completions")
        n = self.rl.group_size
        return [Group(prompt_ids=list(self.prompts[p].ids), completions=list(cs),
                      rewards=[r.reward for r in results[i * n:(i + 1) * n]],
                      grades=list(results[i * n:(i + 1) * n]), prompt_pos=p)
                for i, (p, cs) in enumerate(zip(positions, completions))]

    def _generate(self, positions: list[int], index: int) -> Batch:
        per_call = self.rl.prompts_per_call or len(positions)
        graded, gen_s, tokens = [], 0.0, 0
        for call, start in enumerate(range(0, len(positions), per_call)):
            chunk = positions[start:start + per_call]
            t0 = time.perf_counter()
            comps = self.rollout.generate([list(self.prompts[p].ids) for p in chunk],
                                          self.sampling(batch_seed(self.rl.seed, index, call)), n=self.rl.group_size)
            gen_s += time.perf_counter() - t0
            tokens += sum(len(c.token_ids) for cs in comps for c in cs)
            graded.append(self._grade.submit(self._grade_call, chunk, comps))
        groups = [g for f in graded for g in f.result()]
        return Batch(index=index, groups=groups, gen_s=gen_s, gen_tokens=tokens)

    def close(self) -> None:
        self._gen.shutdown(wait=False, cancel_futures=True)
        self._grade.shutdown(wait=False, cancel_futures=True)


def _done(batch: Batch) -> concurrent.futures.Future:
    f: concurrent.futures.Future = concurrent.futures.Future()
    f.set_result(batch)
    return f
