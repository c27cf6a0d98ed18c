"""The rollout interface the RL loop, the reasoning cache and eval see (docs/design.md principle 3).

A `Rollout` turns prompt token ids into completions, each with the behaviour logprob of every generated token (the
`logp_old` of the PPO ratio, docs/recipe.md §3 "Loss"), a finish reason and the weight version that produced it (for
staleness accounting). Backends: `native` (embedded JAX engine, rollout/native.py) and `sglang` (HTTP client to
real SGLang servers or to `python -m qednano_jax.serve`, rollout/sglang.py).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Protocol, runtime_checkable

from qednano_jax.config import RunStopped

FINISH_REASONS = ("stop", "length", "abort")


class RolloutError(RunStopped):
    """A rollout backend could not deliver every requested completion; the message names the server or the field."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion. Every field is sent explicitly to a server (never its defaults).

    temperature 0 = greedy (argmax; logprobs then come from the untempered distribution). top_k -1 = off,
    top_p 1 = off. Top-p keeps the smallest set of most likely tokens whose tempered probability mass reaches
    top_p (computed over the full distribution, as SGLang does), intersected with the top-k set. Generation stops at
    the first token in `stop_token_ids` or at the model's EOS id (the stop token is part of the completion), or
    after `max_new_tokens`. `seed` None = fresh randomness on each call; an int = reproducible samples.
    """
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens: expected >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature: expected >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p: expected a value in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k: expected -1 (off) or >= 1, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass
class Completion:
    """One generated completion. `logprobs[i]` = log p(token_ids[i]) under softmax(logits / temperature) (the
    untempered softmax when greedy), before top-p/top-k; aligned with `token_ids`."""
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"
    text: str
    weight_version: str
    prompt_tokens: int

    def __post_init__(self):
        if len(self.token_ids) != len(self.logprobs):
            raise RolloutError(f"Completion: {len(self.token_ids)} token ids but {len(self.logprobs)} logprobs")
        if self.finish_reason not in FINISH_REASONS:
            raise RolloutError(f"Completion.finish_reason: {self.finish_reason!r} is not one of {FINISH_REASONS}")


@dataclasses.dataclass
class RefitResult:
    """What one refit did and how long it took (seconds): export = writing the HF checkpoint (0 for the in-memory
    native swap), update = the server loading it and confirming the version."""
    weight_version: str
    export_s: float
    update_s: float
    path: str | None = None

    @property
    def total_s(self) -> float:
        return self.export_s + self.update_s


@runtime_checkable
class Rollout(Protocol):
    """What every backend provides. `generate` returns, for each prompt, `n` completions (outer list aligned with
    `prompts`); it either returns all of them or raises RolloutError, never a partial result."""

    @property
    def weight_version(self) -> str: ...

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int = 1) -> list[list[Completion]]: ...

    def refit(self, params: Any, version: str) -> RefitResult: ...

    def health(self) -> bool: ...


def check_prompts(prompts: list[list[int]], n: int, vocab_size: int | None = None) -> None:
    """Reject empty prompts, non-integer ids and ids outside the vocabulary with an error naming the row."""
    if n < 1:
        raise ValueError(f"generate: n must be >= 1, got {n}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty")
        bad = [t for t in p if not isinstance(t, numbers.Integral) or t < 0
               or (vocab_size is not None and t >= vocab_size)]
        if bad:
            raise ValueError(f"generate: prompt {i} has token id {bad[0]!r} outside [0, {vocab_size})")
