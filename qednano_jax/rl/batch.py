"""RL batches: `Group` (one prompt's n completions and rewards, the unit of GRPO advantages), `Batch` (one step's
groups), staleness filtering, and packing completions into the train step's fixed-shape rows (`build_train_batch`).
Pure numpy: the RL and RC loops and the planner share it."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from qednano_jax.reward.grader import GradeResult
from qednano_jax.rl import losses
from qednano_jax.rollout.base import Completion

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "weights", "old_logprobs", "advantages")
FLOAT_KEYS = ("weights", "old_logprobs", "advantages")


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


# ----------------------------------------------------------------------------------------------- packing

def group_advantages(groups: Sequence[Group], loss_cfg) -> list[np.ndarray]:
    """GRPO advantages (rl.losses.group_advantages) of each group's completions: r - group mean (/ std)."""
    return [np.asarray(losses.group_advantages(np.asarray(g.rewards, np.float32), len(g.rewards),
                                               loss_cfg.divide_advantage_by_std, loss_cfg.advantage_eps))
            for g in groups]


def pack_groups(groups: Sequence[Group], advantages: Sequence[np.ndarray], *, seq_len: int,
                rows_multiple: int = 1, loss_tokens_per_row: int | None = None) -> dict[str, np.ndarray]:
    """Completions -> packed next-token rows [R, seq_len] (R a multiple of `rows_multiple`, at least one).

    Sequence = prompt ids + completion ids (P + C tokens) -> P + C - 1 (input, target) pairs at per-sequence
    positions 0.. and its own segment id (1, 2, ... within a row; 0 = padding). Target j of a sequence predicts
    id j + 1, so completion token k is the target at j = P - 1 + k: there `loss_mask` is 1, `old_logprobs` is the
    sampler's logprob of that token and `advantages` the completion's advantage; prompt targets and padding are 0.
    Sequences are placed first-fit in decreasing length; a row holds at most `loss_tokens_per_row` completion
    tokens (None: seq_len), so the loss can run on that many positions a row (rl.losses.rl_loss_fn). Returns numpy
    arrays: tokens, targets, positions, segment_ids (int32), loss_mask, old_logprobs, advantages (float32).
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
            if loss_tokens_per_row is not None and len(c.token_ids) > loss_tokens_per_row:
                raise ValueError(f"group {gi} completion {ci}: {len(c.token_ids)} completion tokens exceed "
                                 f"rl.loss_tokens_per_row {loss_tokens_per_row}")
            seqs.append((n, g.prompt_ids, c, float(adv[ci])))
    order = sorted(range(len(seqs)), key=lambda i: -seqs[i][0])
    free: list[int] = []
    place: dict[int, tuple[int, int, int]] = {}  # seq -> (row, offset, segment id)
    nseg: list[int] = []
    room: list[int] = []  # completion tokens a row may still take
    cap = seq_len if loss_tokens_per_row is None else loss_tokens_per_row
    for i in order:
        n, c = seqs[i][0], len(seqs[i][2].token_ids)
        row = next((r for r, (f, k) in enumerate(zip(free, room)) if f >= n and k >= c), None)
        if row is None:
            row = len(free)
            free.append(seq_len)
            room.append(cap)
            nseg.append(0)
        nseg[row] += 1
        place[i] = (row, seq_len - free[row], nseg[row])
        free[row] -= n
        room[row] -= c
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


def loss_tokens_per_row(cfg) -> int:
    """The completion tokens one packed row may hold (rl.loss_tokens_per_row, 0 = min(data.seq_len, 2 x
    rl.max_tokens)): the positions a row's loss and LM head run on (rl.losses.rl_loss_fn)."""
    return min(cfg.data.seq_len, cfg.rl.loss_tokens_per_row or 2 * cfg.rl.max_tokens)


def max_micro_batches(samples_per_step: int, micro_batch_rows: int) -> int:
    """The fixed micro-batch count of every RL step: the packing's worst case (one completion per row)."""
    return -(-samples_per_step // micro_batch_rows)


def build_train_batch(groups: Sequence[Group], loss_cfg, *, seq_len: int, micro_batch_rows: int,
                      samples_per_step: int, loss_tokens_per_row: int | None = None) -> tuple[dict, dict]:
    """Groups -> the train step's input: {BATCH_KEYS: [M, micro_batch_rows, seq_len], valid: [M], denominator}
    (numpy) and packing stats. M is always `max_micro_batches` (one compiled step whatever the packing gives): the
    micro-batches after the packed ones are zero rows with valid 0, which the step skips. Token weights and the
    step denominator follow `loss_cfg.aggregation` (rl.losses); the constant of token-sum-constant is
    `aggregation_constant`, or `samples_per_step` (docs/recipe.md §3: 64 x 16 = 1024)."""
    adv = group_advantages(groups, loss_cfg)
    packed = pack_groups(groups, adv, seq_len=seq_len, rows_multiple=micro_batch_rows,
                         loss_tokens_per_row=loss_tokens_per_row)
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
