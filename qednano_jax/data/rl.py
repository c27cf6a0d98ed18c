"""FineProofs-RL rows -> RL prompts, and the seeded prompt sampler whose state is checkpointed (docs/recipe.md §3).

A row (`lm-provers/FineProofs-RL`: `problem`, `rubrics`, `reward_mean`, `scores`, ...) becomes an `RLPrompt`: the
user turn `"Generate a rigorous proof to the following question:\\n\\n{problem}"` (the `data.prompt_template` of
configs/rl.yaml) in the Qwen3 thinking chat format (`data.tokenizer.prompt_ids`: no system prompt, `<think>` opened),
and the marking scheme the grader sees. The released loader drops `rubrics` for this dataset (docs/recipe.md §3 "Loader
bug"); here `problem -> task` and `rubrics -> schema` are always mapped. Rows can be filtered on `reward_mean`
(the dataset's 128-rollout difficulty estimate; the paper's curriculum thresholds are unknown, docs/recipe.md §3).

`PromptSampler` draws prompts without replacement from a seeded permutation per epoch; its whole state is
`{epoch, cursor, batches}`, saved in every checkpoint, so a resumed run draws the same prompts as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import numbers
from pathlib import Path
from typing import Callable

import numpy as np

from qednano_jax.data.rows import DataError, Rows, check_mapping, load_rows
from qednano_jax.data.tokenizer import prompt_ids

SAMPLE_RL_DATA = str(Path(__file__).resolve().parent.parent / "samples" / "fineproofs_rl.jsonl")
RL_PROMPT = "Generate a rigorous proof to the following question:\n\n{problem}"  # docs/recipe.md §3 "Rollout / prompt"


@dataclasses.dataclass(frozen=True)
class RLPrompt:
    """One training prompt. `index` is the row's position in the dataset (0-based), `ids` the chat prompt tokens."""
    index: int
    problem: str
    rubric: object  # a string, or a list of {title, points, desc} checkpoints (reward.grader.format_marking_scheme)
    ids: tuple[int, ...]
    reward_mean: float | None = None
    answer: str = ""  # the reference final answer (grader.backend answer; rows with an `answer` field)


@dataclasses.dataclass
class RLDataStats:
    """What happened to the rows; logged at start and saved in the run directory."""
    rows: int = 0
    used: int = 0
    skipped_malformed: int = 0
    filtered_reward_mean: int = 0
    dropped_overlong: int = 0
    prompt_tokens_max: int = 0


def check_row(rows: Rows, i: int, need_reward_mean: bool, reference: str = "rubrics") -> dict:
    """Row i as a FineProofs-RL dict, or DataError naming its file and line (or row) and the field. `reference` is
    the field graded against: `rubrics` (a marking scheme) or `answer` (a final answer, grader.backend answer)."""
    row = check_mapping(rows, i)
    index = rows.where(i)
    p = row.get("problem")
    if not isinstance(p, str) or not p.strip():
        raise DataError(f"{index}: field 'problem' is {_what(p)}, expected a non-empty string")
    r = row.get(reference)
    if reference == "answer":
        if not isinstance(r, (str, numbers.Real)) or isinstance(r, bool) or not str(r).strip():
            raise DataError(f"{index}: field 'answer' is {_what(r)}, expected the final answer (grader.backend answer "
                            "checks proofs against it)")
        return row
    ok = (isinstance(r, str) and r.strip()) or (isinstance(r, (list, tuple)) and r
                                                 and all(isinstance(c, dict) for c in r))
    if not ok:
        raise DataError(f"{index}: field 'rubrics' is {_what(r)}, expected a marking scheme (a non-empty string "
                        "or a list of {title, points, desc})")
    m = row.get("reward_mean")
    if need_reward_mean and (not isinstance(m, numbers.Real) or isinstance(m, bool) or not np.isfinite(m)):
        raise DataError(f"{index}: field 'reward_mean' is {_what(m)}, expected a number (rl.min_reward_mean / "
                        "rl.max_reward_mean filter on it)")
    return row


def _what(v) -> str:
    if v is None:
        return "missing"
    if isinstance(v, str) and not v.strip():
        return "empty"
    return f"{type(v).__name__} {str(v)[:40]!r}"


def build_prompts(rows, tokenizer, *, template: str = RL_PROMPT, max_prompt_tokens: int | None = None,
                  min_reward_mean: float = 0.0, max_reward_mean: float = 1.0, on_malformed: str = "error",
                  reference: str = "rubrics") -> tuple[list[RLPrompt], RLDataStats]:
    """Rows -> RLPrompts. A row outside [min_reward_mean, max_reward_mean] is filtered, one whose prompt exceeds
    `max_prompt_tokens` (no room left for a completion in a packed row) is dropped; both are counted. A malformed
    row raises DataError naming it (`on_malformed="error"`) or is skipped and counted. `reference`: see
    `check_row`."""
    if "{problem}" not in template:
        raise DataError(f"data.prompt_template: {template!r} has no {{problem}} field")
    if min_reward_mean > max_reward_mean:
        raise DataError(f"rl.min_reward_mean {min_reward_mean} > rl.max_reward_mean {max_reward_mean}: no row passes")
    filtering = min_reward_mean > 0 or max_reward_mean < 1
    if not isinstance(rows, Rows):
        rows = Rows(rows, [f"row {i}" for i in range(1, len(rows) + 1)])
    stats = RLDataStats(rows=len(rows))
    out = []
    for i in range(len(rows)):
        try:
            row = check_row(rows, i, filtering, reference)
        except DataError:
            if on_malformed == "skip":
                stats.skipped_malformed += 1
                continue
            raise
        mean = row.get("reward_mean")
        mean = float(mean) if isinstance(mean, numbers.Real) and not isinstance(mean, bool) else None
        if filtering and not min_reward_mean <= mean <= max_reward_mean:
            stats.filtered_reward_mean += 1
            continue
        ids = prompt_ids(tokenizer, template.format(problem=row["problem"]))
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            stats.dropped_overlong += 1
            continue
        stats.prompt_tokens_max = max(stats.prompt_tokens_max, len(ids))
        out.append(RLPrompt(index=i, problem=row["problem"], rubric=row.get("rubrics"), ids=tuple(ids),
                            reward_mean=mean, answer=str(row.get("answer", ""))))
        stats.used += 1
    return out, stats


def load_prompts(data_cfg, rl_cfg, tokenizer, log: Callable[[str], None] = print, reference: str = "rubrics"
                 ) -> tuple[list[RLPrompt], RLDataStats]:
    """The RL prompts of a run: `data.path` (`sample` = the bundled rows, a local .jsonl/.json/.parquet file or
    folder, or a hub id such as lm-provers/FineProofs-RL), filtered per `rl`, prompts at most
    data.seq_len - rl.max_tokens tokens long; `reference` is the grader's (`Grader.reference`)."""
    path = SAMPLE_RL_DATA if data_cfg.path == "sample" else data_cfg.path
    rows = load_rows(path, name=data_cfg.name, split=data_cfg.split, key="data.path")
    if data_cfg.max_examples:
        rows = rows[: data_cfg.max_examples]
    room = data_cfg.seq_len - rl_cfg.max_tokens
    if room < 1:
        raise DataError(f"data.seq_len {data_cfg.seq_len} leaves no room for a prompt next to rl.max_tokens "
                        f"{rl_cfg.max_tokens} (a packed row holds prompt + completion; paper: 49,920 vs 49,152)")
    prompts, stats = build_prompts(rows, tokenizer, template=data_cfg.prompt_template, max_prompt_tokens=room,
                                   min_reward_mean=rl_cfg.min_reward_mean, max_reward_mean=rl_cfg.max_reward_mean,
                                   on_malformed=data_cfg.on_malformed, reference=reference)
    counts = (f"{stats.rows} rows of {path} -> {stats.used} prompts (longest {stats.prompt_tokens_max} tokens); "
              f"reward_mean outside [{rl_cfg.min_reward_mean}, {rl_cfg.max_reward_mean}]: {stats.filtered_reward_mean}; "
              f"prompt over {room} tokens (data.seq_len - rl.max_tokens): {stats.dropped_overlong}; malformed "
              f"skipped: {stats.skipped_malformed}")
    log(f"rl data: {counts}")
    if not prompts:
        raise DataError(f"no usable RL prompt: {counts}")
    return prompts, stats


class PromptSampler:
    """Prompts without replacement from a seeded per-epoch permutation; `state()` / `set_state()` for checkpoints.

    A batch that runs past the end of an epoch continues into the next epoch's permutation. `batches` counts the
    batches drawn, which also names each batch (its sampling seed derives from it).
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("PromptSampler: no prompts")
        self.n, self.seed = int(n), int(seed)
        self.epoch, self.cursor, self.batches = 0, 0, 0

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next(self, k: int) -> list[int]:
        """Positions (into the prompt list) of the next `k` prompts."""
        out: list[int] = []
        while len(out) < k:
            take = min(k - len(out), self.n - self.cursor)
            out.extend(int(i) for i in self._perm(self.epoch)[self.cursor:self.cursor + take])
            self.cursor += take
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
        self.batches += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "batches": self.batches, "n": self.n, "seed": self.seed}

    def set_state(self, state: dict) -> None:
        if int(state["n"]) != self.n or int(state["seed"]) != self.seed:
            raise DataError(f"checkpoint: the prompt sampler was saved over {state['n']} prompts with seed "
                            f"{state['seed']}, but this run has {self.n} prompts and seed {self.seed} (did data.path, "
                            "the rl.*_reward_mean filters or data.shuffle_seed change?)")
        self.epoch, self.cursor, self.batches = int(state["epoch"]), int(state["cursor"]), int(state["batches"])
