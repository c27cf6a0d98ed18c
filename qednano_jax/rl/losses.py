"""RL losses: group advantages, per-token policy losses and aggregation modes, registered by name.

The recipe is docs/recipe.md §3 ("Loss / optimizer"), the GRPO-style objective of QED-Nano (arXiv:2604.04898), as configured
in its released PipelineRL code (`policy_loss: ppo`, `rl.epsilon: 4`, entropy bonus 1e-4, no KL, token sum divided
by the samples per step):

    A_i   = r_i - mean_group(r)                                  (GRPO, Shao et al. 2024, arXiv:2402.03300; no std)
    ratio = exp(logp_new - logp_old)                             (logp_old = the sampler's behaviour logprob)
    surr  = min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)      (PPO, Schulman et al. 2017,
                                                                             arXiv:1707.06347; eps_low/high as DAPO,
                                                                             arXiv:2503.14476)
    loss  = sum_tokens w_t * (-surr_t - entropy_coef * H_t) / denominator

There is no KL term: the recipe has none (kl_coef 0, no reference model), so the project keeps no reference model
either.

`logp_new` is computed from the trainer's logits divided by the sampling temperature (the caller uses
`model.qwen3.token_logprobs(..., temperature=T)`), so it is comparable with the sampler's logprobs.

Aggregation. The train step accumulates over micro-batches and divides a SUM by one step-level denominator, so
every aggregation mode is split into per-token weights `w_t` (computed on the host while packing, `token_weights`)
and a denominator over the whole step (`denominator`):

    mode                        w_t (completion tokens)      denominator
    token-mean                  1                            tokens in the step            (DAPO)
    sequence-mean-token-mean    1 / tokens of t's sequence   sequences in the step         (GRPO paper)
    sequence-mean-token-sum     1                            sequences in the step         (Dr. GRPO, arXiv:2503.20783)
    token-sum-constant          1                            a constant: samples per step  (QED-Nano, docs/recipe.md §3)

Packed rows hold several completions; a sequence is a (row, segment id) pair, segment id 0 being padding
(the convention of `model.qwen3.hidden_states`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from qednano_jax.config import LossConfig
from qednano_jax.model import qwen3

# ----------------------------------------------------------------------------------------------- advantages


def group_advantages(rewards, group_size: int, divide_by_std: bool = False, eps: float = 1e-6):
    """GRPO advantages: each reward minus the mean of its group (docs/recipe.md §3: no std division in QED-Nano).

    `rewards` [G * n] holds the n = `group_size` rollouts of each prompt next to each other. With `divide_by_std`
    the centred rewards are divided by (population std of the group + eps), as in the GRPO paper. Groups whose
    rewards are all equal get advantage 0 and are kept (they contribute no gradient).
    """
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 1 or r.shape[0] % group_size:
        raise ValueError(f"rewards: expected a flat array whose length is a multiple of group_size={group_size}, "
                         f"got shape {tuple(r.shape)}")
    g = r.reshape(-1, group_size)
    a = g - g.mean(axis=1, keepdims=True)
    if divide_by_std:
        a = a / (g.std(axis=1, keepdims=True) + eps)
    return a.reshape(-1)


# ----------------------------------------------------------------------------------------------- policy losses
# A policy loss maps per-token (logp_new, logp_old, advantage) to (loss_t to minimise, {metric: per-token value}).

PolicyLoss = Callable[[jax.Array, jax.Array, jax.Array, LossConfig], tuple[jax.Array, dict]]
POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str):
    """Decorator: make a per-token policy loss selectable as `rl.loss.policy_loss: <name>`."""
    def deco(fn: PolicyLoss) -> PolicyLoss:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered twice")
        POLICY_LOSSES[name] = fn
        return fn
    return deco


@register_policy_loss("ppo")
def ppo_loss(logp_new, logp_old, adv, cfg: LossConfig):
    """PPO-clip / GRPO token loss: -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A).

    The ratio is against the behaviour (sampler) logprobs, so it also corrects for the lag of asynchronous
    sampling (docs/recipe.md §3). With the paper's eps = 4 only ratio > 5 with A > 0 is ever clipped. `clipped` marks the
    tokens whose gradient the clip removes (A > 0 and ratio > 1 + eps_high, or A < 0 and ratio < 1 - eps_low).
    """
    ratio = jnp.exp(logp_new - logp_old)
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    surr = jnp.minimum(ratio * adv, clipped_ratio * adv)
    clipped = ((adv > 0) & (ratio > 1.0 + cfg.clip_eps_high)) | ((adv < 0) & (ratio < 1.0 - cfg.clip_eps_low))
    return -surr, {"ratio": ratio, "clipped": clipped.astype(jnp.float32)}


@register_policy_loss("reinforce")
def reinforce_loss(logp_new, logp_old, adv, cfg: LossConfig):
    """Plain on-policy policy gradient (REINFORCE with a group baseline, as in RLOO/GRPO without a ratio):
    -A * logp_new. It ignores the behaviour logprobs, so it is only right when sampler and trainer agree."""
    del cfg
    ratio = jnp.exp(logp_new - logp_old)  # reported only: the sampler-vs-trainer gap
    return -adv * logp_new, {"ratio": ratio, "clipped": jnp.zeros_like(logp_new)}


# ----------------------------------------------------------------------------------------------- aggregation

AGGREGATIONS = ("token-mean", "sequence-mean-token-mean", "sequence-mean-token-sum", "token-sum-constant")


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATIONS:
        raise ValueError(f"rl.loss.aggregation: {mode!r} is not one of {list(AGGREGATIONS)}")


def _sequence_ids(mask_bt: np.ndarray, segment_ids_bt: np.ndarray | None) -> np.ndarray:
    """One int per token naming its sequence (row, segment) uniquely over the batch; -1 where mask is 0."""
    mask = np.asarray(mask_bt) != 0
    b, t = mask.shape
    seg = np.ones((b, t), np.int64) if segment_ids_bt is None else np.asarray(segment_ids_bt, np.int64)
    if seg.shape != (b, t):
        raise ValueError(f"segment_ids: shape {seg.shape} does not match the loss mask's {(b, t)}")
    if np.any(mask & (seg <= 0)):
        raise ValueError("segment_ids: a loss-masked token lies in segment 0 (padding)")
    ids = np.arange(b)[:, None] * (int(seg.max(initial=0)) + 1) + seg
    return np.where(mask, ids, -1)


def token_weights(mask_bt, segment_ids_bt=None, mode: str = "token-sum-constant") -> np.ndarray:
    """Per-token loss weights [b, t] (float32, 0 off the mask) for aggregation `mode`; computed on the host.

    `mask_bt` marks the completion tokens that carry loss; `segment_ids_bt` (0 = padding) tells the completions
    of a packed row apart (None: each row is one sequence). Only `sequence-mean-token-mean` depends on the
    segments: each token weighs 1 / (loss tokens of its sequence), so every sequence sums to 1.
    """
    _check_mode(mode)
    mask = np.asarray(mask_bt) != 0
    w = mask.astype(np.float32)
    if mode == "sequence-mean-token-mean":
        ids = _sequence_ids(mask, segment_ids_bt)
        _, inverse, counts = np.unique(ids[mask], return_inverse=True, return_counts=True)
        w[mask] = 1.0 / counts[inverse]
    return w


def denominator(mode: str, masks, segment_ids=None, constant: float | None = None) -> float:
    """The step-level divisor of the summed loss for aggregation `mode`, over ALL micro-batches of a step.

    `masks` / `segment_ids`: one [b, t] array per micro-batch (or a single array). `constant` is required by
    `token-sum-constant` (QED-Nano divides by the samples per step, 1024 = 64 prompts x 16; docs/recipe.md §3).
    A sequence with no loss token does not count. Returns at least 1 so an empty step gives loss 0, not NaN.
    """
    _check_mode(mode)
    if mode == "token-sum-constant":
        if constant is None or constant <= 0:
            raise ValueError(f"rl.loss.aggregation_constant: token-sum-constant needs a constant > 0, got {constant}")
        return float(constant)
    masks = [masks] if np.ndim(masks) == 2 else list(masks)
    segs = [None] * len(masks) if segment_ids is None else (
        [segment_ids] if np.ndim(segment_ids) == 2 else list(segment_ids))
    if mode == "token-mean":
        total = sum(int(np.count_nonzero(m)) for m in masks)
    else:
        total = sum(len(np.unique(_sequence_ids(m, s)[np.asarray(m) != 0])) for m, s in zip(masks, segs))
    return float(max(total, 1))


# ----------------------------------------------------------------------------------------------- the loss

def rl_loss(name: str, logp_new_bt, logp_old_bt, adv_bt, weights_bt, cfg: LossConfig, entropy_bt=None):
    """Weighted SUM of per-token RL losses of one micro-batch, and metric sums.

    loss_t = policy_loss[name]_t - entropy_coef * H_t, and
    loss_sum = sum_t weights_t * loss_t. Divide the step's total by `denominator(...)` (see module docstring).
    `adv_bt` is the sequence advantage broadcast to its tokens; `entropy_bt` (needed when entropy_coef != 0) is
    the entropy of the temperature-scaled distribution.

    Metrics are plain sums over the loss tokens (weights != 0), so they add up over micro-batches and hosts;
    `metric_means` turns them into per-token means. `logprob_gap` is |logp_new - logp_old|, the sampler-vs-trainer
    mismatch.
    """
    if name not in POLICY_LOSSES:
        raise ValueError(f"rl.loss.policy_loss: {name!r} is not one of {sorted(POLICY_LOSSES)}")
    w = jnp.asarray(weights_bt, jnp.float32)
    mask = (w != 0).astype(jnp.float32)
    # off the mask, compare logp_new with itself: padding may hold any logprob value, and a 0 weight times an inf
    # ratio (or its gradient) would still be NaN
    pinned = jax.lax.stop_gradient(logp_new_bt)
    logp_old_bt = jnp.where(mask > 0, logp_old_bt, pinned)
    loss_t, aux = POLICY_LOSSES[name](logp_new_bt, logp_old_bt, adv_bt, cfg)
    metrics = {"policy_loss": loss_t, "clip_fraction": aux["clipped"], "ratio": aux["ratio"],
               "logprob_gap": jnp.abs(logp_new_bt - logp_old_bt), "advantage": jnp.broadcast_to(adv_bt, w.shape)}
    if cfg.entropy_coef:
        if entropy_bt is None:
            raise ValueError("rl.loss.entropy_coef is set but no entropy was passed "
                             "(use token_logprobs(..., with_entropy=True))")
        loss_t = loss_t - cfg.entropy_coef * entropy_bt
    if entropy_bt is not None:
        metrics["entropy"] = entropy_bt
    loss_sum = jnp.sum(w * loss_t)
    sums = {k: jnp.sum(mask * v) for k, v in metrics.items()}
    sums["tokens"] = jnp.sum(mask)
    return loss_sum, sums


def metric_means(sums: dict) -> dict:
    """Per-token means of the metric sums of `rl_loss` (summed over micro-batches): {name: sum / tokens}."""
    tokens = max(float(sums["tokens"]), 1.0)
    return {k: float(v) / tokens for k, v in sums.items() if k != "tokens"} | {"tokens": float(sums["tokens"])}


# ----------------------------------------------------------------------------------------------- over the model

def rl_loss_fn(loss_cfg, temperature: float, loss_tokens_per_row: int | None = None) -> Callable:
    """loss_fn(model_cfg, params, micro_batch) for train/step.py: trainer logprobs of logits / temperature (so they
    compare with the sampler's), entropy of that distribution, and `rl.losses.rl_loss` with the packed weights.

    With `loss_tokens_per_row` K (below the row length; the packer, rl.batch.pack_groups, puts at most K
    completion tokens in a row) the LM head runs only on each row's K loss positions, gathered in order after the
    layers: prompts and padding, most of an RL row when completions are short, cost no [vocab]-wide logits."""
    def loss_fn(model_cfg: Any, params, mb: dict):
        h = qwen3.hidden_states(model_cfg, params, mb["tokens"], positions=mb["positions"],
                                segment_ids=mb["segment_ids"])
        keys = ("targets", "old_logprobs", "advantages", "weights")
        per_token = {k: mb[k] for k in keys}
        if loss_tokens_per_row is not None and loss_tokens_per_row < h.shape[1]:
            idx, kept = loss_positions(mb["weights"], loss_tokens_per_row)
            h = jnp.take_along_axis(h, idx[..., None], axis=1)
            per_token = {k: jnp.take_along_axis(v, idx, axis=1) for k, v in per_token.items()}
            per_token["weights"] = jnp.where(kept, per_token["weights"], 0.0)
        lp_bt, ent_bt = qwen3.token_logprobs(model_cfg, params, h, per_token["targets"], temperature=temperature,
                                             with_entropy=True)
        return rl_loss(loss_cfg.policy_loss, lp_bt, per_token["old_logprobs"], per_token["advantages"],
                       per_token["weights"], loss_cfg, entropy_bt=ent_bt)
    return loss_fn


def loss_positions(weights_bt: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The first `k` positions of each row whose weight is nonzero, in order: (indices [b, k] int32, kept [b, k]
    bool; False past a row's last loss token, whose index is then 0)."""
    def row(w):
        return jnp.nonzero(w != 0, size=k, fill_value=0)[0].astype(jnp.int32)
    idx = jax.vmap(row)(weights_bt)
    kept = jnp.arange(k)[None, :] < jnp.sum(weights_bt != 0, axis=1, keepdims=True)
    return idx, kept
