"""Stage 3: RL with a reasoning cache (docs/recipe.md §4), on stage 2's trainer, rollout pipeline and checkpoints.

Per optimizer step s:

    RC actor   problems_per_step = rl.prompts_per_step / rc.states_sampled problems (the stage-2 prompt sampler;
               the reasoning prompt's {problem} is the raw problem, as in the released RC actor);
               the CURRENT policy runs rc.cycles RC turns on each (rc/cycle.py: jitted on native engines, host
               loop otherwise), summarized by the summarizer (rc.summarizer: the policy's own backend by default,
               or a frozen model); each turn's own proof is graded for logging only
    states     the T + 1 states s_0..s_T of each problem (initial summary, then each summary); k = rc.states_sampled
               of them, drawn by `state.sample_states(rc.seed, s, problem)`
    rollouts   each chosen state's reasoning prompt is an independent training prompt: rl.group_size fresh rollouts
               (stage 2's RolloutPipeline), graded against the ORIGINAL problem text (data.prompt_template, e.g.
               "Generate a rigorous proof to the following question:\\n\\n{problem}"), not the summary prompt
    train      stage 2's `RLTrainer.train_on_groups` (GRPO groups = one state's rollouts), then `refit`

The RC actor of step s + 1 runs right after the refit of step s, and its states (the RC state buffer) are saved in
the checkpoint's `extra`: a resumed run trains step s + 1 on exactly the states an uninterrupted run would have, made
with the same weights, and the RC actor's choices all derive from (rc.seed, step).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from typing import Any, Callable

import jax
import numpy as np

from qednano_jax import paths, sharding
from qednano_jax.config import Config, ConfigError
from qednano_jax.data import rl as rl_data
from qednano_jax.model import qwen3
from qednano_jax.prompts import load as load_prompt
from qednano_jax.rc import cycle, prompts as rcp, state as rcs
from qednano_jax.reward.grader import GraderStats
from qednano_jax.rl import loop, pipeline
from qednano_jax.rl.trainer import RLTrainer
from qednano_jax.rollout.base import Completion, SamplingParams
from qednano_jax.train import driver
from qednano_jax.train import sft


def check_config(cfg: Config) -> int:
    """Problems per step; ConfigError naming the field when the rc / rl numbers do not fit together."""
    rl, rc = cfg.rl, cfg.rc
    if cfg.stage != "rc":
        raise ConfigError(f"stage: the RC loop got stage {cfg.stage!r}")
    if rc.states_sampled > rc.cycles + 1:
        raise ConfigError(f"rc.states_sampled: {rc.states_sampled} states asked of the {rc.cycles + 1} that "
                          f"rc.cycles={rc.cycles} emit")
    if rl.prompts_per_step % rc.states_sampled:
        raise ConfigError(f"rl.prompts_per_step: {rl.prompts_per_step} training prompts (RC states) per step do "
                          f"not split into problems of rc.states_sampled={rc.states_sampled} states")
    if rl.max_lag:
        raise ConfigError("rl.max_lag: the RC loop trains on-policy (its states are made by the current policy); "
                          "set rl.max_lag: 0")
    if rc.summarizer == "native" and not rc.summarizer_path:
        raise ConfigError("rc.summarizer_path: rc.summarizer native needs the summarizer's HF checkpoint dir")
    if rc.summarizer == "sglang" and not rc.summarizer_urls:
        raise ConfigError("rc.summarizer_urls: rc.summarizer sglang needs the summarizer servers' URLs")
    native = cfg.rollout.backend == "native" and rc.summarizer in ("policy", "native")
    if rc.loop == "jit" and not native:
        raise ConfigError("rc.loop: jit needs the native engine for the policy (rollout.backend native) and the "
                          "summarizer (rc.summarizer policy or native); use host or auto")
    return rl.prompts_per_step // rc.states_sampled


def problem_width(cfg: Config, tpl: cycle.RCTemplates) -> int:
    """Problem tokens that fit: an RC prompt (template + problem + H_S summary) plus rl.max_tokens must fit a
    packed row of data.seq_len tokens."""
    width = cfg.data.seq_len - cfg.rl.max_tokens - cfg.rc.summary_max_tokens - sum(len(p) for p in tpl.solve)
    if width < 1:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} tokens hold no problem next to rl.max_tokens "
                          f"{cfg.rl.max_tokens}, rc.summary_max_tokens {cfg.rc.summary_max_tokens} and the "
                          f"{sum(len(p) for p in tpl.solve)}-token RC prompt template")
    return width


def make_summarizer(cfg: Config, policy_rollout: Any, tokenizer: Any, mesh=None, rules=None) -> tuple[Any, Any]:
    """(summarizer rollout backend, its tokenizer) per rc.summarizer; a separate summarizer is frozen (never
    refitted)."""
    from qednano_jax.data.tokenizer import load_tokenizer
    rc = cfg.rc
    if rc.summarizer == "policy":
        return policy_rollout, tokenizer
    tok = load_tokenizer(rc.summarizer_tokenizer) if rc.summarizer_tokenizer else None
    if rc.summarizer == "native":
        from qednano_jax.model.hf import load_hf
        from qednano_jax.rollout.native import NativeRollout
        tok = tok or load_tokenizer(rc.summarizer_path)
        model_cfg, params = load_hf(rc.summarizer_path, mesh=mesh, rules=rules)
        return NativeRollout(model_cfg, params, tok, max_batch=cfg.rollout.max_batch, mesh=mesh, rules=rules,
                             version="frozen"), tok
    from qednano_jax.rollout.sglang import SGLangRollout
    return SGLangRollout(dataclasses.replace(cfg.rollout, backend="sglang", urls=tuple(rc.summarizer_urls))), \
        tok or tokenizer


class RCActor:
    """Runs the RC cycles of a batch of problems with the current policy (jitted or host loop) and grades each
    turn's own proof for logging."""

    def __init__(self, cfg: Config, rollout: Any, summarizer: Any, tokenizer: Any, summarizer_tokenizer: Any,
                 prompts: list[rl_data.RLPrompt], reward_fn: pipeline.RewardFn, use_jit: bool, log: Callable):
        self.cfg, self.rollout, self.summarizer, self.tokenizer = cfg, rollout, summarizer, tokenizer
        self.reward_fn, self.use_jit = reward_fn, use_jit
        rc = cfg.rc
        self.tpl = cycle.make_templates(
            tokenizer, summarizer_tokenizer, step_by_step=rc.step_by_step,
            solve_template=load_prompt(rc.solve_prompt_file, "rc_solve.txt", rcp.SOLVE_FIELDS, "rc.solve_prompt_file"),
            summary_template=load_prompt(rc.summary_prompt_file, "rc_summary.txt", rcp.SUMMARY_FIELDS,
                                         "rc.summary_prompt_file"))
        width = problem_width(cfg, self.tpl)
        # the reasoning prompt's {problem} is the raw problem; the grader sees the wrapped original (data.prompt_template)
        self.originals = [cfg.data.prompt_template.format(problem=p.problem) for p in prompts]
        tokens = [tokenizer(p.problem, add_special_tokens=False)["input_ids"] for p in prompts]
        self.fits = [len(x) <= width for x in tokens]
        self.width = min(width, max(len(x) for x in tokens))
        if not any(self.fits):
            raise ConfigError(f"data.seq_len: no problem fits the {width} tokens an RC prompt leaves for it")
        if not all(self.fits):
            log(f"rc: {len(self.fits) - sum(self.fits)} of {len(self.fits)} problems are longer than the {width} "
                "tokens an RC prompt leaves for them (data.seq_len) and are never drawn")
        self.prompts = prompts
        self.initial = tokenizer(rc.initial_summary, add_special_tokens=False)["input_ids"] if rc.initial_summary \
            else []
        stop = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
        self.stop = stop

    def sampling(self, step: int) -> tuple[SamplingParams, SamplingParams]:
        rl, rc = self.cfg.rl, self.cfg.rc
        policy = SamplingParams(max_new_tokens=rl.max_tokens, temperature=rl.temperature, top_p=rl.top_p,
                                top_k=rl.top_k, stop_token_ids=self.stop, seed=pipeline.batch_seed(rc.seed, step, 0))
        summary = SamplingParams(max_new_tokens=rc.summary_max_tokens, temperature=rc.summary_temperature,
                                 top_p=rc.summary_top_p, top_k=rc.summary_top_k, stop_token_ids=self.stop,
                                 seed=pipeline.batch_seed(rc.seed, step, 1))
        return policy, summary

    def problems(self, positions: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The raw problem texts at `positions` as the reasoning prompt's {problem} tokens."""
        return cycle.tokenize_texts(self.tokenizer, [self.prompts[p].problem for p in positions], self.width)

    def run(self, positions: list[int], step: int) -> tuple[rcs.RCState, dict]:
        """The RC state after rc.cycles summarized turns of the problems at `positions`, and actor metrics."""
        rc = self.cfg.rc
        problem_bp, problem_len_b = self.problems(positions)
        policy_sp, summary_sp = self.sampling(step)
        state = rcs.init_state(positions, self.initial, turns=rc.cycles, summary_width=rc.summary_max_tokens,
                               reasoning_width=self.cfg.rl.max_tokens)
        t0 = time.perf_counter()
        if self.use_jit:
            state = cycle.run_native(self.rollout, self.summarizer, self.tpl, problem_bp, problem_len_b, state,
                                     policy_sampling=policy_sp, summary_sampling=summary_sp)
            jax.block_until_ready(state)
        else:
            state = cycle.rc_loop_host(self.rollout, self.summarizer, self.tpl, problem_bp, problem_len_b, state,
                                       policy_sampling=policy_sp, summary_sampling=summary_sp)
        dt = time.perf_counter() - t0
        lengths = np.asarray(state.lengths)
        m = {"rc_actor_s": dt,
             "rc_actor_tokens_per_s": float(lengths.sum() + np.asarray(state.summary_tokens).sum()) / max(dt, 1e-9),
             "rc_summary_len_mean": float(np.asarray(state.history_len)[:, 1:].mean())}
        if rc.grade_turns:
            state = rcs.with_rewards(state, self.grade_turns(state))
        rewards = np.asarray(state.rewards)
        for t in range(rc.cycles):
            m[f"rc_turn{t}_len_mean"] = float(lengths[:, t].mean())
            if rc.grade_turns:
                m[f"rc_turn{t}_reward_mean"] = float(rewards[:, t].mean())
        return state, m

    def grade_turns(self, state: rcs.RCState) -> np.ndarray:
        """Each turn's own proof graded against the original problem (docs/recipe.md §4: logged, not trained on)."""
        outs, lens, stopped = np.asarray(state.outputs), np.asarray(state.lengths), np.asarray(state.stopped)
        items = []
        for i, pos in enumerate(np.asarray(state.problem).tolist()):
            for t in range(lens.shape[1]):
                ids = outs[i, t, :lens[i, t]].tolist()
                c = Completion(token_ids=ids, logprobs=[0.0] * len(ids),
                               finish_reason="stop" if stopped[i, t] else "length", text="",
                               weight_version=self.rollout.weight_version, prompt_tokens=0)
                items.append((self.graded_prompt(pos, ()), c, pipeline.completion_text(self.tokenizer, c)))
        results = self.reward_fn(items)
        return np.asarray([r.reward for r in results], np.float32).reshape(lens.shape)

    def graded_prompt(self, pos: int, ids) -> rl_data.RLPrompt:
        """A training prompt whose grading problem is the ORIGINAL problem text (not the summary-conditioned
        prompt it was sampled from)."""
        p = self.prompts[pos]
        return dataclasses.replace(p, problem=self.originals[pos], ids=tuple(ids))

    def state_prompts(self, state: rcs.RCState, step: int) -> tuple[list[rl_data.RLPrompt], list[dict]]:
        """The k sampled states of every problem as training prompts (reasoning prompt ids), and a log record per
        problem."""
        import jax.numpy as jnp
        rc = self.cfg.rc
        positions = np.asarray(state.problem).tolist()
        problem_bp, problem_len_b = self.problems(positions)
        hist, hlen = np.asarray(state.history), np.asarray(state.history_len)
        out, records = [], []
        for i, pos in enumerate(positions):
            chosen = rcs.sample_states(rc.seed, step, self.prompts[pos].index, rc.cycles + 1, rc.states_sampled)
            ids, n = cycle.reasoning_prompt(self.tpl, jnp.asarray(problem_bp[[i] * len(chosen)]),
                                            jnp.asarray(problem_len_b[[i] * len(chosen)]),
                                            jnp.asarray(hist[i, chosen]), jnp.asarray(hlen[i, chosen]))
            ids, n = np.asarray(ids), np.asarray(n)
            out += [self.graded_prompt(pos, ids[j, :n[j]].tolist()) for j in range(len(chosen))]
            records.append({"step": step + 1, "problem": self.prompts[pos].index, "states": chosen,
                            "summaries": [rcp.decode(self.tokenizer, hist[i, j, :hlen[i, j]].tolist())
                                          for j in range(hist.shape[1])],
                            "turn_lengths": np.asarray(state.lengths[i]).tolist(),
                            "turn_rewards": [None if np.isnan(x) else float(x)
                                             for x in np.asarray(state.rewards[i])]})
        return out, records


def run(cfg: Config, log: Callable[[str], None] = print, *, reward_fn: pipeline.RewardFn | None = None) -> dict:
    """Train (or resume) stage 3 per `cfg` (see module doc). `reward_fn` replaces the configured grader (tests).
    Returns {start_step, steps, metrics: {step: {...}}, run_dir, counters, state, records}."""
    problems_per_step = check_config(cfg)
    inputs = loop.load_inputs(cfg, log)  # checked before the run dir is touched
    with driver.Run(cfg, "rc", log) as run:
        return _run(cfg, run, reward_fn, problems_per_step, inputs)


def _run(cfg: Config, run: driver.Run, reward_fn, problems_per_step: int, inputs) -> dict:
    from qednano_jax.rollout import make_rollout

    tc, rl, rc, run_dir, log = cfg.train, cfg.rl, cfg.rc, run.run_dir, run.log
    trainer = run.closing(RLTrainer(cfg, log=log))
    model_cfg = trainer.model_cfg
    if jax.process_index() != 0:  # multi-host: process 0 runs the RC actor and the rollouts (rl.loop.follow)
        trainer.init_or_restore()
        return loop.follow(cfg, trainer, run)
    tokenizer, prompts, data_stats = inputs
    (run_dir / "data_stats.json").write_text(json.dumps(dataclasses.asdict(data_stats), indent=1))

    data_state, extra = trainer.init_or_restore()
    start = trainer.version
    counters = collections.Counter(extra.get("counters", {}))
    log(f"model: {qwen3.count_params(trainer.state.params):,} params; mesh {dict(trainer.mesh.shape)}; "
        f"{jax.device_count()} devices; {problems_per_step} problems x {rc.states_sampled} of {rc.cycles + 1} RC "
        f"states x {rl.group_size} rollouts per step")

    grader = None
    if reward_fn is None:
        reward_fn, grader = loop.make_reward_fn(cfg, model_cfg, tokenizer, log)
        if "grader_stats" in extra:
            grader.stats = GraderStats(**extra["grader_stats"])
    placed, r_mesh, r_rules = trainer.rollout_placement() if cfg.rollout.backend == "native" else (None, None, None)
    rollout = run.closing(make_rollout(cfg.rollout, model_cfg, placed, tokenizer, mesh=r_mesh, rules=r_rules,
                                       version=str(start)))
    if cfg.rollout.backend != "native":
        trainer.refit(rollout)
    if jax.process_count() > 1:  # a native summarizer lives on process 0's own devices, like the policy's engine
        r_mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.local_devices())
        r_rules = sharding.RULE_SETS["dp"]
    elif r_mesh is None:
        r_mesh, r_rules = trainer.mesh, trainer.rules
    summarizer, summarizer_tok = make_summarizer(cfg, rollout, tokenizer, r_mesh, r_rules)
    if summarizer is not rollout:
        run.closing(summarizer)
    use_jit = rc.loop == "jit" or (rc.loop == "auto" and cfg.rollout.backend == "native"
                                   and rc.summarizer in ("policy", "native"))
    actor = RCActor(cfg, rollout, summarizer, tokenizer, summarizer_tok, prompts, reward_fn, use_jit, log)
    drawable = [i for i, ok in enumerate(actor.fits) if ok]
    sampler = rl_data.PromptSampler(len(drawable), cfg.data.shuffle_seed)
    if data_state is not None:
        sampler.set_state(data_state)
    stop = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)

    def act(s: int) -> dict:
        """The RC actor of step s (0-based): its state and metrics, JSON-ready (the checkpointed buffer)."""
        positions = [drawable[i] for i in sampler.next(problems_per_step)]
        st, m = actor.run(positions, s)
        return {"step": s, "state": rcs.state_to_json(st), "metrics": m}

    buffer = extra.get("rc_buffer")
    rc_log = run.closing(paths.AppendFile(run_dir / "rc_states.jsonl"))
    history: dict[int, dict] = {}
    records: list[dict] = []
    run.begin(start)
    for s in range(start, tc.steps):
        if buffer is None or buffer["step"] != s:
            buffer = act(s)
        st = rcs.state_from_json(buffer["state"])
        state_prompts, recs = actor.state_prompts(st, s)
        pipe = pipeline.RolloutPipeline(rollout, state_prompts, reward_fn, tokenizer, rl, stop_token_ids=stop)
        try:
            batch = pipe.launch(list(range(len(state_prompts))), s).result()
        finally:
            pipe.close()
        m = dict(buffer["metrics"])
        m |= loop.rollout_metrics(batch.groups)
        m["gen_tokens_per_s"] = batch.gen_tokens / max(batch.gen_s, 1e-9)
        m |= trainer.train_on_groups(batch.groups)
        driver.check_finite(s + 1, m, trainer.ckpt.latest_step)  # before any refit or save
        m["refit_s"] = trainer.refit(rollout)
        step = s + 1
        buffer = act(step) if step < tc.steps else None   # next step's states, with the weights it trains from
        counters["steps"] += 1
        counters["completions"] += int(m["completions"])
        counters["rc_states_trained"] += len(state_prompts)
        if grader is not None:
            m |= {f"grader_total_{k}": float(v) for k, v in dataclasses.asdict(grader.stats).items()}
        history[step] = m
        records += recs
        rc_log.write("".join(json.dumps(r) + "\n" for r in recs))
        rc_log.flush()
        stopping = run.stop_requested()
        if run.log_due(step, stopping):
            run.record(step, m, loop.format_rl_metrics(step, m))
        run.progress(reward=f"{m['reward_mean']:.3f}", loss=f"{m['loss']:.4g}")
        trainer.save_step(step, sampler.state(), lambda: {
            "version": step, "counters": dict(counters), "rc_buffer": buffer,
            "data_stats": dataclasses.asdict(data_stats)}, grader=grader, force=step == tc.steps or stopping)
        if stopping:
            run.stopped(step)
            break
    run.close()
    if tc.export_hf and not run.preempted:
        sft.export_hf(cfg, model_cfg, trainer.state.params, run_dir / "hf", log)
    return {"start_step": start, "steps": tc.steps, "metrics": history, "run_dir": str(run_dir),
            "counters": dict(counters), "state": trainer.state, "records": records, "sampler": sampler.state(),
            "preempted": run.preempted}

