"""The embedded JAX rollout engine: batched prefill + a jitted decode loop over the model's KV cache.

Why embedded: on CPU and on TPU hosts without SGLang the trainer samples its own rollouts (docs/design.md layout,
`native.py` is the CPU default), and `python -m qednano_jax.serve` puts this engine behind SGLang's HTTP API.

Shapes are bucketed so that a new request rarely compiles: the batch (at least 8), the longest prompt and the
largest max_new_tokens of a chunk (at least 16) are rounded up to powers of two (the batch capped by `max_batch`). Everything else is data:
per-row temperature / top-p / top-k / max_new_tokens / stop ids / seed, so requests with different sampling
parameters share one compiled program and one batch. The decode runs as `lax.while_loop`s that exit as soon as
every row has finished, and the batch halves (live rows and their cache moved, finished ones dropped) each time at
most half of its rows are live; the cache rides in the loop and layer-scan carries and is updated in place, and
each step reads only the blocks of it that hold tokens (`qwen3.forward_cached`).

Behaviour logprobs are log softmax(logits / temperature) of the sampled token (the untempered softmax when greedy),
before top-p/top-k, as SGLang returns them (docs/recipe.md §3: logp_old is the sampler's logprob). A row's randomness is
`fold_in(fold_in(key(seed), row index), step)`, so a completion depends on its seed and index only, not on how
rows were batched.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qednano_jax.config import ModelConfig
from qednano_jax.model import qwen3
from qednano_jax.model.hf import generation_config_dict
from qednano_jax.rollout.base import Completion, RefitResult, SamplingParams, check_prompts
from qednano_jax.sharding import batch_sharding, constrain, tree_shardings, use_rules

_MIN_LEN_BUCKET = 16
_MIN_BATCH_BUCKET = 8


def bucket(n: int, minimum: int = 1, cap: int | None = None) -> int:
    """Smallest power of two >= max(n, minimum), capped at `cap` (then `cap` itself must be >= n)."""
    m = max(int(n), int(minimum), 1)
    b = 1 << (m - 1).bit_length()
    return b if cap is None else max(min(b, cap), n)


# ----------------------------------------------------------------------------------------------- sampling math

def filter_logits(scaled_bv: jax.Array, top_p_b: jax.Array, top_k_b: jax.Array) -> jax.Array:
    """Set tokens outside the top-k set or outside the top-p nucleus to -inf.

    `scaled_bv` are tempered logits. The nucleus is the smallest prefix of the tokens sorted by probability whose
    mass before the token is <= top_p (SGLang's rule, over the full tempered distribution); top_k <= 0 and
    top_p >= 1 switch a filter off. Ties at the threshold are all kept.
    """
    v = scaled_bv.shape[-1]
    sorted_bv = -jnp.sort(-scaled_bv, axis=-1)
    k_b = jnp.where(top_k_b > 0, jnp.minimum(top_k_b, v), v)
    probs = jax.nn.softmax(sorted_bv, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    p_keep_b = jnp.where(top_p_b >= 1, v, jnp.sum(before <= top_p_b[:, None], axis=-1))
    keep_b = jnp.maximum(jnp.minimum(k_b, p_keep_b), 1)
    thresh = jnp.take_along_axis(sorted_bv, (keep_b - 1)[:, None], axis=-1)
    return jnp.where(scaled_bv >= thresh, scaled_bv, -jnp.inf)


def sampling_logprobs(logits_bv: jax.Array, temperature_b: jax.Array, top_p_b: jax.Array,
                      top_k_b: jax.Array) -> jax.Array:
    """log of the distribution a row samples from (tempered, filtered, renormalised); greedy rows are tempered
    with 1. Used by tests to check the masks against a hand-computed distribution."""
    t_b = jnp.where(temperature_b == 0, 1.0, temperature_b)
    return jax.nn.log_softmax(filter_logits(logits_bv / t_b[:, None], top_p_b, top_k_b), axis=-1)


def sample_tokens(logits_bv, temperature_b, top_p_b, top_k_b, keys_b):
    """One token per row and its behaviour logprob (see module doc). Returns int32 [b], fp32 [b]."""
    greedy_b = temperature_b == 0
    t_b = jnp.where(greedy_b, 1.0, temperature_b)
    scaled = logits_bv / t_b[:, None]
    logp_bv = jax.nn.log_softmax(scaled, axis=-1)
    need_filter = jnp.any(((top_p_b < 1) | (top_k_b > 0)) & ~greedy_b)
    filtered = jax.lax.cond(need_filter, lambda x: filter_logits(x, top_p_b, top_k_b), lambda x: x, scaled)
    greedy_tok = jnp.argmax(logits_bv, axis=-1)
    # an all-greedy batch draws no [b, vocab] Gumbel noise (151,936 random numbers a row for the Qwen3 vocabulary)
    sampled = jax.lax.cond(jnp.all(greedy_b), lambda: greedy_tok,
                           lambda: jax.vmap(jax.random.categorical)(keys_b, filtered).astype(greedy_tok.dtype))
    tok_b = jnp.where(greedy_b, greedy_tok, sampled).astype(jnp.int32)
    return tok_b, jnp.take_along_axis(logp_bv, tok_b[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------------------------- the jitted loop

@functools.partial(jax.jit, static_argnames=("cfg", "max_new", "min_batch"))
def generate_tokens(cfg: ModelConfig, params, tokens_bp, lengths_b, seeds_b, index_b, temperature_b, top_p_b,
                    top_k_b, max_new_b, stop_bs, *, max_new: int, min_batch: int | None = 1):
    """Prefill right-padded prompts [b, p] (row r real for lengths[r] tokens), then decode up to `max_new` steps.

    Returns (tokens [b, max_new] int32, logprobs [b, max_new] fp32, generated count [b], stopped [b] bool). Row r
    stops after a token in stop_bs[r] (-1 = padding) or after max_new_b[r] tokens; its later entries are 0.

    Finished rows are dropped as the batch empties: once at most half of a stage's rows are live, the live rows
    (and their cache) move to a batch of half the size, down to `min_batch` rows (a divisor of b; None: never), so
    the last long rows do not pay for the finished ones. Each stage is its own loop in the one compiled program;
    a row's tokens do not depend on the stage it runs in (its randomness is keyed by its seed and index).
    """
    b, p = tokens_bp.shape
    axes = qwen3.cache_axes()
    cache = {k: constrain(v, axes[k]) for k, v in qwen3.init_cache(cfg, b, p + max_new).items()}
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    hidden, cache = qwen3.forward_cached(cfg, params, tokens_bp, positions, cache, attend=p)
    last = jnp.take_along_axis(hidden, (lengths_b - 1)[:, None, None], axis=1)
    row_keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds_b, index_b)

    def step_sample(hidden_b1d, step, rows):
        logits = qwen3.logits_from_hidden(cfg, params, hidden_b1d)[:, 0]
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(rows["key"], step)
        return sample_tokens(logits, rows["temperature"], rows["top_p"], rows["top_k"], keys)

    def is_stop(tok_b, rows):
        return jnp.any(tok_b[:, None] == rows["stops"], axis=-1)

    # what a stage knows of each of its rows; "row" is the row's index in the caller's batch
    rows = {"row": jnp.arange(b), "length": lengths_b, "key": row_keys, "temperature": temperature_b,
            "top_p": top_p_b, "top_k": top_k_b, "max_new": max_new_b, "stops": stop_bs}
    tok, lp = step_sample(last, 0, rows)
    rows["stopped"] = is_stop(tok, rows)
    rows["count"] = jnp.ones((b,), jnp.int32)
    rows["done"] = rows["stopped"] | (rows["count"] >= max_new_b)
    rows["tok"] = tok
    out_tok = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(tok)
    out_lp = jnp.zeros((b, max_new), jnp.float32).at[:, 0].set(lp)
    count, stopped = rows["count"], rows["stopped"]

    def body(state):
        step, cache, rows, out_tok, out_lp = state
        pos = (rows["length"] + step - 1)[:, None]
        hidden, cache = qwen3.forward_cached(cfg, params, rows["tok"][:, None], pos, cache)  # reads filled blocks
        new, lp = step_sample(hidden, step, rows)
        live = ~rows["done"]
        new = jnp.where(live, new, 0)
        out_tok = out_tok.at[rows["row"], step].set(new)  # a finished row writes the zeros it already holds
        out_lp = out_lp.at[rows["row"], step].set(jnp.where(live, lp, 0.0))
        count = rows["count"] + live.astype(jnp.int32)
        hit = live & is_stop(new, rows)
        rows = {**rows, "tok": new, "count": count, "stopped": rows["stopped"] | hit,
                "done": rows["done"] | hit | (count >= rows["max_new"])}
        return step + 1, cache, rows, out_tok, out_lp

    step, size = jnp.int32(1), b
    while True:
        half = size // 2 if min_batch and size % 2 == 0 and size // 2 >= min_batch else None
        keep = 0 if half is None else half  # this stage runs while more than `keep` rows are live

        def cond(state, keep=keep):
            step, _, rows, *_ = state
            return (step < max_new) & (jnp.sum(~rows["done"]) > keep)

        step, cache, rows, out_tok, out_lp = jax.lax.while_loop(cond, body, (step, cache, rows, out_tok, out_lp))
        count, stopped = count.at[rows["row"]].set(rows["count"]), stopped.at[rows["row"]].set(rows["stopped"])
        if half is None:
            break
        pick = jnp.argsort(rows["done"], stable=True)[:half]  # the live rows first
        rows = jax.tree.map(lambda x: x[pick], rows)
        cache = {k: constrain(v[:, pick], axes[k]) for k, v in cache.items()}
        size = half
    return out_tok, out_lp, count, stopped


# ----------------------------------------------------------------------------------------------- the engine

_unstack_layers = jax.jit(qwen3.unstack_layers)


class NativeRollout:
    """`Rollout` backend running `generate_tokens` in this process (see module doc).

    `params` are placed on `mesh` by `rules` (like the model in training); the batch is split over the data axes.
    Decoding is never sequence-parallel: a rule for `act_length` (the training mesh's sequence axis) is dropped.
    `refit` swaps the params in memory. Thread-safe: concurrent `generate` calls are serialised.
    """

    def __init__(self, model_cfg: ModelConfig, params: Any, tokenizer: Any = None, *, max_batch: int = 64,
                 seed: int = 0, mesh=None, rules=None, version: str = "0"):
        if (mesh is None) != (rules is None):
            raise ValueError("NativeRollout: pass both mesh and rules, or neither")
        self.cfg, self.tokenizer, self.max_batch = model_cfg, tokenizer, int(max_batch)
        self.mesh = mesh
        self.rules = None if rules is None else {k: v for k, v in rules.items() if k != "act_length"}
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._params = self._place(params)
        self._version = str(version)
        # always-on stop ids: those the exported generation_config.json lists (EOS, and <|endoftext|> as Qwen3
        # ships), which SGLang and transformers stop on as well
        self.eos_ids = tuple(generation_config_dict(model_cfg)["eos_token_id"])

    # -- Rollout protocol
    @property
    def weight_version(self) -> str:
        return self._version

    @property
    def params(self):
        return self._params

    def health(self) -> bool:
        return True

    def refit(self, params: Any, version: str) -> RefitResult:
        t0 = time.perf_counter()
        placed = self._place(params)
        jax.block_until_ready(placed)
        with self._lock:
            self._params, self._version = placed, str(version)
        return RefitResult(weight_version=str(version), export_s=0.0, update_s=time.perf_counter() - t0)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int = 1) -> list[list[Completion]]:
        check_prompts(prompts, n, self.cfg.vocab_size)
        seed = self._fresh_seed() if sampling.seed is None else sampling.seed
        rows = [(list(map(int, p)), sampling, seed, i * n + j) for i, p in enumerate(prompts) for j in range(n)]
        flat = self.generate_rows(rows)
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    # -- lower level: rows with their own sampling params (the server batches unrelated requests this way)
    def generate_rows(self, rows: list[tuple[list[int], SamplingParams, int, int]]) -> list[Completion]:
        """rows = (prompt ids, sampling, seed, row index) -> one completion per row, in order."""
        for i, (prompt, sp, _, _) in enumerate(rows):
            if len(prompt) + sp.max_new_tokens > self.cfg.max_position_embeddings:
                raise ValueError(f"generate: prompt {i} ({len(prompt)} tokens) + max_new_tokens {sp.max_new_tokens} "
                                 f"exceeds model.max_position_embeddings {self.cfg.max_position_embeddings}")
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]))  # similar lengths share a chunk
        out: list[Completion | None] = [None] * len(rows)
        with self._lock:
            params, version = self._params, self._version
            for start in range(0, len(order), self.max_batch):
                idx = order[start:start + self.max_batch]
                for r, c in zip(idx, self._run_chunk(params, version, [rows[r] for r in idx])):
                    out[r] = c
        return out  # type: ignore[return-value]

    def seed_for_call(self) -> int:
        return self._fresh_seed()

    # -- internals
    def _fresh_seed(self) -> int:
        return int(self._rng.integers(0, 2**31 - 1))

    def _dp_size(self) -> int:
        if self.mesh is None:
            return 1
        spec = batch_sharding(self.mesh, self.rules, 1).spec[0]
        axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
        return int(np.prod([self.mesh.shape[a] for a in axes])) if axes else 1

    def _place(self, params):
        """params on the engine's devices; on CPU with per-layer weights (qwen3.unstack_layers: XLA:CPU would copy
        every layer's weights out of the stack each decode step), elsewhere stacked for the layer scan."""
        if self.mesh is None:
            placed, platform = jax.tree.map(jnp.asarray, params), jax.default_backend()
        else:
            shardings = tree_shardings(qwen3.param_axes(self.cfg), self.rules, self.mesh, qwen3.param_shapes(self.cfg))
            placed, platform = jax.device_put(params, shardings), self.mesh.devices.flat[0].platform
        return _unstack_layers(placed) if platform == "cpu" else placed

    def _run_chunk(self, params, version, rows) -> list[Completion]:
        n = len(rows)
        b = bucket(n, max(_MIN_BATCH_BUCKET, self._dp_size()), cap=max(self.max_batch, self._dp_size()))
        b = -(-b // self._dp_size()) * self._dp_size()
        p = bucket(max(len(r[0]) for r in rows), _MIN_LEN_BUCKET)
        new = bucket(max(r[1].max_new_tokens for r in rows), _MIN_LEN_BUCKET)
        stops = [tuple(dict.fromkeys((*r[1].stop_token_ids, *self.eos_ids))) for r in rows]
        s = bucket(max(len(x) for x in stops), 4)
        tokens = np.zeros((b, p), np.int32)
        stop_bs = np.full((b, s), -1, np.int32)
        lengths, max_new_b = np.ones(b, np.int32), np.ones(b, np.int32)
        seeds, index = np.zeros(b, np.uint32), np.zeros(b, np.int32)
        temp, top_p, top_k = np.zeros(b, np.float32), np.ones(b, np.float32), np.full(b, -1, np.int32)
        for i, (prompt, sp, seed, row) in enumerate(rows):
            tokens[i, :len(prompt)] = prompt
            stop_bs[i, :len(stops[i])] = stops[i]
            lengths[i], max_new_b[i] = len(prompt), sp.max_new_tokens
            seeds[i], index[i] = np.uint32(seed & 0xFFFFFFFF), row
            temp[i], top_p[i], top_k[i] = sp.temperature, sp.top_p, sp.top_k
        args = (tokens, lengths, seeds, index, temp, top_p, top_k, max_new_b, stop_bs)
        if self.mesh is None:
            out = generate_tokens(self.cfg, params, *args, max_new=new, min_batch=self._dp_size())
        else:
            args = [jax.device_put(a, batch_sharding(self.mesh, self.rules, a.ndim)) for a in args]
            with use_rules(self.mesh, self.rules):
                out = generate_tokens(self.cfg, params, *args, max_new=new, min_batch=self._dp_size())
        out_tok, out_lp, count, stopped = jax.device_get(out)
        result = []
        for i, (prompt, sp, _, _) in enumerate(rows):
            ids = out_tok[i, :count[i]].tolist()
            result.append(Completion(token_ids=ids, logprobs=out_lp[i, :count[i]].tolist(),
                                     finish_reason="stop" if stopped[i] else "length", text=self._decode(ids),
                                     weight_version=version, prompt_tokens=len(prompt)))
        return result

    def _decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)
