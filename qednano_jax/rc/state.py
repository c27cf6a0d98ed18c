"""The reasoning-cache state (docs/recipe.md §4): one pytree carried through the RC turns of a batch of problems.

Every array is fixed-shape, so the same carry is threaded by the jitted native-engine loop (`lax.fori_loop`) and by
the host loop over an HTTP backend (rc/cycle.py). Shapes: B problems, T reasoning turns, S summary tokens (H_S),
R reasoning tokens (H_R). Token arrays are right-padded with 0 and come with a length.

`history[:, t]` is the summary turn t started from (`history[:, 0]` = the initial summary, "" in training and
"[No previous summary]" at test time), so after T summarized turns `history` holds the T + 1 RC states
s_0 .. s_T that RC training samples k of (docs/recipe.md §4 "(b) Regular actor").
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class RCState:
    problem: jax.Array        # [B] int32: index of the problem in its data set / batch
    summary: jax.Array        # [B, S] int32: the current summary (replaced after each summarized turn)
    summary_len: jax.Array    # [B] int32
    turn: jax.Array           # [B] int32: reasoning turns done
    done: jax.Array           # [B] bool: every turn done
    rewards: jax.Array        # [B, T] float32: grade of each turn's own proof (NaN until graded on the host)
    lengths: jax.Array        # [B, T] int32: reasoning tokens generated in each turn
    stopped: jax.Array        # [B, T] bool: the turn ended on a stop token (False = cut at H_R)
    outputs: jax.Array        # [B, T, R] int32: each turn's reasoning output
    summary_tokens: jax.Array  # [B, T] int32: tokens the summarizer generated after each turn (0: not summarized)
    history: jax.Array        # [B, T + 1, S] int32: the summary each turn started from, then the last summary
    history_len: jax.Array    # [B, T + 1] int32

    @property
    def turns(self) -> int:
        return self.lengths.shape[1]


def init_state(problem_b, initial_tokens, *, turns: int, summary_width: int, reasoning_width: int) -> RCState:
    """The state before turn 0: every problem starts from `initial_tokens` (the empty-summary marker)."""
    b = len(problem_b)
    init = np.asarray(initial_tokens, np.int32)[:summary_width]
    summary = np.zeros((b, summary_width), np.int32)
    summary[:, :len(init)] = init
    summary_len = np.full((b,), len(init), np.int32)
    history = np.zeros((b, turns + 1, summary_width), np.int32)
    history[:, 0] = summary
    history_len = np.zeros((b, turns + 1), np.int32)
    history_len[:, 0] = summary_len
    return RCState(problem=jnp.asarray(problem_b, jnp.int32), summary=jnp.asarray(summary),
                   summary_len=jnp.asarray(summary_len), turn=jnp.zeros((b,), jnp.int32),
                   done=jnp.zeros((b,), bool), rewards=jnp.full((b, turns), jnp.nan, jnp.float32),
                   lengths=jnp.zeros((b, turns), jnp.int32), stopped=jnp.zeros((b, turns), bool),
                   outputs=jnp.zeros((b, turns, reasoning_width), jnp.int32),
                   summary_tokens=jnp.zeros((b, turns), jnp.int32), history=jnp.asarray(history),
                   history_len=jnp.asarray(history_len))


def transition(state: RCState, out_bn, count_b, stopped_b, summary_bs=None, summary_len_b=None,
               summary_count_b=None) -> RCState:
    """One RC turn, carry -> carry (pure; jit-safe): record the turn's reasoning output, its length and stop
    flag; with a summary (already extracted, [B, S]; `summary_count_b` = the summarizer's generated tokens),
    REPLACE the current summary by it (never append) and store it as the next state. Rows already done are left
    as they are."""
    b, t_max = state.lengths.shape
    rows = jnp.arange(b)
    live = ~state.done
    t = jnp.minimum(state.turn, t_max - 1)
    r = state.outputs.shape[2]
    out = jnp.zeros((b, r), jnp.int32).at[:, :min(r, out_bn.shape[1])].set(out_bn[:, :r].astype(jnp.int32))
    keep = lambda new, old: jnp.where(live.reshape((b,) + (1,) * (new.ndim - 1)), new, old)
    outputs = state.outputs.at[rows, t].set(keep(out, state.outputs[rows, t]))
    lengths = state.lengths.at[rows, t].set(keep(jnp.minimum(count_b, r).astype(jnp.int32), state.lengths[rows, t]))
    stopped = state.stopped.at[rows, t].set(keep(stopped_b.astype(bool), state.stopped[rows, t]))
    summary, summary_len, history, history_len = state.summary, state.summary_len, state.history, state.history_len
    summary_tokens = state.summary_tokens
    if summary_bs is not None:
        n = summary_len_b if summary_count_b is None else summary_count_b
        summary_tokens = summary_tokens.at[rows, t].set(keep(n.astype(jnp.int32), summary_tokens[rows, t]))
        summary = keep(summary_bs.astype(jnp.int32), summary)
        summary_len = keep(summary_len_b.astype(jnp.int32), summary_len)
        history = history.at[rows, t + 1].set(keep(summary, history[rows, t + 1]))
        history_len = history_len.at[rows, t + 1].set(keep(summary_len, history_len[rows, t + 1]))
    turn = state.turn + live.astype(jnp.int32)
    return state.replace(summary=summary, summary_len=summary_len, turn=turn, done=turn >= t_max,
                         lengths=lengths, stopped=stopped, outputs=outputs, summary_tokens=summary_tokens,
                         history=history, history_len=history_len)


def with_rewards(state: RCState, rewards_bt) -> RCState:
    """The per-turn grades (host side, for logging: docs/recipe.md §4 grades the RC actor's turns but does not train on
    them)."""
    return state.replace(rewards=jnp.asarray(rewards_bt, jnp.float32))


# ----------------------------------------------------------------------------------------------- emitted states

def emitted_states(state: RCState, row: int) -> list[list[int]]:
    """The T + 1 states of problem row `row`: the summary tokens each state conditions on (s_0 = the initial)."""
    hist, hlen = np.asarray(state.history[row]), np.asarray(state.history_len[row])
    return [hist[i, :hlen[i]].tolist() for i in range(hist.shape[0])]


def sample_states(seed: int, step: int, problem: int, num_states: int, k: int) -> list[int]:
    """k distinct state indices of the `num_states` of one problem, uniformly at random, sorted; a pure function
    of (seed, step, problem), so a resumed run samples the same states (docs/recipe.md §4: 2 of the 4)."""
    if not 1 <= k <= num_states:
        raise ValueError(f"rc.states_sampled: expected 1 <= k <= {num_states} states, got {k}")
    rng = np.random.default_rng([int(seed), int(step), int(problem)])
    return sorted(rng.choice(num_states, size=k, replace=False).tolist())


# ----------------------------------------------------------------------------------------------- checkpoints

def state_to_json(state: RCState) -> dict:
    """The state as JSON (checkpoint `extra`): token arrays trimmed to their lengths, NaN rewards as null."""
    hist, hlen = np.asarray(state.history), np.asarray(state.history_len)
    outs, lens = np.asarray(state.outputs), np.asarray(state.lengths)
    rewards = np.asarray(state.rewards, np.float64)
    b, t = lens.shape
    return {"widths": [int(state.summary.shape[1]), int(outs.shape[2])],
            "problem": np.asarray(state.problem).tolist(), "turn": np.asarray(state.turn).tolist(),
            "summary": [np.asarray(state.summary[i, :state.summary_len[i]]).tolist() for i in range(b)],
            "rewards": [[None if np.isnan(x) else float(x) for x in row] for row in rewards],
            "lengths": lens.tolist(), "stopped": np.asarray(state.stopped).tolist(),
            "summary_tokens": np.asarray(state.summary_tokens).tolist(),
            "outputs": [[outs[i, j, :lens[i, j]].tolist() for j in range(t)] for i in range(b)],
            "history": [[hist[i, j, :hlen[i, j]].tolist() for j in range(t + 1)] for i in range(b)]}


def state_from_json(d: dict) -> RCState:
    """Inverse of `state_to_json` (same arrays, same padding)."""
    s_w, r_w = d["widths"]
    b, t = np.asarray(d["lengths"]).reshape(len(d["problem"]), -1).shape

    def pad(rows, width):
        out = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            out[i, :len(r)] = r
        return out

    outputs = np.zeros((b, t, r_w), np.int32)
    history = np.zeros((b, t + 1, s_w), np.int32)
    for i in range(b):
        outputs[i] = pad(d["outputs"][i], r_w)
        history[i] = pad(d["history"][i], s_w)
    turn = np.asarray(d["turn"], np.int32)
    return RCState(problem=jnp.asarray(d["problem"], jnp.int32), summary=jnp.asarray(pad(d["summary"], s_w)),
                   summary_len=jnp.asarray([len(x) for x in d["summary"]], jnp.int32), turn=jnp.asarray(turn),
                   done=jnp.asarray(turn >= t),
                   rewards=jnp.asarray([[np.nan if x is None else x for x in r] for r in d["rewards"]],
                                       jnp.float32).reshape(b, t),
                   lengths=jnp.asarray(d["lengths"], jnp.int32).reshape(b, t),
                   stopped=jnp.asarray(d["stopped"], bool).reshape(b, t),
                   outputs=jnp.asarray(outputs),
                   summary_tokens=jnp.asarray(d["summary_tokens"], jnp.int32).reshape(b, t),
                   history=jnp.asarray(history),
                   history_len=jnp.asarray([[len(x) for x in row] for row in d["history"]], jnp.int32))
