"""Masked grouped-query attention for the Qwen3 decoder, three ways (`ModelConfig.attention_impl`).

All take q [b, t, h, e], k and v [b, s, k, e] (h = k * g query heads), `limit` [b, t] (the last key index each
query may see: its own index in a causal forward, its cache slot when decoding) and `seg`: None or (query segment
ids [b, t], key segment ids [b, s]) for packed rows, where a query sees only keys of its own segment. Scores and
softmax are fp32.

- "blocked": the whole batch per query block; each block attends only to the keys up to its end (causal), so the
  masked upper triangle is skipped. Simple, but the backward pass keeps every block's probabilities: memory grows
  with t * s (385 GiB of temporaries for one 4B layer at 45,056 tokens).
- "flash": query and key blocks with an online softmax and a hand-written backward (a custom VJP that recomputes
  each block's probabilities from the saved log-sum-exp), so memory grows with t only (4.8 GiB in that case).
  Blocks whose keys all lie beyond every query's limit are skipped. For long rows and accelerators.
- "rows": "blocked" for one (batch row, KV head) pair at a time under `lax.map`, so score blocks stay small enough
  for CPU caches (about 2x faster on CPU). It serialises the batch axis, which a mesh shards: single-device CPU
  only.

Shape letters as in qwen3.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity": a fully masked (padding) row stays finite

IMPLS = ("blocked", "flash", "rows")


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


def mask(keys: int, limit_bt, seg, first_key=0):
    """[b, t, keys]: query i sees key j (index first_key + j) iff j <= limit[i] and it is in the same segment."""
    m = first_key + jnp.arange(keys)[None, None, :] <= limit_bt[:, :, None]
    if seg is not None:
        q_seg, k_seg = seg
        m &= q_seg[:, :, None] == k_seg[:, None, :]
    return m


def attention(q, k, v, limit, seg, chunk: int, impl: str = "blocked"):
    """Dispatch on `impl` (module docstring); `chunk` is the query (and flash key) block, 0 = one block."""
    if impl == "flash":
        return flash(q, k, v, limit, seg, chunk)
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


# ----------------------------------------------------------------------------------------------- flash

def _split(x, n: int, axis: int):
    """Split `axis` into n equal blocks, stacked on a new leading axis (what lax.scan iterates over)."""
    x = x.reshape(x.shape[:axis] + (n, x.shape[axis] // n) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _merge(x, axis: int):
    """Inverse of `_split`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])


def flash(q, k, v, limit, seg, chunk: int):
    """Flash attention: blocks of `chunk` queries and keys (t and s padded up to a multiple of it)."""
    b, t, h, e = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, bk = min(chunk or t, t), min(chunk or s, s)
    pt, ps = -t % bq, -s % bk
    pad = lambda x, n, fill=0: jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    qq = pad(q, pt).reshape(b, t + pt, kh, h // kh, e).transpose(0, 2, 3, 1, 4)  # [b, k, g, t, e]
    kk, vv = pad(k, ps).transpose(0, 2, 1, 3), pad(v, ps).transpose(0, 2, 1, 3)  # [b, k, s, e]
    lim = pad(limit, pt, -1)  # padded queries see nothing; padded keys (index >= s) exceed every real limit
    qseg, kseg = (None, None) if seg is None else (pad(seg[0], pt), pad(seg[1], ps))
    out = _flash(qq, kk, vv, lim, qseg, kseg, bq, bk)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t + pt, h, e)[:, :t]


def _block_mask(j, bk, lim_i, qseg_i, kseg_j):
    """[b, 1, 1, bq, bk] mask of query block i against key block j."""
    seg = None if qseg_i is None else (qseg_i, kseg_j)
    return mask(bk, lim_i, seg, first_key=j * bk)[:, None, None]


def _flash_forward(qq, kk, vv, lim, qseg, kseg, bq, bk):
    """Returns out [b, k, g, t, e] (fp32) and the log-sum-exp of each query's scores [b, k, g, t]."""
    b, kh, g, t, e = qq.shape
    nk = kk.shape[2] // bk
    scale = e ** -0.5

    def q_block(_, xs):
        q_i, lim_i, qseg_i = xs

        def k_block(carry, ys):
            j, k_j, v_j, kseg_j = ys

            def update(carry):
                m, l, acc = carry
                sc = jnp.einsum("bkgte,bkse->bkgts", q_i, k_j, preferred_element_type=jnp.float32) * scale
                msk = _block_mask(j, bk, lim_i, qseg_i, kseg_j)
                m_new = jnp.maximum(m, jnp.where(msk, sc, NEG).max(-1))
                p = jnp.where(msk, jnp.exp(sc - m_new[..., None]), 0.0)
                corr = jnp.exp(m - m_new)
                pv = jnp.einsum("bkgts,bkse->bkgte", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
                return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

            return jax.lax.cond(j * bk <= lim_i.max(), update, lambda c: c, carry), None

        init = (jnp.full((b, kh, g, bq), NEG, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
                jnp.zeros((b, kh, g, bq, e), jnp.float32))
        kseg_b = None if kseg is None else _split(kseg, nk, 1)
        (m, l, acc), _ = jax.lax.scan(k_block, init, (jnp.arange(nk), _split(kk, nk, 2), _split(vv, nk, 2), kseg_b))
        l = jnp.maximum(l, 1e-30)  # a query that sees nothing (padding) gets 0
        return None, (acc / l[..., None], m + jnp.log(l))

    nq = t // bq
    xs = (_split(qq, nq, 3), _split(lim, nq, 1), None if qseg is None else _split(qseg, nq, 1))
    _, (out, lse) = jax.lax.scan(q_block, None, xs)
    return _merge(out, 3), _merge(lse, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(qq, kk, vv, lim, qseg, kseg, bq, bk):
    return _flash_forward(qq, kk, vv, lim, qseg, kseg, bq, bk)[0].astype(qq.dtype)


def _flash_fwd(qq, kk, vv, lim, qseg, kseg, bq, bk):
    out, lse = _flash_forward(qq, kk, vv, lim, qseg, kseg, bq, bk)
    out = out.astype(qq.dtype)
    return out, (qq, kk, vv, lim, qseg, kseg, out, lse)


def _flash_bwd(bq, bk, res, d_out):
    """Key blocks outside, query blocks inside: dk, dv of a key block accumulate in the inner carry, dq (full
    size) in the outer one; p = exp(scores - lse) is recomputed per block pair."""
    qq, kk, vv, lim, qseg, kseg, out, lse = res
    b, kh, g, t, e = qq.shape
    nq, nk = t // bq, kk.shape[2] // bk
    scale = e ** -0.5
    dt = qq.dtype
    d_out = d_out.astype(dt)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1)  # [b, k, g, t]
    mm = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

    def k_block(dq, xs):
        j, k_j, v_j, kseg_j = xs

        def q_block(carry, ys):
            i, q_i, do_i, lse_i, delta_i, lim_i, qseg_i = ys

            def update(carry):
                dk, dv, dq = carry
                sc = mm("bkgte,bkse->bkgts", q_i, k_j) * scale
                p = jnp.where(_block_mask(j, bk, lim_i, qseg_i, kseg_j), jnp.exp(sc - lse_i[..., None]), 0.0)
                dv = dv + mm("bkgts,bkgte->bkse", p.astype(dt), do_i)
                ds = (p * (mm("bkgte,bkse->bkgts", do_i, v_j) - delta_i[..., None]) * scale).astype(dt)
                dk = dk + mm("bkgts,bkgte->bkse", ds, q_i)
                dq_i = jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, 3) + mm("bkgts,bkse->bkgte", ds, k_j)
                return dk, dv, jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * bq, 3)

            return jax.lax.cond(j * bk <= lim_i.max(), update, lambda c: c, carry), None

        zeros = jnp.zeros((b, kh, bk, e), jnp.float32)
        ys = (jnp.arange(nq), _split(qq, nq, 3), _split(d_out, nq, 3), _split(lse, nq, 3), _split(delta, nq, 3),
              _split(lim, nq, 1), None if qseg is None else _split(qseg, nq, 1))
        (dk, dv, dq), _ = jax.lax.scan(q_block, (zeros, zeros, dq), ys)
        return dq, (dk, dv)

    xs = (jnp.arange(nk), _split(kk, nk, 2), _split(vv, nk, 2), None if kseg is None else _split(kseg, nk, 1))
    dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros(qq.shape, jnp.float32), xs)
    return dq.astype(dt), _merge(dk, 2).astype(kk.dtype), _merge(dv, 2).astype(vv.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
