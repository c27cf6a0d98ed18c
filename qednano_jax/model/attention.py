"""Causal grouped-query attention of the Qwen3 decoder's full (training) forward, behind one registry
(`ModelConfig.attention_impl`), plus the plain masked attention used against a KV cache.

Every implementation takes q [b, t, h, e], k and v [b, s, k, e] (h = k * g query heads) and `seg` = None or
(query segment ids [b, t], key segment ids [b, s]) for packed rows: a query sees the keys of its own segment at or
before its own index. Scores and softmax are fp32. `block` is the block size along both lengths (0 = the
implementation's default). A row length the block does not divide gets a ragged last block (padding that nothing
attends to); no implementation ever switches to a different memory profile behind the caller's back.

    impl      memory in the backward        where it belongs
    flash     linear in t (custom VJP)      the portable training default (GPU, CPU meshes, long rows)
    splash    linear in t (Pallas kernel)   TPU (jax.experimental.pallas.ops.tpu.splash_attention); interpret
                                            mode elsewhere, for tests only
    blocked   t * s (keeps probabilities)   short rows: query blocks of the whole batch, the causal upper
                                            triangle skipped
    rows      t * s                         `blocked` one (row, KV head) pair at a time: CPU-cache-sized blocks,
                                            single-device CPU benchmarks only (it serialises the batch a mesh shards)
    cudnn     t * s bytes (the segment mask)    NVIDIA GPUs: jax.nn.dot_product_attention's cuDNN fused kernel; packed
                                            rows through a boolean [b, 1, t, s] mask (2 GiB per row at 45k)
    auto      -                             splash on TPU, flash elsewhere (and flash under sequence parallelism)

The rule about loop-invariant inputs (why `flash` is written as it is). The decoder runs its layers under
`lax.scan`, and the segment ids are the same in every layer. When JAX linearises a scan it splits the body into a
"known" part (what does not depend on the differentiated inputs) and hoists the known part out of the loop
(`_scan_known_hoisting`, jax/_src/lax/control_flow/loops.py). Anything in the attention that is a function of the
segment ids alone (block masks, fill constants) is known, so an attention whose block loops are themselves scans has
ALL its block-pair masks materialised before the layer scan: [q_blocks, k_blocks, b, ...] arrays, gigabytes at 8k
tokens, even under remat (the checkpoint is inlined by then). So `flash` builds each block's mask inside its block
loop, from the segment-id slices and the block offsets, and its block loops are `lax.while_loop`s (JAX never splits
a while loop's body into hoisted parts); their bounds come from the causal structure, so the upper triangle is not
visited. Keep it that way: no `lax.scan`/`fori_loop` with static bounds, no mask built outside the loops.

Sequence parallelism (`sequence_parallel`): when the mesh shards the activations' length axis (`act_length`) over
n devices, each device keeps its queries and all-gathers K, V and the key segment ids over that axis
(all-gather context parallelism). The rows arrive in the load-balanced order of `balanced_order` (device r holds
the r-th and the (2n-1-r)-th of 2n chunks), so every device does the same causal work; `qwen3.hidden_states`
permutes in and out.

Shape letters as in qwen3.py; flop counts: `flash_block_pairs`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1e30  # finite "minus infinity": a fully masked (padding) row stays finite
IMPLS = ("auto", "flash", "splash", "cudnn", "blocked", "rows")
DEFAULT_BLOCK = 512


def resolve_impl(impl: str, sequence_parallel: bool = False) -> str:
    """`auto` -> `splash` on TPU without sequence parallelism, else `flash`. `cudnn` off an NVIDIA GPU is an error."""
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"model.attention_impl: cudnn needs an NVIDIA GPU (this backend is "
                         f"{jax.default_backend()}); use flash or auto")
    if impl != "auto":
        return impl
    return "splash" if jax.default_backend() == "tpu" and not sequence_parallel else "flash"


# ----------------------------------------------------------------------------------------------- plain attention

def attend(q_bthe, k_bske, v_bske, mask_bts, kv_major: bool = False):
    """Plain softmax attention over all given keys (decoding against a KV cache, and the short-row blocks).

    The g query heads that share a KV head are laid out next to the query rows ([b, k, g, t, e]), so each KV head's
    scores are one plain [g*t, s] matmul and the big [b, k, g, t, s] tensors need no transposed copies. With
    `kv_major` the keys and values come as [b, k, s, e] (the KV cache's layout), which the matmuls read in place.
    """
    b, t, h, e = q_bthe.shape
    kh = k_bske.shape[1 if kv_major else 2]
    kv = "bkse" if kv_major else "bske"
    q = q_bthe.reshape(b, t, kh, h // kh, e).transpose(0, 2, 3, 1, 4)
    scores = jnp.einsum(f"bkgte,{kv}->bkgts", q, k_bske, preferred_element_type=jnp.float32) * (e ** -0.5)
    scores = jnp.where(mask_bts[:, None, None], scores, NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bske.dtype)
    out = jnp.einsum(f"bkgts,{kv}->bkgte", probs, v_bske)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)


def attend_blocks(q_bthe, k_lbkse, v_lbkse, layer, limit_bt, block: int):
    """`attend` of q over layer `layer` of a KV cache [layers, b, kv_heads, slots, e], a query seeing the slots
    <= its `limit_bt`, read in blocks of `block` slots up to the highest limit (online softmax across blocks).

    Only the filled part of the cache is read, one block at a time: a block is a small copy that stays in cache,
    where slicing the whole filled prefix at once is a copy of it through memory. slots % block == 0."""
    b, t, h, e = q_bthe.shape
    kh = k_lbkse.shape[2]
    q = q_bthe.reshape(b, t, kh, h // kh, e).transpose(0, 2, 3, 1, 4).astype(jnp.float32) * (e ** -0.5)
    read = lambda c, j: jax.lax.dynamic_slice(c, (layer, 0, 0, j * block, 0), (1, b, kh, block, e))[0]

    def body(j, carry):
        m, l, acc = carry
        s = jnp.einsum("bkgte,bkse->bkgts", q, read(k_lbkse, j), preferred_element_type=jnp.float32)
        s = jnp.where(mask(block, limit_bt - j * block, None)[:, None, None], s, NEG)  # block j's slots <= limit
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        scale = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bkse->bkgte", p.astype(v_lbkse.dtype), read(v_lbkse, j),
                        preferred_element_type=jnp.float32)
        return m_new, l * scale + p.sum(-1), acc * scale[..., None] + pv

    shape = (b, kh, h // kh, t)
    init = (jnp.full(shape, NEG, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros((*shape, e), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, jnp.max(limit_bt) // block + 1, body, init)
    out = (acc / l[..., None]).astype(q_bthe.dtype)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e)


def mask(keys: int, limit_bt, seg):
    """[b, t, keys]: query i sees key j iff j <= limit[i] and (packed rows) it is in the same segment."""
    m = jnp.arange(keys)[None, None, :] <= limit_bt[:, :, None]
    if seg is not None:
        q_seg, k_seg = seg
        m &= q_seg[:, :, None] == k_seg[:, None, :]
    return m


def reference(q, k, v, seg):
    """Causal attention with the whole [t, s] mask at once: the numerical reference of the tests."""
    b, t = q.shape[:2]
    return attend(q, k, v, mask(k.shape[1], jnp.broadcast_to(jnp.arange(t), (b, t)), seg))


# ----------------------------------------------------------------------------------------------- dispatch

def attention(q, k, v, seg, block: int, impl: str = "auto"):
    """Causal self-attention of a full forward (t == s), by `impl` (module docstring)."""
    impl = resolve_impl(impl)
    if impl == "flash":
        b, t = q.shape[:2]
        ones = jnp.ones((b, t), jnp.int32)
        q_seg, k_seg = (ones, ones) if seg is None else seg
        return flash(q, k, v, q_seg.astype(jnp.int32), k_seg.astype(jnp.int32), jnp.int32(0),
                     block or DEFAULT_BLOCK)
    if impl == "splash":
        return splash(q, k, v, seg, block or DEFAULT_BLOCK)
    if impl == "cudnn":
        return cudnn(q, k, v, seg)
    if impl == "rows":
        return rows(q, k, v, seg, block)
    if impl == "blocked":
        return blocked(q, k, v, seg, block)
    raise ValueError(f"model.attention_impl: {impl!r} is not one of {IMPLS}")


# ----------------------------------------------------------------------------------------------- cudnn

def cudnn(q, k, v, seg):
    """cuDNN's fused attention through jax.nn.dot_product_attention (causal, native GQA). JAX's API has no segment
    ids, so packed rows pass a boolean [b, 1, t, s] same-segment mask (t * s bytes per row)."""
    m = None if seg is None else (seg[0][:, None, :, None] == seg[1][:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=m, is_causal=True, implementation="cudnn")


# ----------------------------------------------------------------------------------------------- blocked / rows

def blocked(q, k, v, seg, block: int):
    """Query blocks of `block` (0 = one block), block [i, i + block) against keys [0, i + block): the causal upper
    triangle is skipped. The blocks have different key lengths, so they are unrolled (compiled once under the layer
    scan); the last one may be shorter."""
    b, t = q.shape[:2]
    limit = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if block <= 0 or block >= t:
        return attend(q, k, v, mask(t, limit, seg))
    out = []
    for i in range(0, t, block):
        end = min(i + block, t)
        blk = lambda x: x[:, i:end]
        out.append(attend(blk(q), k[:, :end], v[:, :end],
                          mask(end, blk(limit), None if seg is None else (blk(seg[0]), seg[1][:, :end]))))
    return jnp.concatenate(out, axis=1)


def rows(q, k, v, seg, block: int):
    """`blocked` for one (batch row, KV head) pair at a time under `lax.map`."""
    b, t, h, e = q.shape
    kh = k.shape[2]
    per_kv = lambda x: jnp.moveaxis(x.reshape(b, x.shape[1], kh, -1, e), 2, 1).reshape(b * kh, x.shape[1], 1, -1, e)
    rep = lambda x: jnp.repeat(x, kh, axis=0)  # per-row metadata, one copy per KV head

    def one(x):
        q1, k1, v1, sg = jax.tree.map(lambda a: a[None], x)
        return blocked(q1[:, :, 0], k1[:, :, 0], v1[:, :, 0], sg, block)[0]

    out = jax.lax.map(one, (per_kv(q), per_kv(k), per_kv(v), None if seg is None else tuple(map(rep, seg))))
    return jnp.moveaxis(out.reshape(b, kh, t, h // kh, e), 1, 2).reshape(b, t, h, e)


# ----------------------------------------------------------------------------------------------- flash

def _blocks(n: int, block: int) -> tuple[int, int]:
    """(block size, number of blocks) covering n with a ragged (padded) last block."""
    bs = min(block, n)
    return bs, -(-n // bs)


def _pad_to(x, n: int, axis: int, value=0):
    pad = n - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _prep(q, k, v, q_seg, k_seg, block):
    """Padded, head-grouped operands: q [b, k, g, tq, e], k/v [b, k, sk, e], segment ids padded with ids nothing
    else has (-1 for queries, -2 for keys)."""
    b, t, h, e = q.shape
    s, kh = k.shape[1], k.shape[2]
    bq, nq = _blocks(t, block)
    bk, nk = _blocks(s, block)
    qg = _pad_to(q, bq * nq, 1).reshape(b, bq * nq, kh, h // kh, e).transpose(0, 2, 3, 1, 4)
    kg = _pad_to(k, bk * nk, 1).transpose(0, 2, 1, 3)
    vg = _pad_to(v, bk * nk, 1).transpose(0, 2, 1, 3)
    return qg, kg, vg, _pad_to(q_seg, bq * nq, 1, -1), _pad_to(k_seg, bk * nk, 1, -2), (bq, nq, bk, nk)


def _block_mask(qs, ks, q0, k0, bq, bk):
    """[b, 1, 1, bq, bk]: same segment and key index <= query index (q0, k0: global index of the blocks' first)."""
    causal = (k0 + jnp.arange(bk))[None, :] <= (q0 + jnp.arange(bq))[:, None]
    return ((qs[:, :, None] == ks[:, None, :]) & causal[None])[:, None, None]


def _key_block(kg, vg, ks_all, k0, bk):
    """Key block [k0, k0 + bk): k and v [b, k, bk, e], key segment ids [b, bk]."""
    sl = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, k0, bk, axis=axis)
    return sl(kg, 2), sl(vg, 2), sl(ks_all, 1)


def _while(lo, hi, body, carry):
    """for i in [lo, hi): carry = body(i, carry), as a while loop (see the module docstring: never a scan)."""
    _, out = jax.lax.while_loop(lambda c: c[0] < hi, lambda c: (c[0] + 1, body(c[0], c[1])), (lo, carry))
    return out


def _flash_fwd_impl(q, k, v, q_seg, k_seg, q_offset, block, offsets):
    b, t, h, e = q.shape
    kh, g = k.shape[2], h // k.shape[2]
    qg, kg, vg, qs_all, ks_all, (bq, nq, bk, nk) = _prep(q, k, v, q_seg, k_seg, block)
    scale = e ** -0.5
    pairs = np.mean([flash_block_pairs(t, k.shape[1], block, o) for o in offsets])

    def q_block(i, carry):
        out, lse = carry
        q0 = i * bq
        qi = jax.lax.dynamic_slice_in_dim(qg, q0, bq, axis=3)
        qs = jax.lax.dynamic_slice_in_dim(qs_all, q0, bq, axis=1)
        last = q_offset + jnp.minimum(q0 + bq, t) - 1  # the block's last real query
        hi = jnp.minimum(nk, last // bk + 1)  # causal: only the key blocks up to it

        def k_block(j, c):
            m, l, acc = c
            k0 = j * bk
            kj, vj, ks = _key_block(kg, vg, ks_all, k0, bk)
            msk = _block_mask(qs, ks, q_offset + q0, k0, bq, bk)
            sc = jnp.where(msk, jnp.einsum("bkgqe,bkse->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale,
                           NEG)
            m_new = jnp.maximum(m, sc.max(-1))
            p = jnp.where(msk, jnp.exp(sc - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            acc = alpha[..., None] * acc + jnp.einsum("bkgqs,bkse->bkgqe", p.astype(vj.dtype), vj,
                                                      preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), acc

        init = (jnp.full((b, kh, g, bq), NEG, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
                jnp.zeros((b, kh, g, bq, e), jnp.float32))
        with jax.named_scope(trips_scope(pairs / nq)):
            m, l, acc = _while(jnp.int32(0), hi, k_block, init)
        o = (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(out.dtype)
        blk_lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)
        return (jax.lax.dynamic_update_slice_in_dim(out, o, q0, axis=3),
                jax.lax.dynamic_update_slice_in_dim(lse, blk_lse, q0, axis=3))

    init = (jnp.zeros(qg.shape, q.dtype), jnp.zeros(qg.shape[:-1], jnp.float32))
    out, lse = _while(jnp.int32(0), jnp.int32(nq), q_block, init)
    o = out.transpose(0, 3, 1, 2, 4).reshape(b, bq * nq, h, e)[:, :t]
    return o, lse  # lse stays grouped and padded: [b, k, g, tq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def flash(q, k, v, q_seg, k_seg, q_offset, block, offsets=(0,)):
    """Flash attention in portable JAX: online softmax over key blocks, linear memory forward and backward.

    q [b, t, h, e], k/v [b, s, k, e], q_seg [b, t] / k_seg [b, s] int32 segment ids (a query sees keys of the same
    id only), `q_offset` (int32 scalar, may be traced) = the global index of query 0, so query i sees key j iff
    j <= q_offset + i. `offsets` (static) lists the values q_offset takes (one per device under sequence
    parallelism): it only sets the trip-count hint for the planner (`trips_scope`). The residuals for the backward
    are only (q, k, v, segment ids, out, logsumexp); the backward recomputes each block's probabilities
    (FlashAttention-2, Dao 2023, arXiv:2307.08691).
    """
    return _flash_fwd_impl(q, k, v, q_seg, k_seg, q_offset, block, offsets)[0]


def _flash_fwd(q, k, v, q_seg, k_seg, q_offset, block, offsets):
    out, lse = _flash_fwd_impl(q, k, v, q_seg, k_seg, q_offset, block, offsets)
    return out, (q, k, v, q_seg, k_seg, q_offset, out, lse)


def _flash_bwd(block, offsets, res, d_out):
    q, k, v, q_seg, k_seg, q_offset, out, lse = res
    b, t, h, e = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    qg, kg, vg, qs_all, ks_all, (bq, nq, bk, nk) = _prep(q, k, v, q_seg, k_seg, block)
    group = lambda x: _pad_to(x, bq * nq, 1).reshape(b, bq * nq, kh, g, e).transpose(0, 2, 3, 1, 4)
    dog = group(d_out)
    delta = jnp.sum(dog.astype(jnp.float32) * group(out).astype(jnp.float32), axis=-1)  # [b, k, g, tq]
    scale = e ** -0.5
    pairs = np.mean([flash_block_pairs(t, s, block, o) for o in offsets])

    def k_block(j, carry):
        dq, dk, dv = carry
        k0 = j * bk
        kj, vj, ks = _key_block(kg, vg, ks_all, k0, bk)
        # causal: from the first query block that sees this key block (none when it lies after the last query)
        lo = jnp.maximum(0, (k0 - q_offset) // bq)
        end = jnp.where(k0 <= q_offset + t - 1, nq, lo)

        def q_block(i, c):
            dq, dkj, dvj = c
            q0 = i * bq
            sl = lambda x: jax.lax.dynamic_slice_in_dim(x, q0, bq, axis=3)
            qi, doi, lse_i, delta_i = sl(qg), sl(dog), sl(lse), sl(delta)
            qs = jax.lax.dynamic_slice_in_dim(qs_all, q0, bq, axis=1)
            msk = _block_mask(qs, ks, q_offset + q0, k0, bq, bk)
            sc = jnp.einsum("bkgqe,bkse->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
            p = jnp.where(msk, jnp.exp(jnp.where(msk, sc, 0.0) - lse_i[..., None]), 0.0)
            dvj = dvj + jnp.einsum("bkgqs,bkgqe->bkse", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqe,bkse->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_i[..., None]) * scale).astype(qi.dtype)
            dqi = jnp.einsum("bkgqs,bkse->bkgqe", ds, kj, preferred_element_type=jnp.float32)
            dq = jax.lax.dynamic_update_slice_in_dim(dq, sl(dq) + dqi, q0, axis=3)
            dkj = dkj + jnp.einsum("bkgqs,bkgqe->bkse", ds, qi, preferred_element_type=jnp.float32)
            return dq, dkj, dvj

        zeros = jnp.zeros((b, kh, bk, e), jnp.float32)
        with jax.named_scope(trips_scope(pairs / nk)):
            dq, dkj, dvj = _while(lo, end, q_block, (dq, zeros, zeros))
        return (dq, jax.lax.dynamic_update_slice_in_dim(dk, dkj, k0, axis=2),
                jax.lax.dynamic_update_slice_in_dim(dv, dvj, k0, axis=2))

    init = (jnp.zeros(qg.shape, jnp.float32), jnp.zeros(kg.shape, jnp.float32), jnp.zeros(vg.shape, jnp.float32))
    dq, dk, dv = _while(jnp.int32(0), jnp.int32(nk), k_block, init)
    dq = dq.transpose(0, 3, 1, 2, 4).reshape(b, bq * nq, h, e)[:, :t].astype(q.dtype)
    ungroup = lambda x, like: x.transpose(0, 2, 1, 3)[:, :s].astype(like.dtype)
    return dq, ungroup(dk, k), ungroup(dv, v), None, None, None


flash.defvjp(_flash_fwd, _flash_bwd)


TRIPS = "qednano_mean_trips="  # named-scope prefix of a while loop whose trip count is traced


def trips_scope(mean: float) -> str:
    """Name scope for a while loop with a traced trip count: its mean trip count, which the planner reads from the
    compiled HLO's op_name metadata (plan.analyze_hlo), since XLA cannot know it."""
    return f"{TRIPS}{mean:.6g}"


def flash_block_pairs(t: int, s: int, block: int, q_offset: int = 0) -> int:
    """(query block, key block) pairs `flash` computes for t queries at `q_offset` against s keys: its real work,
    causal skipping included (each pair is 4 * b * h * bq * bk * e matmul FLOPs forward, 10 in the backward)."""
    bq, nq = _blocks(t, block)
    bk, nk = _blocks(s, block)
    return sum(min(nk, (q_offset + min(i * bq + bq, t) - 1) // bk + 1) for i in range(nq))


# ----------------------------------------------------------------------------------------------- splash

def splash(q, k, v, seg, block: int, interpret: bool | None = None):
    """The Pallas TPU splash-attention kernel (causal mask, segment ids, native GQA), one batch row at a time under
    vmap. Block sizes must be multiples of 128; the rows are padded to a multiple of the block. Off TPU it runs in
    Pallas interpret mode (slow: tests only). The kernel does not scale the logits, so q is scaled first."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, e = q.shape
    if block % 128:
        raise ValueError(f"model.attention_chunk: splash attention needs a multiple of 128, got {block}")
    n = -(-t // block) * block
    bs = min(block, n)
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    sizes = sk.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs, block_kv_dkv=bs,
                          block_kv_dkv_compute=bs, block_q_dq=bs, block_kv_dq=bs)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.CausalMask((n, n))] * h), block_sizes=sizes, head_shards=1,
                                q_seq_shards=1, interpret=interpret)
    ones = jnp.ones((b, t), jnp.int32)
    q_seg, k_seg = (ones, ones) if seg is None else seg
    qp = _pad_to(q * jnp.asarray(e ** -0.5, q.dtype), n, 1).transpose(0, 2, 1, 3)  # [b, h, n, e]
    kp, vp = (_pad_to(x, n, 1).transpose(0, 2, 1, 3) for x in (k, v))             # [b, k, n, e]
    ids = sk.SegmentIds(q=_pad_to(q_seg.astype(jnp.int32), n, 1, -1), kv=_pad_to(k_seg.astype(jnp.int32), n, 1, -1))
    out = jax.vmap(lambda q1, k1, v1, i1: kernel(q1, k1, v1, segment_ids=i1))(qp, kp, vp, ids)
    return out.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)


# ----------------------------------------------------------------------------------------------- sequence parallel

def balanced_order(t: int, n: int) -> np.ndarray:
    """Token order for n-way causal sequence parallelism: 2n equal chunks, device r holds chunk r then chunk
    2n-1-r, so each device has one early and one late chunk (the same causal work). order[p] = the natural index
    of the token at layout position p."""
    if t % (2 * n):
        raise ValueError(f"sequence parallelism {n}: row length {t} must be a multiple of {2 * n}")
    c = t // (2 * n)
    chunks = [r for i in range(n) for r in (i, 2 * n - 1 - i)]
    return np.concatenate([np.arange(r * c, (r + 1) * c) for r in chunks])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_f32(x, axis_name):
    """All-gather along the length axis (1) whose transpose, a reduce-scatter, runs in fp32 (XLA:CPU cannot
    reduce-scatter bf16)."""
    return jax.lax.all_gather(x, axis_name, axis=1, tiled=True)


_gather_f32.defvjp(lambda x, axis_name: (_gather_f32(x, axis_name), None),
                   lambda axis_name, _, g: (jax.lax.psum_scatter(g.astype(jnp.float32), axis_name,
                                                                 scatter_dimension=1, tiled=True).astype(g.dtype),))


def sequence_parallel(q, k, v, seg, block: int, *, mesh, seq_axes: tuple[str, ...], q_spec, kv_spec):
    """All-gather context parallelism under `shard_map`: q, k, v [b, t, ., e] in `balanced_order` layout, length
    sharded over `seq_axes`. Each device gathers K, V and the key segment ids over the sequence axes, puts them back
    in natural order, and runs `flash` for each of its two query chunks at that chunk's global offset.

    `q_spec` / `kv_spec` are the full PartitionSpecs of q and k/v (batch and head axes included: leaving them to the
    partitioner would gather every row of the data-parallel group onto each device)."""
    from jax.sharding import PartitionSpec as P

    n = math.prod(mesh.shape[a] for a in seq_axes)
    b, t = q.shape[:2]
    ones = jnp.ones((b, t), jnp.int32)
    q_seg, k_seg = (ones, ones) if seg is None else (seg[0].astype(jnp.int32), seg[1].astype(jnp.int32))
    axis = seq_axes if len(seq_axes) > 1 else seq_axes[0]
    seg_spec = P(q_spec[0], q_spec[1])
    c = t // (2 * n)
    # layout position of each natural chunk: chunk r sits at layout chunk inv[r]
    layout = [r for i in range(n) for r in (i, 2 * n - 1 - i)]
    inv = np.argsort(layout)

    def natural(x):  # [b, t, ...] gathered in layout order -> natural order (static chunk permutation)
        xs = x.reshape(x.shape[0], 2 * n, c, *x.shape[2:])
        return jnp.take(xs, jnp.asarray(inv), axis=1).reshape(x.shape)

    def local(q, k, v, qs, ks):
        r = jax.lax.axis_index(axis)
        k_all, v_all = natural(_gather_f32(k, axis)), natural(_gather_f32(v, axis))
        ks_all = natural(jax.lax.all_gather(ks, axis, axis=1, tiled=True))
        outs = []
        for half, chunk in ((0, r), (1, 2 * n - 1 - r)):
            sl = slice(half * c, (half + 1) * c)
            offsets = tuple(c * (i if half == 0 else 2 * n - 1 - i) for i in range(n))
            outs.append(flash(q[:, sl], k_all, v_all, qs[:, sl], ks_all, (chunk * c).astype(jnp.int32),
                              block or DEFAULT_BLOCK, offsets))
        return jnp.concatenate(outs, axis=1)

    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_seg, k_seg)
