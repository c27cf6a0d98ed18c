"""AdamW with global-norm clipping and a warmup + cosine or constant schedule (docs/recipe.md §2 SFT, §3 RL).

SFT (TRL defaults, docs/recipe.md §2): linear warmup then cosine decay to `final_lr_ratio * lr`. RL (docs/recipe.md §3): LR 1e-6
constant. Weight decay skips the norm weights, as HF Trainer skips LayerNorm weights and biases, unless
`optim.decay_norms` (the released RL stack decays every parameter).
"""

from __future__ import annotations

import jax
import optax

from qednano_jax.config import OptimConfig


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step (0-based)."""
    warmup = int(round(cfg.warmup_ratio * total_steps))
    if cfg.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)],
                                    [warmup])
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1),
                                              end_value=cfg.lr * cfg.final_lr_ratio)


def _decay_mask(params):
    """True for the leaves weight decay applies to: every leaf but the norm weights."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not str(getattr(path[-1], "key", path[-1])).endswith("norm"), params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm (if clip_norm > 0) -> AdamW(schedule)."""
    adamw = optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=None if cfg.decay_norms else _decay_mask)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
