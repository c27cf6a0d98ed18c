"""Stage 1: supervised fine-tuning on FineProofs-SFT (docs/recipe.md §2), a thin loop around the pure step.

Re-running the same command resumes from the newest complete checkpoint in run_dir/checkpoints: train state,
data-iterator state and counters come back, so the run continues exactly as an uninterrupted one (docs/design.md
principle 4). run_dir may be a URL (gs://bucket/run): checkpoints, logs and the HF export then go to the store.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from qednano_jax import paths, sharding
from qednano_jax.config import Config, ConfigError, ModelConfig
from qednano_jax.data import sft as sft_data
from qednano_jax.model import qwen3
from qednano_jax.train import checkpoint as ckpt_lib
from qednano_jax.train import driver
from qednano_jax.train import metrics as metrics_lib
from qednano_jax.train import optim, step as step_lib

COMPUTE_FIELDS = ("dtype", "param_dtype", "remat_policy", "logprob_chunk", "attention_chunk", "attention_impl")


def mesh_and_rules(cfg: Config):
    """The mesh and rules of cfg.mesh; with sequence parallelism (a rule for act_length) the row length and the
    attention implementation are checked against it (model/attention.py)."""
    try:
        mesh = sharding.make_mesh(cfg.mesh.shape)
    except ValueError as e:
        raise ConfigError(f"mesh.shape: {e}") from None
    rules = dict(cfg.mesh.rules)
    seq = [a for a in sharding._as_tuple(rules.get("act_length")) if mesh.shape.get(a, 1) > 1]
    n = int(np.prod([mesh.shape[a] for a in seq])) if seq else 1
    if n > 1:
        if cfg.data.seq_len % (2 * n):
            raise ConfigError(f"data.seq_len: {cfg.data.seq_len} must be a multiple of {2 * n} for the {n}-way "
                              f"sequence parallelism of mesh.rules.act_length ({'x'.join(seq)})")
        if cfg.model.attention_impl not in ("auto", "flash"):
            raise ConfigError(f"model.attention_impl: {cfg.model.attention_impl!r} does not support sequence "
                              "parallelism (mesh.rules.act_length); use flash or auto")
    return mesh, rules


def model_config(cfg: Config) -> ModelConfig:
    """cfg.model, or the architecture of the HF checkpoint in train.init with cfg.model's compute settings."""
    if cfg.train.init == "random":
        return cfg.model
    from qednano_jax.model.hf import CheckpointError, inspect_checkpoint
    path = paths.resolve(cfg.train.init) / "config.json"
    if not path.is_file():
        raise ConfigError(f"train.init: {cfg.train.init!r} is neither `random` nor an HF checkpoint dir "
                          "(no config.json)")
    try:
        arch = inspect_checkpoint(cfg.train.init)
    except CheckpointError as e:
        raise ConfigError(f"train.init: {e}") from None
    return dataclasses.replace(arch, **{f: getattr(cfg.model, f) for f in COMPUTE_FIELDS})


def initial_params(cfg: Config, model_cfg: ModelConfig, mesh, rules, shardings) -> Any:
    if cfg.train.init == "random":
        return step_lib.random_params(model_cfg, cfg.train.seed, shardings)
    from qednano_jax.model.hf import load_hf
    _, params = load_hf(cfg.train.init, dtype=model_cfg.param_dtype, mesh=mesh, rules=rules)
    return params


def tokenizer_dir(cfg: Config) -> str | None:
    from qednano_jax.data.tokenizer import QWEN3, qwen3_tokenizer_dir
    return str(qwen3_tokenizer_dir()) if cfg.data.tokenizer == QWEN3 else cfg.data.tokenizer


def export_hf(cfg: Config, model_cfg: ModelConfig, params, path: os.PathLike, log: Callable) -> None:
    """HF checkpoint of `params` at `path`, written aside and renamed into place (driver.atomic_export)."""
    from qednano_jax.model.hf import save_hf
    driver.atomic_export(path, lambda tmp: save_hf(model_cfg, params, str(tmp), tokenizer_dir=tokenizer_dir(cfg)))
    log(f"exported HF checkpoint to {path}")


def run(cfg: Config, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) per `cfg`; returns a summary {start_step, steps, losses, data_stats, run_dir}."""
    if cfg.stage != "sft":
        raise ConfigError(f"stage: the SFT loop got stage {cfg.stage!r}")
    tc = cfg.train
    n_hosts = jax.process_count()
    if tc.batch_size % n_hosts:
        raise ConfigError(f"train.batch_size: {tc.batch_size} rows do not split over {n_hosts} hosts")
    if tc.batch_size % tc.micro_batches:
        raise ConfigError(f"train.micro_batches: {tc.micro_batches} must divide train.batch_size {tc.batch_size}")
    if tc.batch_examples % n_hosts:
        raise ConfigError(f"train.batch_examples: {tc.batch_examples} examples do not split over {n_hosts} hosts")
    mesh, rules = mesh_and_rules(cfg)
    # every input is checked before the run dir is touched: the checkpoint to start from, the data
    model_cfg = model_config(cfg)
    ds, stats = sft_data.sft_batches(cfg.data, batch_rows=tc.batch_size // n_hosts,
                                     process_index=jax.process_index(), process_count=n_hosts,
                                     batch_examples=tc.batch_examples // n_hosts, log=log)
    with driver.Run(cfg, "sft", log) as run:
        return _run(cfg, run, mesh, rules, model_cfg, ds, stats)


def _run(cfg: Config, run: driver.Run, mesh, rules, model_cfg, ds, stats) -> dict:
    tc, run_dir, log = cfg.train, run.run_dir, run.log
    is_main = jax.process_index() == 0
    n_hosts = jax.process_count()
    optimizer = optim.make_optimizer(cfg.optim, tc.steps)
    schedule = optim.schedule(cfg.optim, tc.steps)
    st_sh = step_lib.state_shardings(model_cfg, optimizer, mesh, rules)

    if is_main:
        (run_dir / "data_stats.json").write_text(json.dumps(dataclasses.asdict(stats), indent=1))
    data_iter = iter(ds)

    ckpt = run.closing(ckpt_lib.Checkpointer(run_dir / "checkpoints", every=cfg.checkpoint.every,
                                             keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save))
    start = ckpt.latest_step()
    if start is not None:
        abstract = jax.eval_shape(lambda: step_lib.TrainState(
            params=qwen3.abstract_params(model_cfg), opt_state=optimizer.init(qwen3.abstract_params(model_cfg)),
            step=jnp.zeros((), jnp.int32), rng=jnp.zeros((2,), jnp.uint32)).to_dict())
        tree, data_state, extra = ckpt.restore(start, ckpt_lib.abstract_like(abstract, st_sh.to_dict()))
        state = step_lib.TrainState.from_dict(tree)
        data_iter.set_state(data_state)
        log(f"resumed from {run_dir / 'checkpoints'} step {start}")
    else:
        start = 0
        state = step_lib.init_state(model_cfg, optimizer, initial_params(cfg, model_cfg, mesh, rules, st_sh.params),
                                    tc.seed, st_sh)
    n_params = qwen3.count_params(state.params)
    log(f"model: {n_params:,} params; mesh {dict(mesh.shape)}; {jax.device_count()} devices")

    keys = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    micro_shape = (tc.micro_batches, tc.batch_size // tc.micro_batches, cfg.data.seq_len)
    b_sh = step_lib.batch_shardings(mesh, rules, keys, micro_shape)
    if n_hosts > 1 and b_sh["tokens"].spec[1] is None:
        raise ConfigError(f"train.batch_size: {micro_shape[1]} rows per micro-batch do not split over the data "
                          f"axes of mesh {dict(mesh.shape)}; each host must feed its own rows")
    train_step = step_lib.make_train_step(model_cfg, step_lib.sft_loss, optimizer, schedule, mesh=mesh,
                                          rules=rules, state_sh=st_sh, batch_sh=b_sh)
    count = jax.jit(lambda m: jnp.sum(m.astype(jnp.float32)), out_shardings=b_sh["denominator"])
    flops_per_token = metrics_lib.train_flops_per_token(model_cfg, cfg.data.seq_len)
    # audit trail: which examples (dataset row indices) each step consumed on this host
    consumed_log = run.closing(paths.AppendFile(run_dir / f"consumed.process_{jax.process_index()}.jsonl"))
    losses: dict[int, float] = {}
    t_last, tokens_since = time.perf_counter(), 0.0
    run.begin(start)
    compiled = None
    for i in range(start, tc.steps):
        local = next(data_iter)
        micro = step_lib.split_micro({k: local[k] for k in keys}, tc.micro_batches)
        batch = sharding.host_to_global(micro, {k: b_sh[k] for k in keys})
        batch["denominator"] = count(batch["loss_mask"])
        if compiled is None:  # one batch shape for the run: compile it before the first step runs
            compiled = step_lib.compile_step(train_step, state, batch)
        state, m = compiled(state, batch)
        step = i + 1
        driver.check_finite(step, jax.device_get({k: m[k] for k in ("finite", "loss", "grad_norm")}),
                            ckpt.latest_step)
        consumed_log.write(json.dumps({"step": step, "ids": sft_data.consumed_ids([local])}) + "\n")
        consumed_log.flush()
        tokens_since += float((local["segment_ids"] > 0).sum()) * n_hosts
        stop = run.stop_requested()
        if run.log_due(step, stop):
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            now = time.perf_counter()
            m["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
            if tc.peak_flops > 0:
                m["mfu"] = m["tokens_per_s"] * flops_per_token / (tc.peak_flops * jax.device_count())
            t_last, tokens_since = now, 0.0
            losses[step] = m["loss"]
            run.record(step, m, metrics_lib.format_metrics(step, m))
            run.progress(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")
        else:
            run.progress()
        saved = ckpt.save(step, state.to_dict(), data_state=data_iter.get_state(),
                          extra={"data_stats": dataclasses.asdict(stats)}, force=step == tc.steps or stop)
        if saved and cfg.checkpoint.export_hf_each:
            export_hf(cfg, model_cfg, state.params, run_dir / f"hf-step-{step}", run.log)
        if stop:
            run.stopped(step)
            break
    run.close()
    if tc.export_hf and not run.preempted:
        export_hf(cfg, model_cfg, state.params, run_dir / "hf", log)
    return {"start_step": start, "steps": tc.steps, "losses": losses, "data_stats": dataclasses.asdict(stats),
            "run_dir": str(run_dir), "state": state, "preempted": run.preempted}
