"""The trainer side of RL (`RLTrainer`): the train state (its `step` is the weight version), the jitted accumulated
step with the RL loss (rl.losses.rl_loss_fn), refits of the rollout backend, checkpoints, multi-host batches."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qednano_jax import paths, sharding
from qednano_jax.config import Config
from qednano_jax.model import qwen3
from qednano_jax.reward.grader import Grader
from qednano_jax.rl import losses
from qednano_jax.rl.batch import (BATCH_KEYS, FLOAT_KEYS, Group, build_train_batch, loss_tokens_per_row,
                                  max_micro_batches)
from qednano_jax.train import checkpoint as ckpt_lib
from qednano_jax.train import optim, sft, step as step_lib


def detached(params):
    """A copy of the params in new buffers: the train step donates its state, the native engine keeps its own."""
    return jax.tree.map(lambda x: x.copy(), params)


class RLTrainer:
    """The trainer side of RL: the TrainState (its `step` is the weight version), the jitted accumulated step with
    the RL loss, checkpoints. `train_on_groups` is what the RL and RC loops call once per optimizer step."""

    def __init__(self, cfg: Config, *, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.mesh, self.rules = sft.mesh_and_rules(cfg)
        self.model_cfg = sft.model_config(cfg)
        self.optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
        self.schedule = optim.schedule(cfg.optim, cfg.train.steps)
        self.st_sh = step_lib.state_shardings(self.model_cfg, self.optimizer, self.mesh, self.rules)
        # [M, b, t] arrays split on b over the data-parallel axes (M varies per step: one program per M); a b that
        # does not divide over them is replicated (correct, but every device then computes every row)
        split = sharding.batch_sharding(self.mesh, self.rules, 3, 1)
        dp = split.spec[1] if len(split.spec) > 1 else None
        axes = () if dp is None else ((dp,) if isinstance(dp, str) else tuple(dp))
        self.dp_size = int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1
        if cfg.rl.micro_batch_rows % self.dp_size:
            log(f"warning: rl.micro_batch_rows {cfg.rl.micro_batch_rows} does not split over the {self.dp_size} "
                f"data-parallel devices of mesh {dict(self.mesh.shape)}: micro-batches are replicated")
            split = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.b_sh = {k: split for k in BATCH_KEYS}
        self.b_sh["valid"] = self.b_sh["denominator"] = jax.sharding.NamedSharding(self.mesh,
                                                                                  jax.sharding.PartitionSpec())
        self.loss_tokens = loss_tokens_per_row(cfg)
        loss_fn = losses.rl_loss_fn(cfg.rl.loss, cfg.rl.temperature, self.loss_tokens)
        self.step_fn = step_lib.make_train_step(self.model_cfg, loss_fn,
                                                self.optimizer, self.schedule, mesh=self.mesh, rules=self.rules,
                                                state_sh=self.st_sh, batch_sh=self.b_sh)
        self.ckpt = ckpt_lib.Checkpointer(paths.resolve(cfg.train.run_dir) / "checkpoints",
                                          every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                                          async_save=cfg.checkpoint.async_save)
        self.state: step_lib.TrainState | None = None

    @property
    def version(self) -> int:
        return int(jax.device_get(self.state.step))

    def init_or_restore(self) -> tuple[Any, dict]:
        """Restore the newest checkpoint -> (data state, extra), or initialise -> (None, {})."""
        start = self.ckpt.latest_step()
        if start is None:
            params = sft.initial_params(self.cfg, self.model_cfg, self.mesh, self.rules, self.st_sh.params)
            self.state = step_lib.init_state(self.model_cfg, self.optimizer, params, self.cfg.train.seed, self.st_sh)
            return None, {}
        abstract = jax.eval_shape(lambda: step_lib.TrainState(
            params=qwen3.abstract_params(self.model_cfg),
            opt_state=self.optimizer.init(qwen3.abstract_params(self.model_cfg)),
            step=jnp.zeros((), jnp.int32), rng=jnp.zeros((2,), jnp.uint32)).to_dict())
        tree, data_state, extra = self.ckpt.restore(start, ckpt_lib.abstract_like(abstract, self.st_sh.to_dict()))
        self.state = step_lib.TrainState.from_dict(tree)
        self.log(f"resumed from {self.ckpt.directory} step {start}")
        return data_state, extra

    def host_batch(self, groups: Sequence[Group]) -> tuple[dict, dict]:
        """The step's packed numpy batch and packing stats (build_train_batch with this config's numbers)."""
        rl = self.cfg.rl
        return build_train_batch(groups, rl.loss, seq_len=self.cfg.data.seq_len, micro_batch_rows=rl.micro_batch_rows,
                                 samples_per_step=rl.prompts_per_step * rl.group_size,
                                 loss_tokens_per_row=self.loss_tokens)

    def empty_batch(self) -> dict:
        """Zeros shaped and typed like every `host_batch` (what the other hosts pass to the broadcast)."""
        rl = self.cfg.rl
        m = max(max_micro_batches(rl.prompts_per_step * rl.group_size, rl.micro_batch_rows), 1)
        shape = (m, rl.micro_batch_rows, self.cfg.data.seq_len)
        out = {k: np.zeros(shape, np.float32 if k in FLOAT_KEYS else np.int32) for k in BATCH_KEYS}
        return out | {"valid": np.zeros((m,), np.int32), "denominator": np.float32(0)}

    def train_on_groups(self, groups: Sequence[Group]) -> dict:
        """One optimizer step on `groups` (advantages -> packing -> accumulated step); returns float metrics: loss,
        grad_norm, lr, per-token means of the rl_loss metrics (clip_fraction, entropy, logprob_gap = mean
        |logp_new - logp_old| before the update, ratio, ...), packing stats and train_tokens_per_s."""
        return self.train_on_batch(*self.host_batch(groups))

    def train_on_batch(self, host: dict | None, pack: dict | None = None) -> dict:
        """One optimizer step on a packed host batch. Multi-host: process 0 holds the batch (its rollouts) and
        broadcasts it; the other processes pass None. Every process then places its shards of the global arrays."""
        pack = pack or {}
        t0 = time.perf_counter()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            host = multihost_utils.broadcast_one_to_all(host if jax.process_index() == 0 else self.empty_batch())
            host = {k: np.asarray(v) for k, v in host.items()}
            batch = {k: jax.make_array_from_callback(v.shape, self.b_sh[k], lambda idx, v=v: v[idx])
                     for k, v in host.items()}
        else:
            batch = sharding.host_to_global({k: host[k] for k in BATCH_KEYS}, {k: self.b_sh[k] for k in BATCH_KEYS})
            for k in ("valid", "denominator"):
                batch[k] = jax.device_put(host[k], self.b_sh[k])
        self.state, m = self.step_fn(self.state, batch)
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        dt = time.perf_counter() - t0
        sums = {k: m.pop(k) for k in list(m) if k not in ("loss", "grad_norm", "lr", "finite")}
        out = {**m, **losses.metric_means(sums), **pack, "train_s": dt,
               "train_tokens_per_s": pack.get("tokens", 0.0) / dt, "train_compiles": float(self.step_fn._cache_size())}
        out["loss_tokens"] = out.pop("tokens")
        return out

    def host_params(self):
        """The params as numpy arrays on this host (gathered from every host: a collective)."""
        from jax.experimental import multihost_utils
        return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), self.state.params)

    def refit(self, rollout) -> float:
        """Push the current params to the rollout backend as weight version `self.version`; returns seconds.

        Multi-host: every process calls this (the params are gathered from all hosts); only process 0 holds a
        rollout backend (the others pass None): the native engine gets the gathered params on process 0's own
        devices, an SGLang export is written by process 0 (refit.export_version) and the servers updated by it."""
        t0 = time.perf_counter()
        native = self.cfg.rollout.backend == "native"
        if jax.process_count() == 1:
            params = detached(self.state.params) if native else self.state.params
            return rollout.refit(params, str(self.version)).total_s
        if native:
            params = self.host_params()
            if rollout is not None:
                rollout.refit(params, str(self.version))
        elif rollout is not None:
            rollout.refit(self.state.params, str(self.version))
        else:
            from qednano_jax.rollout import refit as refit_lib
            rc = self.cfg.rollout
            refit_lib.export_version(self.model_cfg, self.state.params, rc.refit_dir, str(self.version), rc.keep_last,
                                     dtype=None if rc.export_dtype == "params" else rc.export_dtype)
        return time.perf_counter() - t0

    def rollout_placement(self) -> tuple[Any, Any, Any]:
        """(params, mesh, rules) for a native engine: the trainer's own sharded copy and mesh on one host; on a pod,
        the gathered params on process 0's local devices, data parallel (the engine never spans hosts)."""
        if jax.process_count() == 1:
            return detached(self.state.params), self.mesh, self.rules
        local = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
        return self.host_params(), local, sharding.RULE_SETS["dp"]

    def save_step(self, step: int, data_state: Any, extra: Callable[[], dict], *, grader: Grader | None = None,
                  force: bool = False) -> None:
        """Checkpoint `step` when checkpoint.every says so, or when `force`d (the last step, a preemption); `extra()`
        (which may wait for in-flight rollouts) is built only then, with the grader's counters added."""
        if not force and step % self.cfg.checkpoint.every:
            return
        payload = extra()
        if grader is not None:
            payload["grader_stats"] = dataclasses.asdict(grader.stats)
        self.save(data_state, payload, force=force)

    def save(self, data_state: Any, extra: dict, force: bool = False) -> bool:
        return self.ckpt.save(self.version, self.state.to_dict(), data_state=data_state, extra=extra, force=force)

    def close(self) -> None:
        self.ckpt.close()
