"""model/attention.py: every implementation against the whole-mask reference on packed causal GQA rows, the
linear memory of flash and splash under the layer scan (compile-only, deterministic), and the causal work count."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qednano_jax.config import ModelConfig
from qednano_jax.model import attention, qwen3


def _reference(q, k, v, q_seg, k_seg, q_offset):
    """Naive fp32 attention in numpy: query i (global q_offset + i) sees key j <= q_offset + i of its segment."""
    b, t, h, e = q.shape
    s, kh = k.shape[1], k.shape[2]
    kr = np.repeat(k, h // kh, axis=2)
    vr = np.repeat(v, h // kh, axis=2)
    sc = np.einsum("bqhe,bshe->bhqs", q, kr) / np.sqrt(e)
    vis = (np.arange(s)[None, :] <= q_offset + np.arange(t)[:, None])[None] & (q_seg[:, :, None] == k_seg[:, None, :])
    sc = np.where(vis[:, None], sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqs,bshe->bqhe", p, vr)


def _packed(rng, b, t, h, kh, e):
    q, k, v = (rng.normal(size=(b, t, n, e)).astype(np.float32) for n in (h, kh, kh))
    seg = np.zeros((b, t), np.int32)
    bounds = [[0, 37, 81], [0, 13, 90, 150]]  # segment starts inside blocks; row 0 ends in padding (segment 0)
    for r, starts in enumerate(bounds):
        for i, s in enumerate(starts):
            seg[r, s:] = i + 1
    seg[0, 131:] = 0
    return q, k, v, seg


@pytest.mark.parametrize("impl,block", [("flash", 16), ("flash", 64), ("blocked", 16), ("rows", 48),
                                        ("splash", 128)])
def test_matches_naive_attention_on_packed_rows(impl, block):
    rng = np.random.default_rng(0)
    b, t, h, kh, e = 2, 173, 4, 2, 8  # 173: no block size divides it
    q, k, v, seg = _packed(rng, b, t, h, kh, e)
    w = rng.normal(size=(b, t, h, e)).astype(np.float32)
    fn = lambda q, k, v: attention.attention(q, k, v, (jnp.asarray(seg), jnp.asarray(seg)), block, impl)
    out, vjp = jax.vjp(jax.jit(fn), q, k, v)
    grads = vjp(jnp.asarray(w))
    ref = _reference(q, k, v, seg, seg, 0)
    assert np.abs(np.asarray(out) - ref).max() <= 1e-5
    # gradients of sum(out * w) against jax's autodiff of the whole-mask attention in fp32
    _, ref_vjp = jax.vjp(lambda q, k, v: attention.reference(q, k, v, (jnp.asarray(seg), jnp.asarray(seg))), q, k, v)
    for g, r, name in zip(grads, ref_vjp(jnp.asarray(w)), "qkv"):
        assert np.abs(np.asarray(g) - np.asarray(r)).max() <= 1e-5, name
        assert np.abs(np.asarray(r)).max() > 0.1, name  # the comparison is not of zeros


def test_flash_query_offset_sees_the_keys_before_it():
    """A query chunk at global offset 40 against the whole row (the sequence-parallel call), offset traced."""
    rng = np.random.default_rng(1)
    q, k, v, seg = _packed(rng, 2, 173, 4, 2, 8)
    qs, off = slice(40, 83), 40
    run = jax.jit(lambda q, k, v, o: attention.flash(q, k, v, jnp.asarray(seg[:, qs]), jnp.asarray(seg), o, 16))
    out = run(q[:, qs], k, v, jnp.int32(off))
    assert np.abs(np.asarray(out) - _reference(q[:, qs], k, v, seg[:, qs], seg, off)).max() <= 1e-5


def test_causal_block_pairs_are_the_blocks_with_visible_entries():
    """The count the planner uses: exactly the block pairs of a dense causal mask holding a visible entry."""
    for t, s, blk, off in [(100, 100, 16, 0), (96, 96, 16, 0), (64, 128, 16, 64), (40, 120, 16, 37)]:
        vis = np.arange(s)[None, :] <= off + np.arange(t)[:, None]
        nq, nk = -(-t // blk), -(-s // blk)
        dense = sum(vis[i * blk:(i + 1) * blk, j * blk:(j + 1) * blk].any() for i in range(nq) for j in range(nk))
        assert attention.flash_block_pairs(t, s, blk, off) == dense, (t, s, blk, off)
    assert attention.flash_block_pairs(45056, 45056, 512, 0) == 88 * 89 // 2


def test_balanced_order_gives_every_shard_the_same_causal_work():
    t, n, blk = 4096, 4, 256
    order = attention.balanced_order(t, n)
    assert sorted(order) == list(range(t))
    c = t // (2 * n)
    work = [attention.flash_block_pairs(c, t, blk, order[r * 2 * c]) +
            attention.flash_block_pairs(c, t, blk, order[r * 2 * c + c]) for r in range(n)]
    assert len(set(work)) == 1
    with pytest.raises(ValueError, match="multiple of 8"):
        attention.balanced_order(100, 4)


def _temp_bytes(impl: str, t: int) -> int:
    cfg = ModelConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=128, remat_policy="full", attention_impl=impl, attention_chunk=512)
    tok = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def loss(p, tok):
        h = qwen3.hidden_states(cfg, p, tok, segment_ids=jnp.ones_like(tok))
        return jnp.sum(qwen3.token_logprobs(cfg, p, h, tok))

    compiled = jax.jit(jax.value_and_grad(loss)).lower(qwen3.abstract_params(cfg), tok).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("impl", ["flash", "splash"])
def test_memory_is_linear_in_row_length_under_the_layer_scan(impl):
    """2 scanned, fully rematerialised layers: temporaries at 16k tokens at most 2.2x those at 8k (quadratic
    attention would be 4x; `blocked` measured 1.4 / 4.4 / 14.8 GiB at 4k / 8k / 16k on this shape)."""
    small, big = _temp_bytes(impl, 8192), _temp_bytes(impl, 16384)
    assert big <= 2.2 * small, (small, big)
    assert big < 2 * 2**30


GPU = jax.default_backend() == "gpu"


@pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU (jax backend 'gpu'); this run has "
                    f"{jax.default_backend()}")
@pytest.mark.parametrize("impl", ["flash", "cudnn", "blocked"])
def test_gpu_implementations_match_the_reference_in_bf16(impl):
    """On a GPU, in bf16 (cuDNN's dtypes), head_dim 128 as Qwen3: packed rows against the fp32 numpy reference."""
    rng = np.random.default_rng(1)
    b, t, h, kh, e = 2, 256, 8, 2, 128
    q, k, v = (rng.normal(size=(b, t, n, e)).astype(np.float32) for n in (h, kh, kh))
    seg = np.ones((b, t), np.int32)
    seg[0, 100:] = 2
    seg[1, 30:] = 2
    seg[1, 200:] = 0
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    cast = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    fn = lambda q, k, v: attention.attention(q, k, v, (jnp.asarray(seg), jnp.asarray(seg)), 128, impl)
    out, vjp = jax.vjp(jax.jit(fn), qb, kb, vb)
    ref = _reference(cast(q), cast(k), cast(v), seg, seg, 0)
    live = seg > 0
    assert np.abs(np.asarray(out, np.float32) - ref)[live].max() <= 3e-2
    w = jnp.asarray(rng.normal(size=(b, t, h, e)), jnp.bfloat16)
    _, ref_vjp = jax.vjp(lambda q, k, v: attention.reference(q, k, v, (jnp.asarray(seg), jnp.asarray(seg))),
                         *(jnp.asarray(cast(x)) for x in (q, k, v)))
    for g, r, name in zip(vjp(w), ref_vjp(w.astype(jnp.float32)), "qkv"):
        r = np.asarray(r)
        assert np.abs(np.asarray(g, np.float32) - r).max() <= 5e-2 * max(np.abs(r).max(), 1.0), name


def test_cudnn_off_a_gpu_is_an_error_naming_the_field():
    if GPU:
        pytest.skip("this run has a GPU")
    with pytest.raises(ValueError, match="model.attention_impl: cudnn needs an NVIDIA GPU"):
        attention.resolve_impl("cudnn")
