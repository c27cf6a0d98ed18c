"""The Qwen3 decoder against transformers' Qwen3ForCausalLM, and its own paths (KV cache, packing, chunking, remat)
against its plain forward. Weights reach our model through load_hf, so the HF mapping is exercised too."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from qwen3_reference import build_hf_qwen3, right_padded, torch_logits

from qednano_jax.config import ModelConfig, from_dict, load_yaml
from qednano_jax.model import qwen3
from qednano_jax.model.hf import load_hf

forward = jax.jit(qwen3.forward, static_argnums=0)
forward_cached = jax.jit(qwen3.forward_cached, static_argnums=0, static_argnames=("attend", "block"))
logits_from_hidden = jax.jit(qwen3.logits_from_hidden, static_argnums=0)

CASES = {  # GQA ratio 2 and 4; head_dim differs from hidden / heads in both
    "tied_gqa2": dict(tie=True, hidden=32, heads=4, kv_heads=2, head_dim=12, theta=10_000.0),
    "untied_gqa4": dict(tie=False, hidden=40, heads=8, kv_heads=2, head_dim=6, theta=5_000_000.0),
}


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """(config, params) of the tied tiny model, shared by the tests of our own code paths."""
    d = tmp_path_factory.mktemp("tied")
    build_hf_qwen3(d, **CASES["tied_gqa2"])
    return load_hf(d)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_on_padded_batch(tmp_path, case):
    model = build_hf_qwen3(tmp_path, **CASES[case])
    cfg, params = load_hf(tmp_path)
    assert cfg.tie_word_embeddings == CASES[case]["tie"] and ("lm_head" in params) != cfg.tie_word_embeddings
    tokens, mask = right_padded(np.random.default_rng(1), [11, 7, 4])
    ref = torch_logits(model, tokens, mask)
    ours = np.asarray(forward(cfg, params, tokens, segment_ids=mask))
    real = mask.astype(bool)
    assert np.abs(ref[real]).max() > 1.0  # logits are O(1), so the tolerance is meaningful
    assert np.abs(ours - ref)[real].max() <= 1e-4


@pytest.mark.parametrize("layers", ["stacked", "per-layer"])
@pytest.mark.parametrize("block", [4, qwen3.DECODE_BLOCK])
def test_kv_cache_decode_matches_full_forward(tied, block, layers):
    """Prefill and decode through the cache read in blocks: with 4-slot blocks the rows' 5-9 positions span two
    and three blocks (online softmax across them), with the default one block. With the layers scanned (stacked)
    and one after another (qwen3.unstack_layers, as the native engine runs on CPU)."""
    cfg, stacked = tied
    params = stacked if layers == "stacked" else qwen3.unstack_layers(stacked)
    prompt = np.array([5, 3, 6])  # right-padded prompts of different lengths
    n_dec = 4
    tokens, mask = right_padded(np.random.default_rng(2), list(prompt + n_dec))
    full = np.asarray(forward(cfg, stacked, tokens, segment_ids=mask))
    p_max, rows = prompt.max(), np.arange(len(prompt))
    prompt_tokens = tokens[:, :p_max] * (np.arange(p_max)[None] < prompt[:, None])
    cache = qwen3.init_cache(cfg, len(prompt), tokens.shape[1])
    pos = np.broadcast_to(np.arange(p_max, dtype=np.int32), prompt_tokens.shape)
    h, cache = forward_cached(cfg, params, prompt_tokens, pos, cache, block=block)
    pre = np.asarray(logits_from_hidden(cfg, params, h))
    real = np.arange(p_max)[None] < prompt[:, None]
    assert np.abs(pre - full[:, :p_max])[real].max() <= 1e-5
    for j in range(n_dec):
        p = (prompt + j)[:, None].astype(np.int32)
        h, cache = forward_cached(cfg, params, tokens[rows[:, None], p], p, cache, block=block)
        step = np.asarray(logits_from_hidden(cfg, params, h))[:, 0]
        assert np.abs(step - full[rows, p[:, 0]]).max() <= 1e-5, f"decode step {j}"


def test_packed_row_matches_sequences_run_apart(tied):
    cfg, params = tied
    lens = [4, 6, 5]
    seqs, _ = right_padded(np.random.default_rng(3), lens)
    packed = np.zeros((1, 16), np.int32)
    seg, pos = np.zeros_like(packed), np.zeros_like(packed)
    start = 0
    for i, n in enumerate(lens):
        packed[0, start:start + n], seg[0, start:start + n], pos[0, start:start + n] = seqs[i, :n], i + 1, np.arange(n)
        start += n
    out = np.asarray(forward(cfg, params, packed, positions=pos, segment_ids=seg))[0]
    for i, n in enumerate(lens):  # each sequence alone, unpadded
        alone = np.asarray(forward(cfg, params, seqs[i:i + 1, :n]))[0]
        got = out[seg[0] == i + 1]
        assert np.abs(got - alone).max() <= 1e-5, f"segment {i + 1}"


def _packed_batch():
    rng = np.random.default_rng(4)
    tokens = rng.integers(3, 96, (2, 16)).astype(np.int32)
    seg = np.array([[1] * 7 + [2] * 9, [1] * 12 + [0] * 4], np.int32)
    pos = np.array([list(range(7)) + list(range(9)), list(range(12)) + [0] * 4], np.int32)
    targets = np.roll(tokens, -1, axis=1)
    return tokens, pos, seg, targets


def _loss_and_grads(cfg, params):
    tokens, pos, seg, targets = _packed_batch()

    @jax.jit
    def run(params):
        def loss(params):
            logits = qwen3.forward(cfg, params, tokens, positions=pos, segment_ids=seg)
            lp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
            return -(lp * (seg > 0)).sum() / (seg > 0).sum(), logits
        return jax.value_and_grad(loss, has_aux=True)(params)

    (value, logits), grads = run(params)
    return np.asarray(logits), jax.tree.map(np.asarray, grads)


@pytest.fixture(scope="module")
def plain(tied):
    cfg, params = tied  # the whole [t, t] mask at once: the reference of every other path
    return _loss_and_grads(dataclasses.replace(cfg, attention_impl="blocked", attention_chunk=0), params)


@pytest.mark.parametrize("change", [{"attention_impl": "flash", "attention_chunk": 5},
                                    {"attention_impl": "blocked", "attention_chunk": 5},
                                    {"attention_impl": "rows", "attention_chunk": 5},
                                    {"attention_impl": "splash", "attention_chunk": 128},
                                    {"remat_policy": "full"}, {"remat_policy": "minimal"}],
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_attention_chunk_and_remat_keep_logits_and_grads(tied, plain, change):
    cfg, params = tied
    logits, grads = _loss_and_grads(dataclasses.replace(cfg, **change), params)
    assert np.abs(logits - plain[0]).max() <= 1e-5
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = plain[1]
        for k in path:
            ref = ref[k.key]
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_token_logprobs_in_chunks_equal_log_softmax(tied):
    cfg, params = tied
    chunked_cfg = dataclasses.replace(cfg, logprob_chunk=5)  # 16 tokens: 4 chunks, the last one padded
    tokens, pos, seg, targets = _packed_batch()
    hidden = jax.jit(qwen3.hidden_states, static_argnums=0)(cfg, params, tokens, positions=pos, segment_ids=seg)
    w = np.random.default_rng(5).normal(size=targets.shape).astype(np.float32)
    temp = 0.7

    def chunked(params, hidden):
        lp, ent = qwen3.token_logprobs(chunked_cfg, params, hidden, targets, temperature=temp, with_entropy=True)
        return (lp * w).sum() + (ent * w[:, ::-1]).sum(), (lp, ent)

    def reference(params, hidden):
        logp = jax.nn.log_softmax(qwen3.logits_from_hidden(cfg, params, hidden) / temp)
        lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        ent = -(jnp.exp(logp) * logp).sum(-1)
        return (lp * w).sum() + (ent * w[:, ::-1]).sum(), (lp, ent)

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, hidden)
    (_, (lp, ent)), g = grad(chunked)
    (_, (lp_ref, ent_ref)), g_ref = grad(reference)
    assert np.abs(np.asarray(lp) - np.asarray(lp_ref)).max() <= 1e-5
    assert np.abs(np.asarray(ent) - np.asarray(ent_ref)).max() <= 1e-5
    # temperature 1, no entropy: the default call
    plain_lp = jax.jit(qwen3.token_logprobs, static_argnums=0)(chunked_cfg, params, hidden, targets)
    logp1 = jax.nn.log_softmax(logits_from_hidden(cfg, params, hidden))
    assert np.abs(np.asarray(plain_lp) - np.take_along_axis(np.asarray(logp1), targets[..., None], -1)[..., 0]).max() <= 1e-5
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_4b_config_has_4_022_468_096_params():
    cfg = from_dict(ModelConfig, load_yaml("model/qwen3-4b-thinking-2507.yaml"))
    shapes = qwen3.abstract_params(cfg)
    assert qwen3.count_params(shapes) == 4_022_468_096
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(
        tuple, qwen3.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def test_init_draws_each_matrix_in_its_earlier_layout():
    """A seed gives the model it gave before the params took HF's [out..., in...] layout: each matrix is drawn
    [in..., out...] and moved, so the tests' and demos' random models did not change."""
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=4, initializer_range=0.5)
    key = jax.random.key(3)
    params = qwen3.init_params(cfg, key)
    leaves = jax.tree_util.tree_flatten_with_path(qwen3.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))[0]
    keys = jax.random.split(key, len(leaves))
    index = {jax.tree_util.keystr(path): i for i, (path, _) in enumerate(leaves)}

    def drawn(name, shape):
        return 0.5 * np.asarray(jax.random.normal(keys[index[f"['layers']['{name}']"]], shape))

    L, D, H, K, E, F = 2, 16, 2, 1, 4, 24
    np.testing.assert_array_equal(params["layers"]["gate_proj"], drawn("gate_proj", (L, D, F)).transpose(0, 2, 1))
    np.testing.assert_array_equal(params["layers"]["down_proj"], drawn("down_proj", (L, F, D)).transpose(0, 2, 1))
    np.testing.assert_array_equal(params["layers"]["q_proj"], drawn("q_proj", (L, D, H, E)).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(params["layers"]["k_proj"], drawn("k_proj", (L, D, K, E)).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(params["layers"]["o_proj"], drawn("o_proj", (L, H, E, D)).transpose(0, 3, 1, 2))
