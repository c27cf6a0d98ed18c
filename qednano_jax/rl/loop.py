"""Stage 2: GRPO-style RL with rubric rewards (SPEC.md §3), a thin loop around pure pieces (DESIGN.md picture).

    sample prompts -> rollouts (Rollout backend) -> grade (Grader, or any RewardFn) -> group advantages
      -> pack completions into rows -> accumulated train step (train/step.py) -> refit the rollout backend -> checkpoint

Pieces the RC stage (SPEC.md §4) reuses as they are:
- `Group` (prompt ids + n completions + rewards) and `grader_reward_fn(grader)` (a `RewardFn`);
- `pack_groups` / `build_train_batch`: completions -> fixed-length rows with segment ids, loss only on completion
  tokens, behaviour logprobs and advantages on the token that each predicts;
- `RLTrainer`: the train state, the jitted step with the RL loss, `train_on_groups(groups)`, `refit(rollout)`,
  `save`/`restore` through train/checkpoint.py;
- `RolloutPipeline`: batches generated (and graded) in a background thread, `max_lag` batches ahead.

Overlap. Each generate call (`rl.prompts_per_call` prompts) is graded in a thread pool as soon as it returns, while
the next call generates. With `rl.max_lag = L > 0` the rollouts of step s+L are generated and graded in the
background while step s trains, with the weights of step s; before each refit the loop waits for them, so every
batch's weight version is fixed by the schedule and a resumed run continues exactly as an uninterrupted one. A group
whose completions report a weight version more than L behind the trainer (e.g. a generator that was not refitted)
is discarded and counted (`stale_groups`).

Resume (DESIGN.md principle 4): a checkpoint holds the train state (params, optimizer, step = weight version, rng),
the prompt sampler state, the rollouts already generated for later steps (with their grades), and the counters.
Re-running the same command continues from the newest complete checkpoint and refits the rollout backend first.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import math
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qednano_jax import paths, sharding
from qednano_jax.config import Config, ConfigError, ModelConfig
from qednano_jax.data import rl as rl_data
from qednano_jax.model import qwen3
from qednano_jax.reward.grader import GradeResult, Grader, GraderStats, MAX_SCORE
from qednano_jax.rl import losses
from qednano_jax.rollout.base import Completion, SamplingParams
from qednano_jax.train import checkpoint as ckpt_lib
from qednano_jax.train import driver
from qednano_jax.train import metrics as metrics_lib
from qednano_jax.train import optim, sft, step as step_lib

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "weights", "old_logprobs", "advantages")

# reward_fn(items) -> one GradeResult per (prompt, completion, completion text with special tokens kept)
RewardFn = Callable[[list[tuple[rl_data.RLPrompt, Completion, str]]], list[GradeResult]]


# ----------------------------------------------------------------------------------------------- groups

@dataclasses.dataclass
class Group:
    """The n completions of one prompt and their rewards (the unit of GRPO advantages). `grades` (optional) keep
    the grader's details for metrics; `prompt_pos` is the prompt's position in the run's prompt list."""
    prompt_ids: list[int]
    completions: list[Completion]
    rewards: list[float]
    grades: list[GradeResult] = dataclasses.field(default_factory=list)
    prompt_pos: int = -1

    def __post_init__(self):
        if len(self.rewards) != len(self.completions):
            raise ValueError(f"Group: {len(self.completions)} completions but {len(self.rewards)} rewards")

    def to_json(self) -> dict:
        return {"prompt_ids": list(self.prompt_ids), "prompt_pos": self.prompt_pos, "rewards": list(self.rewards),
                "completions": [dataclasses.asdict(c) for c in self.completions],
                "grades": [dataclasses.asdict(g) for g in self.grades]}

    @classmethod
    def from_json(cls, d: dict) -> "Group":
        return cls(prompt_ids=list(d["prompt_ids"]), completions=[Completion(**c) for c in d["completions"]],
                   rewards=[float(r) for r in d["rewards"]], grades=[GradeResult(**g) for g in d["grades"]],
                   prompt_pos=int(d["prompt_pos"]))


@dataclasses.dataclass
class Batch:
    """One step's rollouts: batch `index` (its sampling seeds derive from it), the groups, generation timing."""
    index: int
    groups: list[Group]
    gen_s: float = 0.0
    gen_tokens: int = 0

    def to_json(self) -> dict:
        return {"index": self.index, "gen_s": self.gen_s, "gen_tokens": self.gen_tokens,
                "groups": [g.to_json() for g in self.groups]}

    @classmethod
    def from_json(cls, d: dict) -> "Batch":
        return cls(index=int(d["index"]), groups=[Group.from_json(g) for g in d["groups"]], gen_s=float(d["gen_s"]),
                   gen_tokens=int(d["gen_tokens"]))


def weight_lag(completion: Completion, trainer_version: int) -> float:
    """How many optimizer steps behind the trainer the completion's weights are (inf: unknown version)."""
    try:
        return trainer_version - int(completion.weight_version)
    except (TypeError, ValueError):
        return math.inf


def filter_stale(groups: Sequence[Group], trainer_version: int, max_lag: int) -> tuple[list[Group], int]:
    """(groups whose every completion is at most `max_lag` versions behind, number of groups discarded)."""
    kept = [g for g in groups if all(weight_lag(c, trainer_version) <= max_lag for c in g.completions)]
    return kept, len(groups) - len(kept)


def completion_text(tokenizer, c: Completion) -> str:
    """The completion as text with special tokens kept (a tiny tokenizer may mark `</think>` special, and the proof
    is what follows the last `</think>`)."""
    return tokenizer.decode(c.token_ids, skip_special_tokens=False)


def grader_reward_fn(grader: Grader) -> RewardFn:
    """The paper's reward (SPEC.md §3): proof = text after the last `</think>`, graded against the prompt's marking
    scheme; reward = score / 7, and 0 for an empty proof or any grader fault (counted in `grader.stats`)."""
    def reward(items):
        return grader.grade_many([(p.problem, p.rubric, grader.proof_of(text)) for p, _, text in items])
    return reward


# ----------------------------------------------------------------------------------------------- packing

def group_advantages(groups: Sequence[Group], loss_cfg) -> list[np.ndarray]:
    """GRPO advantages (rl.losses.group_advantages) of each group's completions: r - group mean (/ std)."""
    return [np.asarray(losses.group_advantages(np.asarray(g.rewards, np.float32), len(g.rewards),
                                               loss_cfg.divide_advantage_by_std, loss_cfg.advantage_eps))
            for g in groups]


def pack_groups(groups: Sequence[Group], advantages: Sequence[np.ndarray], *, seq_len: int,
                rows_multiple: int = 1) -> dict[str, np.ndarray]:
    """Completions -> packed next-token rows [R, seq_len] (R a multiple of `rows_multiple`, at least one).

    Sequence = prompt ids + completion ids (P + C tokens) -> P + C - 1 (input, target) pairs at per-sequence
    positions 0.. and its own segment id (1, 2, ... within a row; 0 = padding). Target j of a sequence predicts
    id j + 1, so completion token k is the target at j = P - 1 + k: there `loss_mask` is 1, `old_logprobs` is the
    sampler's logprob of that token and `advantages` the completion's advantage; prompt targets and padding are 0.
    Sequences are placed first-fit in decreasing length. Returns numpy arrays: tokens, targets, positions,
    segment_ids (int32), loss_mask, old_logprobs, advantages (float32).
    """
    seqs = []
    for gi, (g, adv) in enumerate(zip(groups, advantages)):
        for ci, c in enumerate(g.completions):
            if not c.token_ids:
                continue
            n = len(g.prompt_ids) + len(c.token_ids) - 1
            if n > seq_len:
                raise ValueError(f"group {gi} completion {ci}: prompt {len(g.prompt_ids)} + completion "
                                 f"{len(c.token_ids)} tokens do not fit a packed row of data.seq_len {seq_len}")
            seqs.append((n, g.prompt_ids, c, float(adv[ci])))
    order = sorted(range(len(seqs)), key=lambda i: -seqs[i][0])
    free: list[int] = []
    place: dict[int, tuple[int, int, int]] = {}  # seq -> (row, offset, segment id)
    nseg: list[int] = []
    for i in order:
        n = seqs[i][0]
        row = next((r for r, f in enumerate(free) if f >= n), None)
        if row is None:
            row = len(free)
            free.append(seq_len)
            nseg.append(0)
        nseg[row] += 1
        place[i] = (row, seq_len - free[row], nseg[row])
        free[row] -= n
    rows = max(len(free), 1)
    rows = -(-rows // rows_multiple) * rows_multiple
    out = {k: np.zeros((rows, seq_len), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    out |= {k: np.zeros((rows, seq_len), np.float32) for k in ("loss_mask", "old_logprobs", "advantages")}
    for i, (n, prompt, c, adv) in enumerate(seqs):
        row, off, seg = place[i]
        ids = np.asarray(list(prompt) + list(c.token_ids), np.int32)
        p = len(prompt)
        sl = slice(off, off + n)
        out["tokens"][row, sl] = ids[:-1]
        out["targets"][row, sl] = ids[1:]
        out["positions"][row, sl] = np.arange(n)
        out["segment_ids"][row, sl] = seg
        comp = slice(off + p - 1, off + n)
        out["loss_mask"][row, comp] = 1.0
        out["old_logprobs"][row, comp] = np.asarray(c.logprobs, np.float32)
        out["advantages"][row, comp] = adv
    return out


def max_micro_batches(samples_per_step: int, micro_batch_rows: int) -> int:
    """The fixed micro-batch count of every RL step: the packing's worst case (one completion per row)."""
    return -(-samples_per_step // micro_batch_rows)


def build_train_batch(groups: Sequence[Group], loss_cfg, *, seq_len: int, micro_batch_rows: int,
                      samples_per_step: int) -> tuple[dict, dict]:
    """Groups -> the train step's input: {BATCH_KEYS: [M, micro_batch_rows, seq_len], valid: [M], denominator}
    (numpy) and packing stats. M is always `max_micro_batches` (one compiled step whatever the packing gives): the
    micro-batches after the packed ones are zero rows with valid 0, which the step skips. Token weights and the
    step denominator follow `loss_cfg.aggregation` (rl.losses); the constant of token-sum-constant is
    `aggregation_constant`, or `samples_per_step` (SPEC.md §3: 64 x 16 = 1024)."""
    adv = group_advantages(groups, loss_cfg)
    packed = pack_groups(groups, adv, seq_len=seq_len, rows_multiple=micro_batch_rows)
    weights = losses.token_weights(packed["loss_mask"], packed["segment_ids"], loss_cfg.aggregation)
    constant = loss_cfg.aggregation_constant or float(samples_per_step)
    denom = losses.denominator(loss_cfg.aggregation, packed["loss_mask"], packed["segment_ids"], constant)
    rows = packed["tokens"].shape[0]
    m = rows // micro_batch_rows
    m_max = max(max_micro_batches(samples_per_step, micro_batch_rows), 1)
    if m > m_max:
        raise ValueError(f"{m} micro-batches packed, more than the {m_max} of {samples_per_step} samples per step")
    pad = lambda x: np.concatenate([x, np.zeros(((m_max - m) * micro_batch_rows, seq_len), x.dtype)])
    batch = {k: pad(weights if k == "weights" else packed[k]).reshape(m_max, micro_batch_rows, seq_len)
             for k in BATCH_KEYS}
    batch["valid"] = (np.arange(m_max) < m).astype(np.int32)
    batch["denominator"] = np.float32(denom)
    stats = {"rows": rows, "micro_batches": m, "tokens": float((packed["segment_ids"] > 0).sum()),
             "completion_tokens": float(packed["loss_mask"].sum()), "fill": float((packed["segment_ids"] > 0).mean())}
    return batch, stats


# ----------------------------------------------------------------------------------------------- the trainer

def rl_loss_fn(loss_cfg, temperature: float) -> step_lib.LossFn:
    """loss_fn(model_cfg, params, micro_batch) for train/step.py: trainer logprobs of logits / temperature (so they
    compare with the sampler's), entropy of that distribution, and `rl.losses.rl_loss` with the packed weights."""
    def loss_fn(model_cfg: ModelConfig, params, mb: dict):
        h = qwen3.hidden_states(model_cfg, params, mb["tokens"], positions=mb["positions"],
                                segment_ids=mb["segment_ids"])
        lp_bt, ent_bt = qwen3.token_logprobs(model_cfg, params, h, mb["targets"], temperature=temperature,
                                             with_entropy=True)
        return losses.rl_loss(loss_cfg.policy_loss, lp_bt, mb["old_logprobs"], mb["advantages"], mb["weights"],
                              loss_cfg, entropy_bt=ent_bt)
    return loss_fn


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
        if cfg.rl.loss.kl_coef:
            raise ConfigError("rl.loss.kl_coef: the RL loop keeps no reference model (SPEC.md §3: kl_coef 0)")
        self.step_fn = step_lib.make_train_step(self.model_cfg, rl_loss_fn(cfg.rl.loss, cfg.rl.temperature),
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
                                 samples_per_step=rl.prompts_per_step * rl.group_size)

    def empty_batch(self) -> dict:
        """Zeros shaped and typed like every `host_batch` (what the other hosts pass to the broadcast)."""
        rl = self.cfg.rl
        m = max(max_micro_batches(rl.prompts_per_step * rl.group_size, rl.micro_batch_rows), 1)
        shape = (m, rl.micro_batch_rows, self.cfg.data.seq_len)
        floats = ("weights", "old_logprobs", "advantages")
        out = {k: np.zeros(shape, np.float32 if k in floats else np.int32) for k in BATCH_KEYS}
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


# ----------------------------------------------------------------------------------------------- rollout pipeline

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


def follow(cfg: Config, trainer: RLTrainer, log: Callable[[str], None]) -> dict:
    """The loop of processes 1..n-1 of a multi-host RL or RC run (DESIGN.md principle 6: multi-controller JAX).

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
    preempted = False
    try:
        with driver.Preemption() as preemption:
            for s in range(start, tc.steps):
                m = trainer.train_on_batch(None)
                driver.check_finite(s + 1, m, trainer.ckpt.latest_step)
                trainer.refit(None)
                step = s + 1
                preempted = preemption.requested()
                trainer.save_step(step, None, dict, force=step == tc.steps or preempted)
                if preempted:
                    break
    finally:
        trainer.close()
    if tc.export_hf and not preempted:
        sft.export_hf(cfg, trainer.model_cfg, trainer.state.params, paths.resolve(tc.run_dir) / "hf", log)
    return {"start_step": start, "steps": tc.steps, "metrics": {}, "state": trainer.state, "preempted": preempted}


def run(cfg: Config, log: Callable[[str], None] = print, *, reward_fn: RewardFn | None = None) -> dict:
    """Train (or resume) stage 2 per `cfg`. `reward_fn` replaces the configured grader (e.g. a programmatic reward
    in tests). Returns {start_step, steps, metrics: {step: {...}}, run_dir, counters, state}."""
    if cfg.stage != "rl":
        raise ConfigError(f"stage: the RL loop got stage {cfg.stage!r}")
    run_dir = paths.resolve(cfg.train.run_dir)
    lock = driver.open_run(cfg, driver.has_checkpoint(run_dir), is_main=jax.process_index() == 0)
    try:
        return _run(cfg, log, reward_fn, run_dir)
    finally:
        lock.release()


def _run(cfg: Config, log: Callable[[str], None], reward_fn: RewardFn | None, run_dir) -> dict:
    from qednano_jax.data.tokenizer import load_tokenizer
    from qednano_jax.rollout import make_rollout

    tc, rl = cfg.train, cfg.rl
    trainer = RLTrainer(cfg, log=log)
    model_cfg = trainer.model_cfg
    if jax.process_index() != 0:
        trainer.init_or_restore()
        return follow(cfg, trainer, log)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except Exception as e:
        raise ConfigError(f"data.tokenizer: cannot load {cfg.data.tokenizer!r}: {e}") from None
    if len(tokenizer) > model_cfg.vocab_size:
        raise ConfigError(f"data.tokenizer: {len(tokenizer)} tokens but the model's vocabulary has "
                          f"{model_cfg.vocab_size} rows")
    prompts, data_stats = rl_data.load_prompts(cfg.data, rl, tokenizer, log=log)
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
    rollout = make_rollout(cfg.rollout, model_cfg, placed, tokenizer, mesh=r_mesh, rules=r_rules, version=str(start))
    if cfg.rollout.backend != "native":  # the servers hold weights of unknown age: push ours first
        t0 = time.perf_counter()
        trainer.refit(rollout)
        log(f"rollout servers refitted to weight version {start} ({time.perf_counter() - t0:.1f}s)")
    stop = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
    pipe = RolloutPipeline(rollout, prompts, reward_fn, tokenizer, rl, stop_token_ids=stop)
    buffer: collections.deque = collections.deque(_done(Batch.from_json(b)) for b in extra.get("buffer", []))

    writer = metrics_lib.MetricsWriter(run_dir, start_step=start)
    bar = None
    if tc.progress:
        from tqdm import tqdm
        bar = tqdm(total=tc.steps, initial=start, desc="rl", unit="step", dynamic_ncols=True)
    log_fn = bar.write if bar is not None else log
    history: dict[int, dict] = {}
    preempted = False

    def launch() -> concurrent.futures.Future:
        positions = sampler.next(rl.prompts_per_step)
        return pipe.launch(positions, sampler.batches - 1)

    try:
        with driver.Preemption() as preemption:
            for s in range(start, tc.steps):
                while len(buffer) < rl.max_lag + 1:
                    buffer.append(launch())
                batch = buffer.popleft().result()
                groups, stale = filter_stale(batch.groups, s, rl.max_lag)
                while not groups:  # every group too old (a generator missed refits): sample afresh, current weights
                    counters["stale_groups"] += stale
                    log_fn(f"step {s + 1}: all {stale} groups of batch {batch.index} were stale; generating a new "
                           "batch")
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
                if step % tc.log_every == 0 or step == tc.steps:
                    writer.write(step, m)
                    log_fn(format_rl_metrics(step, m))
                if bar is not None:
                    bar.set_postfix(reward=f"{m['reward_mean']:.3f}", loss=f"{m['loss']:.4g}")
                    bar.update(1)
                preempted = preemption.requested()
                trainer.save_step(step, sampler.state(), lambda: {
                    "version": step, "counters": dict(counters), "buffer": [f.result().to_json() for f in buffer],
                    "data_stats": dataclasses.asdict(data_stats)}, grader=grader, force=step == tc.steps or preempted)
                if preempted:
                    log_fn(driver.resume_message(step, preemption.signal))
                    break
    finally:
        pipe.close()
        if bar is not None:
            bar.close()
        trainer.close()
        writer.close()
        if hasattr(rollout, "close"):
            rollout.close()
    if tc.export_hf and not preempted:
        sft.export_hf(cfg, model_cfg, trainer.state.params, run_dir / "hf", log)
    return {"start_step": start, "steps": tc.steps, "metrics": history, "run_dir": str(run_dir),
            "counters": dict(counters), "state": trainer.state, "sampler": sampler.state(), "preempted": preempted}
