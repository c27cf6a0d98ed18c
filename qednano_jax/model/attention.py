"""Masked grouped-query attention for the Qwen3 decoder, two ways (`ModelConfig.attention_impl`).

All take q [b, t, h, e], k and v [b, s, k, e] (h = k * g query heads), `limit` [b, t] (the last key index each
query may see: its own index in a causal forward, its cache slot when decoding) and `seg`: None or (query segment
ids [b, t], key segment ids [b, s]) for packed rows, where a query sees only keys of its own segment. Scores and
softmax are fp32.

- "blocked": the whole batch per query block; each block attends only to the keys up to its end (causal), so the
  masked upper triangle is skipped. The backward pass keeps every block's probabilities: memory grows with t * s
  (385 GiB of temporaries for one 4B layer's attention at 45,056 tokens), so the recipe's longest rows need a fused
  attention kernel on TPU (README, "Sharding planner").
- "rows": "blocked" for one (batch row, KV head) pair at a time under `lax.map`, so score blocks stay small enough
  for CPU caches (about 2x faster on CPU). It serialises the batch axis, which a mesh shards: single-device CPU
  only.

Shape letters as in qwen3.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity": a fully masked (padding) row stays finite


def attend(q_bthe, k_bske, v_bske, mask_bts):
    """Plain softmax attention over all given keys.

    The g query heads that share a KV head are laid out next to the query rows ([b, k, g, t, e]), so each KV head's
    scores are one plain [g*t, s] matmul and the big [b, k, g, t, s] tensors need no transposed copies.
    """
    b, t, h, e = q_bthe.shape
    kh = k_bske.shape[2]
    q = q_bthe.reshape(b, t, kh, h // kh, e).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum("bkgte,bske->bkgts", q, k_bske, preferred_element_type=jnp.float32) * (e ** -0.5)
    scores = jnp.where(mask_bts[:, None, None], scores, NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bske.dtype)
    out = jnp.einsum("bkgts,bske->bkgte", probs, v_bske)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)


def mask(keys: int, limit_bt, seg):
    """[b, t, keys]: query i sees key j iff j <= limit[i] and (packed rows) it is in the same segment."""
    m = jnp.arange(keys)[None, None, :] <= limit_bt[:, :, None]
    if seg is not None:
        q_seg, k_seg = seg
        m &= q_seg[:, :, None] == k_seg[:, None, :]
    return m


def attention(q, k, v, limit, seg, chunk: int, impl: str = "blocked"):
    """Dispatch on `impl` (module docstring); `chunk` is the query block, 0 = one block."""
    if impl == "rows":
        return rows(q, k, v, limit, seg, chunk)
    return blocked(q, k, v, limit, seg, chunk)


def blocked(q, k, v, limit, seg, chunk: int):
    """Query blocks of `chunk`, block [i, i + chunk) against keys [0, i + chunk) (causal: limit <= own index).

    The blocks have different key lengths, so they are unrolled (t / chunk of them per layer, compiled once under
    the layer scan). Only for the full forward, where t == s and limit is the query index.
    """
    t, s = q.shape[1], k.shape[1]
    if chunk <= 0 or chunk >= t or t % chunk:
        return attend(q, k, v, mask(s, limit, seg))
    out = []
    for i in range(0, t, chunk):
        end = i + chunk
        blk = lambda x: x[:, i:end]
        out.append(attend(blk(q), k[:, :end], v[:, :end],
                          mask(end, blk(limit), None if seg is None else (blk(seg[0]), seg[1][:, :end]))))
    return jnp.concatenate(out, axis=1)


def rows(q, k, v, limit, seg, chunk: int):
    """`blocked` for one (batch row, KV head) pair at a time under `lax.map`."""
    b, t, h, e = q.shape
    kh = k.shape[2]
    per_kv = lambda x: jnp.moveaxis(x.reshape(b, x.shape[1], kh, -1, e), 2, 1).reshape(b * kh, x.shape[1], 1, -1, e)
    rep = lambda x: jnp.repeat(x, kh, axis=0)  # per-row metadata, one copy per KV head

    def one(x):
        q1, k1, v1, lim, sg = jax.tree.map(lambda a: a[None], x)
        return blocked(q1[:, :, 0], k1[:, :, 0], v1[:, :, 0], lim, sg, chunk)[0]

    out = jax.lax.map(one, (per_kv(q), per_kv(k), per_kv(v), rep(limit), None if seg is None else tuple(map(rep, seg))))
    return jnp.moveaxis(out.reshape(b, kh, t, h // kh, e), 1, 2).reshape(b, t, h, e)
