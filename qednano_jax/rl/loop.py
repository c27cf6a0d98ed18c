"""Stage 2: GRPO-style RL with rubric rewards (docs/recipe.md §3), a thin loop around pure pieces (docs/design.md picture).

    sample prompts -> rollouts (Rollout backend) -> grade (Grader, or any RewardFn) -> group advantages
      -> pack completions into rows -> accumulated train step (train/step.py) -> refit the rollout backend -> checkpoint

Its pieces, which the RC stage (docs/recipe.md §4) reuses as they are:
- rl/batch.py: `Group` (prompt ids + n completions + rewards), `Batch`, `build_train_batch` (completions ->
  fixed-length rows with segment ids, loss only on completion tokens, behaviour logprobs and advantages on the
  token that each predicts);
- rl/trainer.py: `RLTrainer` (the train state, the jitted step with the RL loss, `train_on_groups(groups)`,
  `refit(rollout)`, checkpoints);
- rl/pipeline.py: `RolloutPipeline` (batches generated and graded in a background thread, `max_lag` batches
  ahead) and `grader_reward_fn(grader)` (a `RewardFn`).
This module holds the metrics, the multi-host follower loop and the run.

Overlap. Each generate call (`rl.prompts_per_call` prompts) is graded in a thread pool as soon as it returns, while
the next call generates. With `rl.max_lag = L > 0` the rollouts of step s+L are generated and graded in the
background while step s trains, with the weights of step s; before each refit the loop waits for them, so every
batch's weight version is fixed by the schedule and a resumed run continues exactly as an uninterrupted one. A group
whose completions report a weight version more than L behind the trainer (e.g. a generator that was not refitted)
is discarded and counted (`stale_groups`).

Resume (docs/design.md principle 4): a checkpoint holds the train state (params, optimizer, step = weight version, rng),
the prompt sampler state, the rollouts already generated for later steps (with their grades), and the counters.
Re-running the same command continues from the newest complete checkpoint and refits the rollout backend first.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import time
from typing import Callable, Sequence

import jax
import numpy as np

from qednano_jax.config import Config, ConfigError, ModelConfig
from qednano_jax.data import rl as rl_data
from qednano_jax.model import qwen3
from qednano_jax.reward.grader import GRADERS, Grader, GraderStats, MAX_SCORE
from qednano_jax.rl.batch import Batch, Group, filter_stale, weight_lag
from qednano_jax.rl.pipeline import RewardFn, RolloutPipeline, _done, grader_reward_fn
from qednano_jax.rl.trainer import RLTrainer
from qednano_jax.train import driver
from qednano_jax.train import sft


# ----------------------------------------------------------------------------------------------- metrics

def rollout_metrics(groups: Sequence[Group]) -> dict:
    """Reward mean/std, fraction of score 7, truncation rate, completion lengths, grader outcomes of one batch."""
    rewards = np.asarray([r for g in groups for r in g.rewards], np.float64)
    comps = [c for g in groups for c in g.completions]
    grades = [r for g in groups for r in g.grades]
    lengths = np.asarray([len(c.token_ids) for c in comps], np.float64)
    out = {"reward_mean": float(rewards.mean()) if rewards.size else 0.0,
           "reward_std": float(rewards.std()) if rewards.size else 0.0,
           "completions": float(len(comps)),
           "truncated_frac": float(np.mean([c.finish_reason == "length" for c in comps])) if comps else 0.0,
           "completion_len_mean": float(lengths.mean()) if comps else 0.0,
           "completion_len_max": float(lengths.max()) if comps else 0.0}
    if grades:
        out |= {"score7_frac": float(np.mean([r.score == MAX_SCORE for r in grades])),
                "grader_failed": float(sum(r.failed for r in grades)),
                "grader_no_score": float(sum(r.no_score for r in grades)),
                "grader_empty_proof": float(sum(r.skipped for r in grades))}
    return out


def format_rl_metrics(step: int, m: dict) -> str:
    keys = ("reward_mean", "score7_frac", "truncated_frac", "completion_len_mean", "loss", "grad_norm", "entropy",
            "logprob_gap", "clip_fraction", "grader_failed", "stale_groups", "refit_s", "gen_tokens_per_s")
    return " | ".join([f"step {step}"] + [f"{k} {m[k]:.4g}" for k in keys if k in m])


# ----------------------------------------------------------------------------------------------- the run

def make_reward_fn(cfg: Config, model_cfg: ModelConfig, tokenizer, log) -> tuple[RewardFn, Grader]:
    from qednano_jax.reward.grader import make_grader
    kwargs = {}
    if cfg.grader.backend == "native" and cfg.grader.judge_path == "random":
        # the tiny CPU demo's judge: a seeded random Qwen3 of the policy's shape with the policy's tokenizer
        from qednano_jax.rollout.native import NativeRollout
        params = qwen3.init_params(model_cfg, jax.random.PRNGKey(cfg.train.seed + 1))
        kwargs = {"engine": NativeRollout(model_cfg, params, tokenizer, max_batch=cfg.grader.concurrency,
                                          seed=cfg.train.seed + 1), "tokenizer": tokenizer}
        log("grader: native judge = a random Qwen3 like the policy (grader.judge_path: random)")
    grader = make_grader(cfg.grader, **kwargs)
    return grader_reward_fn(grader), grader


def follow(cfg: Config, trainer: RLTrainer, run: driver.Run) -> dict:
    """The loop of processes 1..n-1 of a multi-host RL or RC run (docs/design.md principle 6: multi-controller JAX).

    Process 0 alone talks to the rollout servers (or runs the native engine on its own devices) and the grader,
    samples prompts, packs each step's batch and writes metrics; every process trains its shards of the step.
    So this loop issues exactly the collectives of process 0's loop, in its order: the engine's first placement or
    the servers' first refit, then per step the batch broadcast and train step (RLTrainer.train_on_batch), the
    refit's gathers, the preemption vote, the checkpoint save; at the end the HF export's gathers."""
    tc = cfg.train
    start = trainer.version
    if cfg.rollout.backend == "native":
        trainer.rollout_placement()
    else:
        trainer.refit(None)
    run.begin(start)
    for s in range(start, tc.steps):
        m = trainer.train_on_batch(None)
        driver.check_finite(s + 1, m, trainer.ckpt.latest_step)
        trainer.refit(None)
        step = s + 1
        stop = run.stop_requested()
        trainer.save_step(step, None, dict, force=step == tc.steps or stop)
        if stop:
            run.preempted = True
            break
    run.close()
    if tc.export_hf and not run.preempted:
        sft.export_hf(cfg, trainer.model_cfg, trainer.state.params, run.run_dir / "hf", run.log)
    return {"start_step": start, "steps": tc.steps, "metrics": {}, "state": trainer.state,
            "preempted": run.preempted}


def run(cfg: Config, log: Callable[[str], None] = print, *, reward_fn: RewardFn | None = None) -> dict:
    """Train (or resume) stage 2 per `cfg`. `reward_fn` replaces the configured grader (e.g. a programmatic reward
    in tests). Returns {start_step, steps, metrics: {step: {...}}, run_dir, counters, state}."""
    if cfg.stage != "rl":
        raise ConfigError(f"stage: the RL loop got stage {cfg.stage!r}")
    inputs = load_inputs(cfg, log)  # checked before the run dir is touched
    with driver.Run(cfg, "rl", log) as run:
        return _run(cfg, run, reward_fn, inputs)


def load_inputs(cfg: Config, log: Callable[[str], None]) -> tuple | None:
    """(tokenizer, prompts, data stats) of an RL or RC run, every input checked (the checkpoint to start from, the
    tokenizer against its vocabulary, the prompt rows); None on processes other than 0, which read no data."""
    from qednano_jax.data.tokenizer import load_tokenizer
    model_cfg = sft.model_config(cfg)
    if jax.process_index() != 0:
        return None
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except Exception as e:  # noqa: BLE001 - any failure to load it is the config's tokenizer: named
        raise ConfigError(f"data.tokenizer: cannot load {cfg.data.tokenizer!r}: {e}") from None
    if len(tokenizer) > model_cfg.vocab_size:
        raise ConfigError(f"data.tokenizer: {len(tokenizer)} tokens but the model's vocabulary has "
                          f"{model_cfg.vocab_size} rows")
    reference = GRADERS[cfg.grader.backend].reference  # the row field proofs are graded against
    prompts, data_stats = rl_data.load_prompts(cfg.data, cfg.rl, tokenizer, log=log, reference=reference)
    return tokenizer, prompts, data_stats


def _run(cfg: Config, run: driver.Run, reward_fn: RewardFn | None, inputs) -> dict:
    from qednano_jax.rollout import make_rollout

    tc, rl, run_dir, log = cfg.train, cfg.rl, run.run_dir, run.log
    trainer = run.closing(RLTrainer(cfg, log=log))
    model_cfg = trainer.model_cfg
    if jax.process_index() != 0:
        trainer.init_or_restore()
        return follow(cfg, trainer, run)
    tokenizer, prompts, data_stats = inputs
    (run_dir / "data_stats.json").write_text(json.dumps(dataclasses.asdict(data_stats), indent=1))
    sampler = rl_data.PromptSampler(len(prompts), cfg.data.shuffle_seed)

    data_state, extra = trainer.init_or_restore()
    start = trainer.version
    if data_state is not None:
        sampler.set_state(data_state)
    counters = collections.Counter(extra.get("counters", {}))
    log(f"model: {qwen3.count_params(trainer.state.params):,} params; mesh {dict(trainer.mesh.shape)}; "
        f"{jax.device_count()} devices; {rl.prompts_per_step} prompts x {rl.group_size} per step")

    grader = None
    if reward_fn is None:
        reward_fn, grader = make_reward_fn(cfg, model_cfg, tokenizer, log)
        if "grader_stats" in extra:
            grader.stats = GraderStats(**extra["grader_stats"])
    placed, r_mesh, r_rules = trainer.rollout_placement() if cfg.rollout.backend == "native" else (None, None, None)
    rollout = run.closing(make_rollout(cfg.rollout, model_cfg, placed, tokenizer, mesh=r_mesh, rules=r_rules,
                                       version=str(start)))
    if cfg.rollout.backend != "native":  # the servers hold weights of unknown age: push ours first
        t0 = time.perf_counter()
        trainer.refit(rollout)
        log(f"rollout servers refitted to weight version {start} ({time.perf_counter() - t0:.1f}s)")
    stop_ids = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
    pipe = run.closing(RolloutPipeline(rollout, prompts, reward_fn, tokenizer, rl, stop_token_ids=stop_ids))
    buffer: collections.deque = collections.deque(_done(Batch.from_json(b)) for b in extra.get("buffer", []))

    history: dict[int, dict] = {}

    def launch() -> concurrent.futures.Future:
        positions = sampler.next(rl.prompts_per_step)
        return pipe.launch(positions, sampler.batches - 1)

    run.begin(start)
    for s in range(start, tc.steps):
        while len(buffer) < rl.max_lag + 1:
            buffer.append(launch())
        batch = buffer.popleft().result()
        groups, stale = filter_stale(batch.groups, s, rl.max_lag)
        while not groups:  # every group too old (a generator missed refits): sample afresh, current weights
            counters["stale_groups"] += stale
            run.log(f"step {s + 1}: all {stale} groups of batch {batch.index} were stale; generating a new batch")
            batch = launch().result()
            groups, stale = filter_stale(batch.groups, s, rl.max_lag)
        counters["stale_groups"] += stale
        m = rollout_metrics(groups)
        m["stale_groups"] = float(stale)
        lags = [weight_lag(c, s) for g in groups for c in g.completions]
        m["weight_lag_mean"] = float(np.mean(lags))
        m["gen_tokens_per_s"] = batch.gen_tokens / max(batch.gen_s, 1e-9)
        m |= trainer.train_on_groups(groups)
        driver.check_finite(s + 1, m, trainer.ckpt.latest_step)  # before any refit or save
        for f in buffer:  # rollouts of later steps finish with the weights they started with
            f.result()
        m["refit_s"] = trainer.refit(rollout)
        counters["steps"] += 1
        counters["completions"] += int(m["completions"])
        counters["batches_trained"] += 1
        step = s + 1
        if grader is not None:
            m |= {f"grader_total_{k}": float(v) for k, v in dataclasses.asdict(grader.stats).items()}
        m["stale_groups_total"] = float(counters["stale_groups"])
        history[step] = m
        stop = run.stop_requested()
        if run.log_due(step, stop):
            run.record(step, m, format_rl_metrics(step, m))
        run.progress(reward=f"{m['reward_mean']:.3f}", loss=f"{m['loss']:.4g}")
        trainer.save_step(step, sampler.state(), lambda: {
            "version": step, "counters": dict(counters), "buffer": [f.result().to_json() for f in buffer],
            "data_stats": dataclasses.asdict(data_stats)}, grader=grader, force=step == tc.steps or stop)
        if stop:
            run.stopped(step)
            break
    run.close()
    if tc.export_hf and not run.preempted:
        sft.export_hf(cfg, model_cfg, trainer.state.params, run_dir / "hf", log)
    return {"start_step": start, "steps": tc.steps, "metrics": history, "run_dir": str(run_dir),
            "counters": dict(counters), "state": trainer.state, "sampler": sampler.state(),
            "preempted": run.preempted}
