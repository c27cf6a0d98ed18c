"""The Qwen3 decoder as pure functions over a params pytree (docs/recipe.md §1).

GQA attention with a per-head RMSNorm on q and k before RoPE, SwiGLU MLP, RMSNorm, tied or untied LM head, no
attention bias. The params are a nested dict of arrays (pure data for jit, donation and orbax); `param_axes` gives
the logical axis names of every leaf (docs/design.md principle 1). The decoder layers are stacked on a leading `layers`
axis and run under `lax.scan`, so 36 layers compile once.

Shape letters: b batch, t query length, s key length, d embed, h query heads, k kv heads, g heads per kv head,
e head_dim, f mlp, v vocab, l layers.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from qednano_jax import sharding
from qednano_jax.config import ConfigError, ModelConfig
from qednano_jax.model import attention
from qednano_jax.sharding import constrain

Params = dict[str, Any]

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "minimal": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "out_proj", "mlp_gate", "mlp_up"),
}


# ----------------------------------------------------------------------------------------------- params

def param_shapes(cfg: ModelConfig) -> Params:
    """Shape of every parameter leaf. A linear weight is [out..., in...], HF's torch Linear layout (so an HF export
    writes each layer's block as it is, with no transpose): q_proj [H, E, D], o_proj [D, H, E], gate_proj [F, D]."""
    L, D, H, K, E, F, V = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           cfg.intermediate_size, cfg.vocab_size)
    shapes = {
        "embed": (V, D),
        "layers": {
            "attn_norm": (L, D), "q_proj": (L, H, E, D), "k_proj": (L, K, E, D), "v_proj": (L, K, E, D),
            "q_norm": (L, E), "k_norm": (L, E), "o_proj": (L, D, H, E),
            "mlp_norm": (L, D), "gate_proj": (L, F, D), "up_proj": (L, F, D), "down_proj": (L, D, F),
        },
        "final_norm": (D,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (V, D)
    return shapes


def param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter leaf (same tree as `param_shapes`)."""
    axes = {
        "embed": ("vocab", "embed"),
        "layers": {
            "attn_norm": ("layers", "norm"),
            "q_proj": ("layers", "heads", "head_dim", "embed"),
            "k_proj": ("layers", "kv_heads", "head_dim", "embed"),
            "v_proj": ("layers", "kv_heads", "head_dim", "embed"),
            "q_norm": ("layers", "head_dim_norm"), "k_norm": ("layers", "head_dim_norm"),
            "o_proj": ("layers", "embed", "heads", "head_dim"),
            "mlp_norm": ("layers", "norm"),
            "gate_proj": ("layers", "mlp", "embed"), "up_proj": ("layers", "mlp", "embed"),
            "down_proj": ("layers", "embed", "mlp"),
        },
        "final_norm": ("norm",),
    }
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("vocab", "embed")
    return axes


# Layer matrices: how many leading (per-layer) axes make the `out` side (model/hf.py reshapes by it). init_params draws
# each one [in..., out...], the layout these params had before they took HF's, so a seed still gives the same model
# (the tests' and demos').
OUT_AXES = {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 1, "gate_proj": 1, "up_proj": 1, "down_proj": 1}


def _normal(key: jax.Array, shape: tuple[int, ...], name: str) -> jax.Array:
    if name not in OUT_AXES:
        return jax.random.normal(key, shape, jnp.float32)
    n, lead = OUT_AXES[name], shape[:1]  # the layers axis
    outs, ins = shape[1:1 + n], shape[1 + n:]
    x = jax.random.normal(key, (*lead, *ins, *outs), jnp.float32)
    return jnp.moveaxis(x, tuple(range(1 + len(ins), x.ndim)), tuple(range(1, 1 + n)))


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random weights: normal(0, initializer_range) matrices, unit norm weights, in `param_dtype`."""
    dtype = jnp.dtype(cfg.param_dtype)
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        name = str(getattr(path[-1], "key", path[-1]))
        if name.endswith("norm"):
            out.append(jnp.ones(shape, dtype))
        else:
            out.append((cfg.initializer_range * _normal(k, shape, name)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def abstract_params(cfg: ModelConfig) -> Params:
    """ShapeDtypeStructs of the params (no memory allocated)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def count_params(params: Params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------------------------- layers

def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in fp32, cast back to x's dtype before the weight (as HF Qwen3RMSNorm)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * y.astype(x.dtype)


def rope(x_bthe: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split ("rotate_half") layout as in HF Qwen3, computed in fp32."""
    e = x_bthe.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    ang = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [b, t, e/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x = x_bthe.astype(jnp.float32)
    x1, x2 = x[..., : e // 2], x[..., e // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_bthe.dtype)


def _layer(cfg: ModelConfig, lp: Params, x_btd, positions_bt, seg, kv_attend=None):
    """One decoder layer; `seg` as in model.attention. `kv_attend(q, k, v) -> a` stores the new k/v in a KV cache
    and returns the attention of q over it ([b, t, heads, e]); without it the layer runs the full forward's causal
    attention."""
    dt = jnp.dtype(cfg.dtype)
    w = lambda name: lp[name].astype(dt)
    h = rms_norm(x_btd, lp["attn_norm"], cfg.rms_norm_eps)
    q = checkpoint_name(_to_heads(h, w("q_proj")), "query_proj")
    k = checkpoint_name(_to_heads(h, w("k_proj")), "key_proj")
    v = checkpoint_name(_to_heads(h, w("v_proj")), "value_proj")
    q = constrain(q, ("act_batch", "act_length", "act_heads", None))
    k = constrain(k, ("act_batch", "act_length", "act_kv_heads", None))
    q = rope(rms_norm(q, lp["q_norm"], cfg.rms_norm_eps), positions_bt, cfg.rope_theta)
    k = rope(rms_norm(k, lp["k_norm"], cfg.rms_norm_eps), positions_bt, cfg.rope_theta)
    a = _self_attention(cfg, q, k, v, seg) if kv_attend is None else kv_attend(q, k, v)
    o = checkpoint_name(_from_heads(a, w("o_proj")), "out_proj")
    x = constrain(x_btd + o, ("act_batch", "act_length", "act_embed"))
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    g = checkpoint_name(jnp.einsum("btd,fd->btf", h, w("gate_proj")), "mlp_gate")
    u = checkpoint_name(jnp.einsum("btd,fd->btf", h, w("up_proj")), "mlp_up")
    hidden = constrain(jax.nn.silu(g) * u, ("act_batch", "act_length", "act_mlp"))
    x = x + jnp.einsum("btf,df->btd", hidden, w("down_proj"))
    return constrain(x, ("act_batch", "act_length", "act_embed"))


def _to_heads(h_btd, w_hed):
    """h @ W.T for a [heads, e, d] projection, as the 2-D matmul of the MLP ([heads * e, d] is the same buffer),
    -> [b, t, heads, e]. Written as one 3-D einsum, XLA:CPU transposed the weight on every call: in the native
    engine's decode loop, q/k/v/o of every layer on every step."""
    b, t, _ = h_btd.shape
    n, e, d = w_hed.shape
    return jnp.einsum("btd,fd->btf", h_btd, w_hed.reshape(n * e, d)).reshape(b, t, n, e)


def _from_heads(a_bthe, w_dhe):
    """a @ W.T for the [d, heads, e] output projection, as a 2-D matmul (see _to_heads) -> [b, t, d]."""
    b, t, n, e = a_bthe.shape
    return jnp.einsum("btf,df->btd", a_bthe.reshape(b, t, n * e), w_dhe.reshape(w_dhe.shape[0], n * e))


def _self_attention(cfg: ModelConfig, q, k, v, seg):
    """The full forward's causal attention: `cfg.attention_impl`, or all-gather sequence parallelism when the
    active rules shard `act_length` (the rows are then in attention.balanced_order; see hidden_states)."""
    mesh, seq_axes = sharding.active_axes("act_length")
    if not seq_axes:
        return attention.attention(q, k, v, seg, cfg.attention_chunk, cfg.attention_impl)
    if attention.resolve_impl(cfg.attention_impl, sequence_parallel=True) != "flash":
        raise ConfigError(f"model.attention_impl: {cfg.attention_impl!r} does not support sequence parallelism "
                          "(a mesh rule for act_length); use flash")
    q_spec = sharding.active_spec(("act_batch", "act_length", "act_heads", None), q.shape)
    kv_spec = sharding.active_spec(("act_batch", "act_length", "act_kv_heads", None), k.shape)
    if q_spec[2] != kv_spec[2]:  # heads split but KV heads not (or the reverse): keep every head group whole
        q_spec, kv_spec = (P(*sp[:2], None, None) for sp in (q_spec, kv_spec))
    q_spec, kv_spec = (P(*sp, *([None] * (4 - len(sp)))) for sp in (q_spec, kv_spec))
    return attention.sequence_parallel(q, k, v, seg, cfg.attention_chunk, mesh=mesh, seq_axes=seq_axes,
                                       q_spec=q_spec, kv_spec=kv_spec)


def _sequence_shards() -> int:
    mesh, seq_axes = sharding.active_axes("act_length")
    return int(np.prod([mesh.shape[a] for a in seq_axes])) if seq_axes else 1


def _maybe_remat(cfg: ModelConfig, fn):
    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy == "none":
        return fn
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


def _embed(cfg: ModelConfig, params: Params, tokens_bt):
    x = jnp.take(params["embed"], tokens_bt, axis=0).astype(jnp.dtype(cfg.dtype))
    return constrain(x, ("act_batch", "act_length", "act_embed"))


def head_weight(cfg: ModelConfig, params: Params) -> jax.Array:
    """[vocab, embed] matrix of the LM head (the embedding when tied)."""
    return params["embed"] if cfg.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(cfg: ModelConfig, params: Params, hidden_btd: jax.Array) -> jax.Array:
    """LM head: fp32 logits [b, t, v]."""
    dt = jnp.dtype(cfg.dtype)
    logits = jnp.einsum("btd,vd->btv", hidden_btd.astype(dt), head_weight(cfg, params).astype(dt),
                        preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", "act_length", "act_vocab"))


# ----------------------------------------------------------------------------------------------- forward

def hidden_states(cfg: ModelConfig, params: Params, tokens: jax.Array, *, positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None) -> jax.Array:
    """Final-norm hidden states [b, t, d] of a full (training) forward.

    Packed rows: `segment_ids` [b, t] (0 = padding) and per-segment `positions`; a token attends to earlier tokens
    of its own segment only. Without segment ids every token of a row is one sequence.
    """
    b, t = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    n = _sequence_shards()
    if n > 1:  # sequence parallelism: rows in load-balanced causal order, put back at the end
        order = attention.balanced_order(t, n)
        tokens, positions = tokens[:, order], positions[:, order]
        segment_ids = None if segment_ids is None else segment_ids[:, order]
    seg = None if segment_ids is None else (segment_ids, segment_ids)

    def body(x, lp):
        return _layer(cfg, lp, x, positions, seg), None

    x, _ = jax.lax.scan(_maybe_remat(cfg, body), _embed(cfg, params, tokens), params["layers"])
    if n > 1:
        x = constrain(x[:, np.argsort(order)], ("act_batch", "act_length", "act_embed"))
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps)


def forward(cfg: ModelConfig, params: Params, tokens: jax.Array, *, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None) -> jax.Array:
    """Logits [b, t, vocab] in fp32. For long rows use `token_logprobs`, which never builds all logits at once."""
    h = hidden_states(cfg, params, tokens, positions=positions, segment_ids=segment_ids)
    return logits_from_hidden(cfg, params, h)


def token_logprobs(cfg: ModelConfig, params: Params, hidden_btd: jax.Array, targets_bt: jax.Array, *,
                   temperature: float = 1.0, with_entropy: bool = False):
    """log p(target) under softmax(logits / temperature), and optionally the entropy of that distribution.

    Computed in sequence chunks of `cfg.logprob_chunk` under `jax.checkpoint`, so only [b, chunk, vocab] logits
    exist at once, in the forward and in the backward pass (docs/design.md scale targets). A row that is one chunk
    keeps its logits for the backward instead of recomputing them (no more memory than its forward holds anyway;
    benchmarks/sft_step.py on the small model: 424-433 -> 456-465 tokens/s). Returns fp32 [b, t] arrays.
    """
    b, t, d = hidden_btd.shape
    s = _sequence_shards()  # under sequence parallelism each device maps over the chunks of its own part
    s = s if t % s == 0 else 1
    tl = t // s
    c = min(cfg.logprob_chunk, tl)
    n = -(-tl // c)
    pad = n * c - tl
    h = jnp.pad(hidden_btd.reshape(b, s, tl, d), ((0, 0), (0, 0), (0, pad), (0, 0)))
    h = constrain(h.reshape(b, s, n, c, d), ("act_batch", "act_length", None, None, "act_embed"))
    y = jnp.pad(targets_bt.reshape(b, s, tl), ((0, 0), (0, 0), (0, pad))).reshape(b, s, n, c)
    h, y = jnp.moveaxis(h, 2, 0), jnp.moveaxis(y, 2, 0)  # [n, b, s, c, (d)]
    dt = jnp.dtype(cfg.dtype)
    w = head_weight(cfg, params)

    def one(args):
        h_bscd, y_bsc = args
        logits = jnp.einsum("bscd,vd->bscv", h_bscd.astype(dt), w.astype(dt), preferred_element_type=jnp.float32)
        logits = logits / temperature
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, y_bsc[..., None], axis=-1)[..., 0] - lse
        if not with_entropy:
            return lp, jnp.zeros_like(lp)
        p = jnp.exp(logits - lse[..., None])
        return lp, lse - jnp.sum(p * logits, axis=-1)

    lp, ent = jax.lax.map(one if n == 1 else jax.checkpoint(one), (h, y))
    back = lambda x: jnp.moveaxis(x, 0, 2).reshape(b, s, n * c)[:, :, :tl].reshape(b, t)
    if not with_entropy:
        return back(lp)
    return back(lp), back(ent)


# ----------------------------------------------------------------------------------------------- KV cache

def unstack_layers(params: Params) -> Params:
    """`params` with `layers` as a list of per-layer trees, for forward_cached.

    Scanning over stacked layers, XLA:CPU copies each layer's weights out of the stack before its matmuls read them:
    in a decode step at 32 rows those copies took about 30% of the time (profile of the native engine, small
    model), as much as the matmuls. Separate per-layer arrays are read where they lie. The cost: the layer is
    compiled once per layer instead of once, and this is a copy of the layer weights."""
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(n)]}


def cache_axes() -> dict:
    return {"k": ("layers", "act_batch", "act_kv_heads", None, None),
            "v": ("layers", "act_batch", "act_kv_heads", None, None)}


DECODE_BLOCK = 64  # cache slots a decode step reads at a time (forward_cached); 128 read more empty slots


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict:
    """Empty KV cache {k, v}: [layers, batch, kv_heads, slots, head_dim] in the compute dtype, `max_len` rounded up
    to whole decode blocks. KV-head-major, so each head's [slots, head_dim] block is contiguous and attention reads
    it without a transposed copy."""
    slots = -(-max_len // DECODE_BLOCK) * DECODE_BLOCK
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, slots, cfg.head_dim)
    return {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}


def forward_cached(cfg: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array, cache: dict, *,
                   attend: int | None = None, block: int = DECODE_BLOCK):
    """Prefill or decode step with a KV cache. Returns (final-norm hidden [b, t, d], new cache).

    Row r's tokens sit at cache slots `positions[r]` (contiguous: positions[r, 0] + arange(t)); a query at
    position p attends to slots <= p. Prompts are right-padded: a padded tail writes junk slots beyond the prompt,
    which the decode steps overwrite before any query can see them.

    The cache rides in the layer scan's carry: layer i scatters its new k/v into slots of the [layers, ...] buffers
    in place. With `attend` (prefill) the layer reads its first `attend` slots as one block; without it (decode)
    it reads the cache in blocks of `block` slots (a divisor of the cache's slots) up to the batch's highest position
    (`attention.attend_blocks`), so a step costs what the cache holds, not its capacity, in one compiled loop.

    `params["layers"]` stacked ([layers, ...], one scanned layer) or, from `unstack_layers`, a list of per-layer
    trees run one after another.
    """
    b, t = tokens.shape
    rows = jnp.arange(b)[:, None]

    def body(carry, layer):
        x, ck, cv = carry
        lp, i = layer
        out = {}

        def kv_attend(q, k, v):
            out["k"] = ck.at[i, rows, :, positions].set(k.astype(ck.dtype))  # updates [b, t, kv_heads, e]
            out["v"] = cv.at[i, rows, :, positions].set(v.astype(cv.dtype))
            if attend is None:
                return attention.attend_blocks(q, out["k"], out["v"], i, positions, block)
            read = lambda c: jax.lax.dynamic_slice(c, (i, 0, 0, 0, 0), (1, b, c.shape[2], attend, c.shape[4]))[0]
            keys, values = read(out["k"]), read(out["v"])
            return attention.attend(q, keys, values, attention.mask(attend, positions, None), kv_major=True)

        x = _layer(cfg, lp, x, positions, None, kv_attend)
        return (x, out["k"], out["v"]), None

    carry = (_embed(cfg, params, tokens), cache["k"], cache["v"])
    if isinstance(params["layers"], (list, tuple)):  # unstack_layers: the layers one after another
        for i, lp in enumerate(params["layers"]):
            carry, _ = body(carry, (lp, i))
        x, k, v = carry
    else:
        (x, k, v), _ = jax.lax.scan(body, carry, (params["layers"], jnp.arange(cfg.num_layers)))
    return rms_norm(x, params["final_norm"], cfg.rms_norm_eps), {"k": k, "v": v}
