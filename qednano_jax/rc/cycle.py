"""RC cycles on token arrays (docs/recipe.md §4): one turn = reason from (problem, summary), take the thinking, summarize it
into a new summary that replaces the old one. Written once on fixed-shape jnp arrays, and run two ways:

    rc_loop_jit   the whole multi-turn loop over a batch as ONE jitted program: `lax.fori_loop` over the turns,
                  calling the native engine's jitted `generate_tokens` for the policy and the summarizer
    rc_loop_host  the same `rc_turn` threaded on the host, each generation a `Rollout.generate` call (any backend:
                  native, SGLang, `python -m qednano_jax.serve`)

Both build every prompt by concatenating token pieces: the chat-wrapped prompt templates are split at their fields
and tokenized once on the host (`RCTemplates`), the problem is tokenized once, and the summary and thinking are
the models' own tokens (never re-tokenized text). So for the same greedy model the two loops give the same states.

Thinking = the reasoning output before its first `</think>` (the whole output when the thinking was cut off);
summary = the summarizer output after its last `</think>` (all of it for a non-thinking summarizer); both without
chat control tokens and without leading/trailing whitespace tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qednano_jax.rc import prompts as rcp
from qednano_jax.rc.state import RCState, transition
from qednano_jax.rollout.base import SamplingParams

_SENTINELS = ("\x00P\x00", "\x00S\x00", "\x00R\x00")  # stand-ins for {problem}, {summary}, {reasoning}
_SPACES = ("\n", "\n\n", "\n\n\n", " ", "  ")


# ----------------------------------------------------------------------------------------------- templates

@flax.struct.dataclass
class RCTemplates:
    """The fixed token pieces of the two prompts (chat template included), pre-tokenized on the host.

    solve     = [before {problem}, between {problem} and {summary}, after {summary} up to the opened <think>]
    summarize = [before {problem}, before {existing_summary}, before {reasoning}, after {reasoning}]
    """
    solve: tuple
    summarize: tuple
    drop_ids: jax.Array      # chat control tokens dropped from thinking and summaries
    space_ids: jax.Array     # whitespace-only tokens stripped from both ends
    think_close: int = flax.struct.field(pytree_node=False)


def _pieces(tokenizer: Any, user_template: str, names: tuple[str, ...], thinking: bool = True) -> tuple:
    from qednano_jax.data.tokenizer import prompt_text
    text = prompt_text(tokenizer, user_template.format(**dict(zip(names, _SENTINELS))), thinking)
    parts = [text]
    for s in _SENTINELS[:len(names)]:
        head, sep, tail = parts[-1].partition(s)
        if not sep:
            raise ValueError(f"RC prompt template: the chat template dropped the field marker for {names}")
        parts[-1:] = [head, tail]
    return tuple(jnp.asarray(tokenizer(p, add_special_tokens=False)["input_ids"], jnp.int32) for p in parts)


def _single_ids(tokenizer: Any, texts) -> list[int]:
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            out.append(ids[0])
    return sorted(set(out))


def make_templates(tokenizer: Any, summarizer_tokenizer: Any = None, *, step_by_step: bool = False,
                   solve_template: str = rcp.SOLVE_PROMPT, summary_template: str = rcp.SUMMARY_PROMPT) -> RCTemplates:
    """Token pieces of the solve template (rc/prompts.py; + the training-time "step by step" line when
    `step_by_step`) in the policy's thinking chat format, and of the summary template in the summarizer's chat
    template with thinking disabled (the recipe's summarizer is the non-thinking Qwen3-4B-Instruct-2507, and a
    policy that summarizes itself is prompted the same way). Policy and summarizer must share one vocabulary, since
    summary tokens flow from one to the other (Qwen3-4B-Instruct-2507 and the Thinking policy do)."""
    stok = summarizer_tokenizer or tokenizer
    if stok is not tokenizer and stok.get_vocab() != tokenizer.get_vocab():
        raise ValueError("rc summarizer tokenizer: its vocabulary differs from the policy's; summaries are passed "
                         "as tokens, so both must share one vocabulary")
    solve = solve_template + (rcp.STEP_BY_STEP if step_by_step else "")
    close = tokenizer.convert_tokens_to_ids(rcp.THINK_CLOSE)
    if close is None or close == tokenizer.unk_token_id:
        raise ValueError(f"rc: the tokenizer has no single {rcp.THINK_CLOSE} token")
    drop = [i for i in tokenizer.convert_tokens_to_ids(list(rcp._CHAT_TOKENS)) if i is not None]
    return RCTemplates(solve=_pieces(tokenizer, solve, ("problem", "summary")),
                       summarize=_pieces(stok, summary_template, rcp.SUMMARY_FIELDS, thinking=False),
                       drop_ids=jnp.asarray(sorted(set(drop)), jnp.int32),
                       space_ids=jnp.asarray(_single_ids(tokenizer, _SPACES), jnp.int32), think_close=int(close))


def tokenize_texts(tokenizer: Any, texts: list[str], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Texts -> right-padded int32 [B, width] and lengths [B] (no special tokens added). A text longer than
    `width` is an error naming its row (a problem is never silently cut)."""
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    w = max([len(x) for x in ids] + [1]) if width is None else width
    out = np.zeros((len(ids), w), np.int32)
    for i, x in enumerate(ids):
        if len(x) > w:
            raise ValueError(f"rc: text {i} has {len(x)} tokens, more than the {w} allowed")
        out[i, :len(x)] = x
    return out, np.asarray([len(x) for x in ids], np.int32)


# ----------------------------------------------------------------------------------------------- token helpers

def _member(tokens, ids):
    return jnp.any(tokens[..., None] == ids, axis=-1) if ids.shape[0] else jnp.zeros(tokens.shape, bool)


def span(tokens_bn, start_b, end_b, drop_ids, space_ids, width: int):
    """tokens[start:end] of each row without `drop_ids`, whitespace tokens stripped at both ends, packed to the
    left of a [B, width] array (cut at width). Returns (tokens [B, width], lengths [B])."""
    b, n = tokens_bn.shape
    pos = jnp.arange(n)[None, :]
    keep = (pos >= start_b[:, None]) & (pos < end_b[:, None]) & ~_member(tokens_bn, drop_ids)
    solid = keep & ~_member(tokens_bn, space_ids)
    first = jnp.argmax(solid, axis=1)
    last = n - 1 - jnp.argmax(solid[:, ::-1], axis=1)
    keep = keep & (pos >= first[:, None]) & (pos <= last[:, None]) & jnp.any(solid, axis=1)[:, None]
    dest = jnp.cumsum(keep, axis=1) - 1
    dest = jnp.where(keep & (dest < width), dest, width)
    out = jnp.zeros((b, width), jnp.int32).at[jnp.arange(b)[:, None], dest].set(tokens_bn.astype(jnp.int32),
                                                                                 mode="drop")
    return out, jnp.minimum(jnp.sum(keep, axis=1), width).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("width",))
def thinking(tpl: RCTemplates, out_bn, count_b, width: int | None = None):
    """The reasoning before the first `</think>` of each row; the whole output when it never closed (truncated)."""
    n = out_bn.shape[1]
    pos = jnp.arange(n)[None, :]
    hit = (out_bn == tpl.think_close) & (pos < count_b[:, None])
    end = jnp.where(jnp.any(hit, axis=1), jnp.argmax(hit, axis=1), count_b)
    return span(out_bn, jnp.zeros_like(count_b), end, tpl.drop_ids, tpl.space_ids, width or n)


@functools.partial(jax.jit, static_argnames=("width",))
def summary_of(tpl: RCTemplates, out_bn, count_b, width: int):
    """The summarizer's summary: its output after the last `</think>`, or all of it (non-thinking summarizer)."""
    n = out_bn.shape[1]
    pos = jnp.arange(n)[None, :]
    hit = (out_bn == tpl.think_close) & (pos < count_b[:, None])
    start = jnp.where(jnp.any(hit, axis=1), n - jnp.argmax(hit[:, ::-1], axis=1), 0)
    return span(out_bn, start, count_b, tpl.drop_ids, tpl.space_ids, width)


def concat(*segments):
    """Concatenate (tokens [B, n_i] or [n_i], lengths [B] or None = all n_i) row by row: each row's real tokens
    follow each other, right-padded. Returns (tokens [B, sum n_i], lengths [B])."""
    b = next(t.shape[0] for t, _ in segments if t.ndim == 2)
    total = sum(t.shape[-1] for t, _ in segments)
    out = jnp.zeros((b, total), jnp.int32)
    off = jnp.zeros((b,), jnp.int32)
    rows = jnp.arange(b)[:, None]
    for tok, ln in segments:
        n = tok.shape[-1]
        tok = jnp.broadcast_to(tok, (b, n)).astype(jnp.int32)
        ln = jnp.full((b,), n, jnp.int32) if ln is None else ln.astype(jnp.int32)
        pos = jnp.arange(n)[None, :]
        dest = jnp.where(pos < ln[:, None], off[:, None] + pos, total)
        out = out.at[rows, dest].set(tok, mode="drop")
        off = off + ln
    return out, off


@jax.jit
def reasoning_prompt(tpl: RCTemplates, problem_bp, problem_len_b, summary_bs, summary_len_b):
    """REASONING_PROMPT(problem, summary) as chat tokens [B, width] + lengths."""
    a, b, c = tpl.solve
    return concat((a, None), (problem_bp, problem_len_b), (b, None), (summary_bs, summary_len_b), (c, None))


@jax.jit
def summary_prompt(tpl: RCTemplates, problem_bp, problem_len_b, summary_bs, summary_len_b, think_br, think_len_b):
    """SUMMARY_PROMPT(problem, existing summary, latest thinking) as chat tokens [B, width] + lengths."""
    a, b, c, d = tpl.summarize
    return concat((a, None), (problem_bp, problem_len_b), (b, None), (summary_bs, summary_len_b), (c, None),
                  (think_br, think_len_b), (d, None))


# ----------------------------------------------------------------------------------------------- one turn

_transition = jax.jit(transition)

# gen(prompt_tokens [B, p], prompt_len [B], turn) -> (tokens [B, max_new], count [B], stopped [B])
GenerateFn = Callable[[Any, Any, Any], tuple[Any, Any, Any]]


def rc_turn(t, state: RCState, tpl: RCTemplates, problem_bp, problem_len_b, policy_gen: GenerateFn,
            summary_gen: GenerateFn | None) -> RCState:
    """One RC turn on the carry: reason from (problem, summary); unless `summary_gen` is None (the last test-time
    turn), summarize (problem, summary, thinking) into the summary that replaces the current one."""
    prompt, plen = reasoning_prompt(tpl, problem_bp, problem_len_b, state.summary, state.summary_len)
    out, count, stopped = policy_gen(prompt, plen, t)
    if summary_gen is None:
        return _transition(state, out, count, stopped)
    think, tlen = thinking(tpl, out, count)
    sprompt, splen = summary_prompt(tpl, problem_bp, problem_len_b, state.summary, state.summary_len, think, tlen)
    sout, scount, _ = summary_gen(sprompt, splen, t)
    new, new_len = summary_of(tpl, sout, scount, width=state.summary.shape[1])
    return _transition(state, out, count, stopped, new, new_len, scount)


# ----------------------------------------------------------------------------------------------- the jitted loop

def _native_gen(cfg, params, eos_ids: tuple, sampling: SamplingParams, seed):
    """A GenerateFn on the native engine's jitted decode loop; `seed` is traced (a new seed never recompiles)."""
    from qednano_jax.rollout.native import generate_tokens

    stops = jnp.asarray(tuple(dict.fromkeys((*sampling.stop_token_ids, *eos_ids))), jnp.int32)

    def gen(tokens_bp, lengths_b, t):
        b = tokens_bp.shape[0]
        full = lambda v, dt: jnp.full((b,), v, dt)
        seed_t = (seed + t).astype(jnp.uint32)
        out, _, count, stopped = generate_tokens(
            cfg, params, tokens_bp, lengths_b, jnp.broadcast_to(seed_t, (b,)), jnp.arange(b, dtype=jnp.int32),
            full(sampling.temperature, jnp.float32), full(sampling.top_p, jnp.float32),
            full(sampling.top_k, jnp.int32), full(sampling.max_new_tokens, jnp.int32),
            jnp.broadcast_to(stops, (b, stops.shape[0])), max_new=sampling.max_new_tokens,
            min_batch=None)  # no compaction stages: each would add another decode loop to the RC program
        return out, count, stopped
    return gen


@functools.partial(jax.jit, static_argnames=("policy_cfg", "summary_cfg", "policy_eos", "summary_eos",
                                             "policy_sampling", "summary_sampling", "summarize_last"))
def rc_loop_jit(policy_cfg, policy_params, summary_cfg, summary_params, tpl: RCTemplates, problem_bp,
                problem_len_b, state: RCState, policy_seed, summary_seed, *, policy_eos: tuple, summary_eos: tuple,
                policy_sampling: SamplingParams, summary_sampling: SamplingParams,
                summarize_last: bool = True) -> RCState:
    """All `state.turns` RC turns of a batch as one jitted program over the carry (see module doc).

    Turn t samples with seed + t (policy and summarizer seeds from their SamplingParams) and row index = the row,
    exactly as `NativeRollout.generate(..., seed + t)` does, so the host loop over the native engine draws the same
    samples. The seeds are traced int32 scalars (the static SamplingParams carry seed None), so every step of a run
    reuses one compiled program. `summarize_last=False`: no summary after the last turn (test-time RC)."""
    policy_gen = _native_gen(policy_cfg, policy_params, policy_eos, policy_sampling, policy_seed)
    summary_gen = _native_gen(summary_cfg, summary_params, summary_eos, summary_sampling, summary_seed)
    turns = state.turns
    full = turns if summarize_last else turns - 1
    body = lambda t, st: rc_turn(t, st, tpl, problem_bp, problem_len_b, policy_gen, summary_gen)
    state = jax.lax.fori_loop(0, full, body, state)
    if not summarize_last:
        state = rc_turn(full, state, tpl, problem_bp, problem_len_b, policy_gen, None)
    return state


def run_native(policy, summarizer, tpl: RCTemplates, problem_bp, problem_len_b, state: RCState, *,
               policy_sampling: SamplingParams, summary_sampling: SamplingParams,
               summarize_last: bool = True) -> RCState:
    """`rc_loop_jit` on two NativeRollout engines (the same engine twice when the policy summarizes itself), under
    the policy engine's sharding rules when it has a mesh (the summarizer engine must then share that mesh)."""
    import contextlib

    from qednano_jax.sharding import use_rules

    check_widths(state, problem_bp, policy_sampling, summary_sampling)
    mesh = getattr(policy, "mesh", None)
    with use_rules(mesh, policy.rules) if mesh is not None else contextlib.nullcontext():
        return rc_loop_jit(policy.cfg, policy.params, summarizer.cfg, summarizer.params, tpl,
                           jnp.asarray(problem_bp), jnp.asarray(problem_len_b), state,
                           _seed(policy_sampling), _seed(summary_sampling),
                           policy_eos=tuple(policy.eos_ids), summary_eos=tuple(summarizer.eos_ids),
                           policy_sampling=dataclasses.replace(policy_sampling, seed=None),
                           summary_sampling=dataclasses.replace(summary_sampling, seed=None),
                           summarize_last=summarize_last)


def _seed(sampling: SamplingParams):
    if sampling.seed is None:
        raise ValueError("rc_loop_jit: give the SamplingParams a seed (turn t samples with seed + t)")
    return jnp.asarray(sampling.seed, jnp.int32)


def check_widths(state: RCState, problem_bp, policy_sampling: SamplingParams, summary_sampling: SamplingParams):
    """The carry's fixed widths must hold what the samplers can produce (nothing is cut silently)."""
    if state.outputs.shape[2] < policy_sampling.max_new_tokens:
        raise ValueError(f"rc: reasoning width {state.outputs.shape[2]} < policy max_new_tokens "
                         f"{policy_sampling.max_new_tokens}")
    if state.summary.shape[1] < summary_sampling.max_new_tokens:
        raise ValueError(f"rc: summary width {state.summary.shape[1]} < summarizer max_new_tokens "
                         f"{summary_sampling.max_new_tokens}")


# ----------------------------------------------------------------------------------------------- the host loop

def host_gen(rollout: Any, sampling: SamplingParams) -> GenerateFn:
    """A GenerateFn over any Rollout backend: one batched `generate` call per turn (seed + t when seeded)."""
    def gen(tokens_bp, lengths_b, t):
        tokens_bp, lengths_b = np.asarray(tokens_bp), np.asarray(lengths_b)
        prompts = [tokens_bp[i, :lengths_b[i]].tolist() for i in range(len(lengths_b))]
        sp = sampling if sampling.seed is None else dataclasses.replace(sampling, seed=sampling.seed + int(t))
        outs = rollout.generate(prompts, sp, n=1)
        out = np.zeros((len(prompts), sampling.max_new_tokens), np.int32)
        count, stopped = np.zeros(len(prompts), np.int32), np.zeros(len(prompts), bool)
        for i, (c,) in enumerate(outs):
            ids = c.token_ids[:sampling.max_new_tokens]
            out[i, :len(ids)], count[i], stopped[i] = ids, len(ids), c.finish_reason == "stop"
        return jnp.asarray(out), jnp.asarray(count), jnp.asarray(stopped)
    return gen


def rc_loop_host(policy: Any, summarizer: Any, tpl: RCTemplates, problem_bp, problem_len_b, state: RCState, *,
                 policy_sampling: SamplingParams, summary_sampling: SamplingParams, summarize_last: bool = True,
                 on_turn: Callable[[int, RCState], None] | None = None) -> RCState:
    """The same turns as `rc_loop_jit`, threaded on the host over any Rollout backends (one generate call per turn
    and role); `on_turn(t, state)` runs after each turn (progress)."""
    check_widths(state, problem_bp, policy_sampling, summary_sampling)
    problem_bp, problem_len_b = jnp.asarray(problem_bp), jnp.asarray(problem_len_b)
    pg, sg = host_gen(policy, policy_sampling), host_gen(summarizer or policy, summary_sampling)
    for t in range(state.turns):
        last = t == state.turns - 1
        state = rc_turn(t, state, tpl, problem_bp, problem_len_b, pg, None if last and not summarize_last else sg)
        if on_turn is not None:
            on_turn(t, state)
    return state
