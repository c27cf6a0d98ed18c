"""The pure, jitted train step shared by SFT and RL (docs/design.md principle 2).

    loss_fn(model_cfg, params, micro_batch) -> (loss_sum, metric_sums)

`loss_sum` is a SUM over tokens. The batch carries a scalar `denominator` (SFT: the assistant tokens of the whole
accumulated batch, so the loss is normalised over the optimizer batch, not per micro-batch; RL passes its own
constant), and every other entry has a leading micro-batch axis [M, b, ...]. The step scans (`lax.scan`) over the M
micro-batches, accumulating the fp32 gradients of loss_sum / denominator in a carry sharded like the params, then
applies the optax update once. So 4 micro-batches of b rows give the same update as one batch of 4b rows.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qednano_jax import hostmem, sharding
from qednano_jax.config import ModelConfig
from qednano_jax.model import qwen3

LossFn = Callable[[ModelConfig, Any, dict], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    """Everything the step updates. `rng` is a raw uint32[2] key (orbax-friendly), split once per step."""
    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array

    def to_dict(self) -> dict:
        return {"params": self.params, "opt_state": self.opt_state, "step": self.step, "rng": self.rng}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(params=d["params"], opt_state=d["opt_state"], step=d["step"], rng=d["rng"])


# ----------------------------------------------------------------------------------------------- SFT loss

def sft_loss(model_cfg: ModelConfig, params, mb: dict) -> tuple[jax.Array, dict]:
    """Summed next-token NLL over assistant tokens of one packed micro-batch [b, t] (docs/recipe.md §2).

    Uses the chunked `token_logprobs`: [b, t, vocab] logits never exist at once.
    """
    h = qwen3.hidden_states(model_cfg, params, mb["tokens"], positions=mb["positions"],
                            segment_ids=mb["segment_ids"])
    lp_bt = qwen3.token_logprobs(model_cfg, params, h, mb["targets"])
    mask = mb["loss_mask"].astype(jnp.float32)
    loss_sum = -jnp.sum(lp_bt * mask)
    return loss_sum, {"loss_sum": loss_sum, "loss_tokens": jnp.sum(mask),
                      "tokens": jnp.sum((mb["segment_ids"] > 0).astype(jnp.float32))}


# ----------------------------------------------------------------------------------------------- shardings

def param_shardings(model_cfg: ModelConfig, mesh: Mesh, rules) -> Any:
    return sharding.tree_shardings(qwen3.param_axes(model_cfg), rules, mesh, qwen3.param_shapes(model_cfg))


def state_shardings(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh,
                    rules) -> TrainState:
    """NamedShardings of a TrainState: optimizer moments sharded like their params, the rest replicated."""
    p_sh = param_shardings(model_cfg, mesh, rules)
    replicated = NamedSharding(mesh, P())
    abstract = qwen3.abstract_params(model_cfg)
    opt_abstract = jax.eval_shape(optimizer.init, abstract)
    opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, opt_abstract, p_sh,
                                   transform_non_params=lambda _: replicated,
                                   is_leaf=lambda x: isinstance(x, NamedSharding))
    return TrainState(params=p_sh, opt_state=opt_sh, step=replicated, rng=replicated)


def batch_shardings(mesh: Mesh, rules, keys, shape: tuple[int, ...]) -> dict:
    """Arrays of `shape` ([M, b, t] micro-batches) split on axis 1 (the batch); `denominator` replicated. A b that
    does not divide over the batch axes is replicated."""
    out = {k: sharding.batch_sharding(mesh, rules, len(shape), 1, shape) for k in keys}
    out["denominator"] = NamedSharding(mesh, P())
    return out


# ----------------------------------------------------------------------------------------------- init

def init_state(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, params, seed: int,
               shardings: TrainState) -> TrainState:
    """TrainState around existing (possibly sharded) params, placed on `shardings`."""
    def make(p):
        return TrainState(params=p, opt_state=optimizer.init(p), step=jnp.zeros((), jnp.int32),
                          rng=jax.random.key_data(jax.random.PRNGKey(seed)))
    return jax.jit(make, out_shardings=shardings, donate_argnums=(0,))(params)


def random_params(model_cfg: ModelConfig, seed: int, shardings) -> Any:
    """Seeded random init, created directly on its shardings (no full host copy)."""
    return jax.jit(lambda k: qwen3.init_params(model_cfg, k), out_shardings=shardings)(jax.random.PRNGKey(seed))


# ----------------------------------------------------------------------------------------------- the step

def make_train_step(model_cfg: ModelConfig, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, *, mesh: Mesh, rules, state_sh: TrainState,
                    batch_sh: dict) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """jit(step)(state, batch) -> (new state, metrics); the state is donated.

    Metrics (replicated fp32 scalars): `loss` = sum of loss_sum / denominator, `grad_norm` (before clipping), `lr`
    (of this step), `finite` (1, or 0 when the loss or gradient norm was not finite: then the returned state is the
    input state, step counter included), and every entry of the loss_fn's metric sums, summed over micro-batches.

    Micro-batches whose `valid` entry is 0 (a batch padded to a fixed micro-batch count, so one program serves
    every packing) are skipped by `lax.cond`: they cost their transfer, not their compute.
    """

    def step_fn(state: TrainState, batch: dict):
        with sharding.use_rules(mesh, rules):
            denom = batch["denominator"].astype(jnp.float32)
            micro = {k: v for k, v in batch.items() if k != "denominator"}

            def grads_of(mb):
                def f(p):
                    loss_sum, sums = loss_fn(model_cfg, p, mb)
                    return loss_sum / denom, (loss_sum, sums)
                (_, (loss_sum, sums)), g = jax.value_and_grad(f, has_aux=True)(state.params)
                return jax.tree.map(lambda x: x.astype(jnp.float32), g), loss_sum, sums

            def skipped(mb):
                return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(grads_of, mb))

            def body(acc, mb):
                if "valid" in mb:
                    valid = mb.pop("valid")
                    g, loss_sum, sums = jax.lax.cond(valid > 0, grads_of, skipped, mb)
                else:
                    g, loss_sum, sums = grads_of(mb)
                acc = jax.tree.map(jnp.add, acc, g)
                acc = jax.tree.map(jax.lax.with_sharding_constraint, acc, state_sh.params)
                return acc, (loss_sum, sums)

            if next(iter(micro.values())).shape[0] == 1:  # no accumulation: no fp32 accumulator, no scan
                grads, loss_sum, sums = grads_of({k: v[0] for k, v in micro.items() if k != "valid"})
                loss_sums, sums = loss_sum[None], {k: v[None] for k, v in sums.items()}
            else:
                zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
                zeros = jax.tree.map(jax.lax.with_sharding_constraint, zeros, state_sh.params)
                grads, (loss_sums, sums) = jax.lax.scan(body, zeros, micro)
            grad_norm = optax.tree.norm(grads)
            loss = jnp.sum(loss_sums) / denom
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            rng, _ = jax.random.split(jax.random.wrap_key_data(state.rng))
            new = TrainState(params=params, opt_state=opt_state, step=state.step + 1,
                             rng=jax.random.key_data(rng))
            # the non-finite guard (train/driver.py): a NaN / inf loss or gradient leaves the state as it was
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
            metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
                       "lr": jnp.asarray(lr_schedule(state.step), jnp.float32)}
            metrics.update({k: jnp.sum(v).astype(jnp.float32) for k, v in sums.items()})
            return new, metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated),
                   donate_argnums=(0,))


def split_micro(batch: dict, micro_batches: int) -> dict:
    """[B, t] numpy rows -> [M, B/M, t] micro-batches, plus `denominator` = assistant tokens of the whole batch."""
    out = {}
    for k, v in batch.items():
        if v.shape[0] % micro_batches:
            raise ValueError(f"train.micro_batches={micro_batches} must divide the batch of {v.shape[0]} rows")
        out[k] = v.reshape(micro_batches, v.shape[0] // micro_batches, *v.shape[1:])
    return out


def compile_step(fn, state: TrainState, batch: dict):
    """`fn` (a make_train_step program) compiled ahead of its first call for `batch`'s shapes and shardings, then
    the host memory the compiler freed handed back to the OS (hostmem.release_host_memory). Call the result like
    `fn`; it keeps the donation. For runs where one batch shape serves every step (train/sft.py,
    benchmarks/sft_step.py).
    """
    compiled = fn.lower(state, batch).compile()
    hostmem.release_host_memory()
    return compiled
