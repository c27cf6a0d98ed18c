"""Native engine (qednano_jax/rollout/native.py): parity with transformers generate and with the model's forward,
sampling masks against hand-computed distributions, determinism, stop ids, bucketing, sharding, refit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qednano_jax.config import ConfigError, RolloutConfig, from_dict
from qednano_jax.data.tokenizer import load_tokenizer, prompt_ids
from qednano_jax.model import qwen3
from qednano_jax.model.hf import load_hf
from qednano_jax.rollout import SamplingParams, make_rollout
from qednano_jax.rollout.native import (NativeRollout, generate_tokens, sample_tokens,
                                         sampling_logprobs)
from qednano_jax.sharding import RULE_SETS, make_mesh
from rollout_reference import forward_logprobs


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    cfg, params = load_hf(tiny_hf_dir)
    tok = load_tokenizer(tiny_hf_dir)
    prompts = [prompt_ids(tok, "Prove that n^2 is even."), tok("Let n = 3. Then")["input_ids"],
               tok("By induction on n, the sum")["input_ids"]]
    return cfg, params, tok, prompts


@pytest.fixture(scope="module")
def engine(model):
    cfg, params, tok, _ = model
    return make_rollout(RolloutConfig(backend="native", max_batch=8), cfg, params, tok)


def test_greedy_matches_transformers_generate(model, engine, tiny_hf_dir):
    from transformers import AutoModelForCausalLM
    cfg, params, tok, prompts = model
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32).eval()
    out = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0))
    for p, (c,) in zip(prompts, out):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=16, do_sample=False, temperature=None, top_p=None, top_k=None)
        assert c.token_ids == ref[0, len(p):].tolist()
        assert c.finish_reason == ("stop" if c.token_ids[-1] in engine.eos_ids else "length")
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.prompt_tokens == len(p) and c.weight_version == "0"


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_forward(model, engine, temperature):
    cfg, params, _, prompts = model
    sp = SamplingParams(max_new_tokens=12, temperature=temperature, seed=5)
    for p, group in zip(prompts, engine.generate(prompts, sp, n=2)):
        for c in group:
            ref = forward_logprobs(cfg, params, p, c.token_ids, temperature)
            np.testing.assert_allclose(c.logprobs, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_long_generation_across_cache_blocks_keeps_forward_logprobs(model, engine, temperature):
    """Each decode step reads the cache in DECODE_BLOCK-slot blocks up to the highest position; a completion that
    runs into the second block still has the full forward's logprobs, so the steps read the right slots."""
    cfg, params, tok, _ = model
    p = tok("Let n = 3. Then")["input_ids"]
    (c,) = engine.generate([p], SamplingParams(max_new_tokens=150, temperature=temperature, seed=2))[0]
    assert len(p) + len(c.token_ids) > qwen3.DECODE_BLOCK, len(c.token_ids)
    np.testing.assert_allclose(c.logprobs, forward_logprobs(cfg, params, p, c.token_ids, temperature), atol=1e-5,
                               rtol=0)

def test_dropping_finished_rows_keeps_every_completion(model):
    """Rows that finish at different steps: the compacting decode (8 -> 4 -> 2 -> 1 rows) gives each row the tokens,
    logprobs, counts and stop flags of the same program without compaction."""
    cfg, params, _, prompts = model
    b, p, max_new = 8, 16, 24
    tokens = np.zeros((b, p), np.int32)
    lengths = np.ones(b, np.int32)
    for i in range(b):
        prompt = prompts[i % len(prompts)][:p]
        tokens[i, :len(prompt)], lengths[i] = prompt, len(prompt)
    args = (tokens, lengths, np.full(b, 7, np.uint32), np.arange(b, dtype=np.int32),
            np.where(np.arange(b) % 2, 0.9, 0.0).astype(np.float32), np.ones(b, np.float32),
            np.full(b, -1, np.int32), np.array([1, 3, 24, 5, 2, 9, 4, 17], np.int32), np.full((b, 1), -1, np.int32))
    ref = jax.device_get(generate_tokens(cfg, params, *args, max_new=max_new, min_batch=None))
    got = jax.device_get(generate_tokens(cfg, params, *args, max_new=max_new, min_batch=1))
    np.testing.assert_array_equal(ref[2], args[7])  # no stop ids: each row runs to its own max_new_tokens
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got[2], ref[2])
    np.testing.assert_array_equal(got[3], ref[3])


def test_sampling_reproducible_at_seed(model, engine):
    _, _, _, prompts = model
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=11)
    a = engine.generate(prompts, sp, n=3)
    b = engine.generate(prompts, sp, n=3)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    assert [[c.logprobs for c in g] for g in a] == [[c.logprobs for c in g] for g in b]
    assert len({tuple(c.token_ids) for c in a[0]}) > 1  # the n samples of one prompt differ
    other = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50,
                                                    seed=12), n=3)
    assert [[c.token_ids for c in g] for g in other] != [[c.token_ids for c in g] for g in a]
    # unseeded calls draw fresh randomness
    free = SamplingParams(max_new_tokens=10, temperature=1.0)
    assert engine.generate(prompts, free)[0][0].token_ids != engine.generate(prompts, free)[0][0].token_ids


P = np.array([0.5, 0.2, 0.15, 0.1, 0.05])


@pytest.mark.parametrize("temperature,top_p,top_k,expected", [
    (1.0, 1.0, -1, P),
    (1.0, 1.0, 2, np.array([5, 2, 0, 0, 0]) / 7),
    (1.0, 0.6, -1, np.array([5, 2, 0, 0, 0]) / 7),          # mass before token 3 is 0.7 > 0.6
    (1.0, 0.75, -1, np.array([.5, .2, .15, 0, 0]) / .85),
    (1.0, 0.75, 2, np.array([5, 2, 0, 0, 0]) / 7),          # intersection of both sets
    (1.0, 0.3, -1, np.array([1, 0, 0, 0, 0.])),             # the top token is always kept
    (2.0, 1.0, 3, np.sqrt(P[:3]) / np.sqrt(P[:3]).sum() * np.array([1, 1, 1])),
])
def test_sampling_distribution_matches_hand_computed(temperature, top_p, top_k, expected):
    expected = np.pad(expected, (0, 5 - len(expected)))
    logits = jnp.asarray(np.log(P)[None] + 3.0)  # a shift changes nothing
    lp = sampling_logprobs(logits, jnp.array([temperature]), jnp.array([top_p]), jnp.array([top_k]))
    np.testing.assert_allclose(np.exp(np.asarray(lp[0])), expected, atol=1e-6)
    # the sampler draws from exactly that distribution, and reports logprobs under softmax(logits / T)
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    tok, blp = sample_tokens(jnp.repeat(logits, n, 0), jnp.full(n, temperature), jnp.full(n, top_p),
                             jnp.full(n, top_k, jnp.int32), keys)
    freq = np.bincount(np.asarray(tok), minlength=5) / n
    np.testing.assert_allclose(freq, expected, atol=0.015)
    tempered = np.log(P ** (1 / temperature) / (P ** (1 / temperature)).sum())
    np.testing.assert_allclose(np.asarray(blp), tempered[np.asarray(tok)], atol=1e-5)


def test_greedy_rows_take_argmax_with_untempered_logprob():
    logits = jnp.asarray(np.log(P)[None])
    tok, lp = sample_tokens(logits, jnp.array([0.0]), jnp.array([0.5]), jnp.array([3]), jax.random.split(
        jax.random.key(0), 1))
    assert int(tok[0]) == 0 and abs(float(lp[0]) - np.log(0.5)) < 1e-6


def test_stop_ids_and_max_new_tokens(model, engine):
    _, _, _, prompts = model
    greedy = engine.generate(prompts[:1], SamplingParams(max_new_tokens=12, temperature=0))[0][0]
    stop = greedy.token_ids[4]
    first = greedy.token_ids.index(stop)
    c = engine.generate(prompts[:1], SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(stop,)))[0][0]
    assert c.token_ids == greedy.token_ids[:first + 1] and c.finish_reason == "stop"
    short = engine.generate(prompts[:1], SamplingParams(max_new_tokens=3, temperature=0))[0][0]
    assert short.token_ids == greedy.token_ids[:3] and short.finish_reason == "length"


def test_bucketed_shapes_do_not_recompile(model, engine):
    _, _, tok, _ = model
    engine.generate([tok("Let n = 1")["input_ids"]], SamplingParams(max_new_tokens=5, temperature=0))
    size = generate_tokens._cache_size()
    # other prompt lengths, batch size, max_new_tokens and sampling params within the same buckets
    engine.generate([tok("Let n = 12. Then n^2")["input_ids"], [5, 6], [7]],
                    SamplingParams(max_new_tokens=9, temperature=0.8, top_p=0.9, top_k=4, seed=1))
    assert generate_tokens._cache_size() == size


def test_sharded_engine_matches_single_device(model, engine):
    cfg, params, tok, prompts = model
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    sharded = NativeRollout(cfg, params, tok, max_batch=8, mesh=mesh, rules=RULE_SETS["fsdp"])
    assert sharded.params["embed"].sharding.spec[0] is not None  # vocab rows split over fsdp
    sp = SamplingParams(max_new_tokens=8, temperature=0.9, seed=3)
    a, b = sharded.generate(prompts, sp, n=2), engine.generate(prompts, sp, n=2)
    for ga, gb in zip(a, b):
        for ca, cb in zip(ga, gb):
            assert ca.token_ids == cb.token_ids
            np.testing.assert_allclose(ca.logprobs, cb.logprobs, atol=1e-5)


def test_refit_swaps_params(model):
    cfg, params, tok, prompts = model
    eng = NativeRollout(cfg, params, tok)
    sp = SamplingParams(max_new_tokens=8, temperature=0)
    before = eng.generate(prompts, sp)
    new = qwen3.init_params(cfg, jax.random.key(99))
    res = eng.refit(new, "step-1")
    after = eng.generate(prompts, sp)
    assert eng.weight_version == res.weight_version == "step-1"
    assert all(g[0].weight_version == "step-1" for g in after)
    assert [g[0].token_ids for g in after] != [g[0].token_ids for g in before]
    fresh = NativeRollout(cfg, new, tok).generate(prompts, sp)
    assert [g[0].token_ids for g in after] == [g[0].token_ids for g in fresh]


def test_bad_input_errors_name_the_row(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match="prompt 0 has token id 100000"):
        engine.generate([[1, 100000]], SamplingParams())
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=0)
    with pytest.raises(ConfigError, match="rollout.backend"):
        from_dict(RolloutConfig, {"backend": "vllm"}, where="rollout.")
