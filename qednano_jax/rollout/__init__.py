"""Rollouts behind one small interface (rollout/base.py): the embedded JAX engine or SGLang-compatible servers.

    rollout = make_rollout(cfg.rollout, model_cfg, params, tokenizer, mesh=mesh, rules=rules)
    groups = rollout.generate(prompt_ids, SamplingParams(max_new_tokens=..., temperature=0.8), n=16)
    rollout.refit(new_params, version="step-12")
"""

from __future__ import annotations

from typing import Any

from qednano_jax.config import ModelConfig, RolloutConfig
from qednano_jax.rollout.base import Completion, RefitResult, Rollout, RolloutError, SamplingParams

__all__ = ["Completion", "RefitResult", "Rollout", "RolloutError", "SamplingParams", "make_rollout"]


def make_rollout(rollout_cfg: RolloutConfig, model_cfg: ModelConfig, params: Any = None, tokenizer: Any = None,
                 mesh=None, rules=None, *, version: str = "0") -> Rollout:
    """The configured backend. `native` needs `params` (placed on `mesh` by `rules`) and decodes text with
    `tokenizer`; `sglang` uses `model_cfg` only to export refits (the servers already hold the starting weights and
    their tokenizer; `params`, `tokenizer` and `version` are not used)."""
    if rollout_cfg.backend == "native":
        from qednano_jax.rollout.native import NativeRollout
        if params is None:
            raise ValueError("rollout.backend native: make_rollout needs params")
        return NativeRollout(model_cfg, params, tokenizer, max_batch=rollout_cfg.max_batch, seed=rollout_cfg.seed,
                             mesh=mesh, rules=rules, version=version)
    from qednano_jax.rollout.sglang import SGLangRollout
    return SGLangRollout(rollout_cfg, model_cfg)
