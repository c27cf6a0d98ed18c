"""rl/losses.py against references written here in numpy (float64): values and gradients w.r.t. logp_new, for every
policy loss and aggregation mode, on packed rows, in every clip region (docs/recipe.md §3)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qednano_jax.config import LossConfig
from qednano_jax.rl import losses

# ----------------------------------------------------------------------------------------------- hand-made step
# Two micro-batches of packed rows [2, 8]. seg 0 = padding; mask = completion tokens (prompt tokens carry no loss).
SEG = [np.array([[1, 1, 1, 2, 2, 2, 2, 0],
                 [1, 1, 1, 1, 1, 1, 0, 0]]),
       np.array([[1, 1, 2, 2, 3, 3, 3, 3],
                 [1, 1, 1, 1, 1, 1, 1, 1]])]
MASK = [np.array([[0, 1, 1, 0, 1, 1, 1, 0],
                  [0, 0, 1, 1, 1, 1, 0, 0]]),
        np.array([[0, 1, 0, 1, 0, 1, 1, 1],
                  [0, 1, 1, 1, 1, 1, 1, 1]])]
# one advantage per (micro-batch, row, segment)
ADV = {(0, 0, 1): 0.6, (0, 0, 2): -0.4, (0, 1, 1): 0.3, (1, 0, 1): -0.7, (1, 0, 2): 0.5, (1, 0, 3): -0.2,
       (1, 1, 1): 0.9}
# ratios spread over every region of the eps = 0.2/0.28 and eps = 4 clips (none on a boundary)
RATIOS = np.array([0.05, 0.5, 0.7, 0.9, 1.1, 1.25, 1.5, 2.0, 6.0, 0.3, 1.05, 3.0, 0.85, 7.5, 0.6, 1.4])


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    k = 0
    for mb, (seg, mask) in enumerate(zip(SEG, MASK)):
        lold = rng.uniform(-3.0, -0.1, seg.shape)
        ratio = np.ones(seg.shape)
        for idx in zip(*np.nonzero(mask)):
            ratio[idx] = RATIOS[k % len(RATIOS)]
            k += 1
        lnew = lold + np.log(ratio)
        adv = np.zeros(seg.shape)
        for (m, r, s), a in ADV.items():
            if m == mb:
                adv[r][seg[r] == s] = a
        ent = rng.uniform(0.1, 2.0, seg.shape)
        lold = np.where(mask == 1, lold, -np.inf)  # padding may hold garbage: it must not reach loss or gradient
        out.append(dict(lnew=lnew, lold=lold, adv=adv, ent=ent, seg=seg, mask=mask))
    return out


# ----------------------------------------------------------------------------------------------- numpy references

def np_token_loss(kind, lnew, lold, adv, ent, eps_low, eps_high, ent_c):
    """Per-token loss and its analytic derivative w.r.t. lnew (meaningful on loss tokens only)."""
    with np.errstate(invalid="ignore", over="ignore"):  # padding holds lold = -inf
        return _np_token_loss(kind, lnew, lold, adv, ent, eps_low, eps_high, ent_c)


def _np_token_loss(kind, lnew, lold, adv, ent, eps_low, eps_high, ent_c):
    ratio = np.exp(lnew - lold)
    if kind == "ppo":
        unclipped = ratio * adv
        clipped = np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv
        surr = np.minimum(unclipped, clipped)
        inside = (ratio >= 1 - eps_low) & (ratio <= 1 + eps_high)
        dsurr = np.where((unclipped <= clipped) | inside, adv * ratio, 0.0)
        loss, grad = -surr, -dsurr
    else:  # reinforce
        loss, grad = -adv * lnew, -adv
    return loss - ent_c * ent, grad


def np_sequences(inputs):
    """[(micro-batch, row, token positions)] of every sequence, found by walking the rows."""
    seqs = []
    for mb, x in enumerate(inputs):
        for r in range(x["seg"].shape[0]):
            for s in sorted(set(x["seg"][r].tolist()) - {0}):
                pos = [t for t in range(x["seg"].shape[1]) if x["seg"][r, t] == s and x["mask"][r, t]]
                if pos:
                    seqs.append((mb, r, pos))
    return seqs


def np_step_loss(mode, per_token, inputs, constant):
    """The step loss straight from the definition of each mode."""
    seqs = np_sequences(inputs)
    seq_tokens = [[per_token[mb][r, t] for t in pos] for mb, r, pos in seqs]
    if mode == "token-mean":
        return np.mean(np.concatenate(seq_tokens))
    if mode == "sequence-mean-token-mean":
        return np.mean([np.mean(s) for s in seq_tokens])
    if mode == "sequence-mean-token-sum":
        return np.mean([np.sum(s) for s in seq_tokens])
    return np.sum(np.concatenate(seq_tokens)) / constant


def jax_step_loss(mode, kind, cfg, inputs, lnews, constant=None):
    den = losses.denominator(mode, [x["mask"] for x in inputs], [x["seg"] for x in inputs], constant)
    total, sums = 0.0, None
    for x, lnew in zip(inputs, lnews):
        w = losses.token_weights(x["mask"], x["seg"], mode)
        ls, ms = losses.rl_loss(kind, lnew, jnp.asarray(x["lold"], jnp.float32), jnp.asarray(x["adv"], jnp.float32),
                                w, cfg, entropy_bt=jnp.asarray(x["ent"], jnp.float32))
        total = total + ls / den
        sums = ms if sums is None else jax.tree.map(jnp.add, sums, ms)
    return total, sums


CASES = [("ppo", 0.2, 0.28, 0.0), ("ppo", 4.0, 4.0, 1e-4), ("ppo", 0.2, 0.2, 1e-2), ("reinforce", 0.2, 0.2, 1e-3)]


@pytest.mark.parametrize("mode", losses.AGGREGATIONS)
@pytest.mark.parametrize("kind,eps_low,eps_high,ent_c", CASES)
def test_step_loss_and_gradient_match_numpy(mode, kind, eps_low, eps_high, ent_c):
    inputs = make_inputs()
    cfg = LossConfig(policy_loss=kind, clip_eps_low=eps_low, clip_eps_high=eps_high, entropy_coef=ent_c,
                     aggregation=mode)
    constant = 13.0

    def np_total(lnews):
        per_tok = [np_token_loss(kind, ln, x["lold"], x["adv"], x["ent"], eps_low, eps_high, ent_c)[0]
                   for ln, x in zip(lnews, inputs)]
        return np_step_loss(mode, per_tok, inputs, constant)

    lnews = [x["lnew"] for x in inputs]
    lnews32 = [jnp.asarray(ln, jnp.float32) for ln in lnews]
    value, grads = jax.value_and_grad(lambda ls: jax_step_loss(mode, kind, cfg, inputs, ls, constant)[0])(lnews32)
    np.testing.assert_allclose(float(value), np_total(lnews), rtol=2e-5, atol=1e-6)

    # gradient: numpy central finite differences of the reference step loss, one logprob at a time (float64)
    h = 1e-6
    for mb, g in enumerate(grads):
        g = np.asarray(g)
        assert np.all(np.isfinite(g))
        fd = np.zeros_like(lnews[mb])
        for idx in np.ndindex(fd.shape):
            up = [ln.copy() for ln in lnews]
            dn = [ln.copy() for ln in lnews]
            up[mb][idx] += h
            dn[mb][idx] -= h
            fd[idx] = (np_total(up) - np_total(dn)) / (2 * h)
        np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.28), (4.0, 4.0), (0.2, 0.2)])
def test_ppo_token_loss_regions_and_clip_fraction(eps_low, eps_high):
    """Every (sign of A) x (ratio below / inside / above the clip range) cell against the analytic numpy gradient."""
    ratio = np.array([0.05, 0.5, 0.9, 1.1, 1.5, 6.0] * 2)
    adv = np.array([0.7] * 6 + [-0.7] * 6)
    lold = np.full(12, -1.3)
    lnew = lold + np.log(ratio)
    cfg = LossConfig(clip_eps_low=eps_low, clip_eps_high=eps_high, entropy_coef=0.0)
    ref_loss, ref_grad = np_token_loss("ppo", lnew, lold, adv, 0.0, eps_low, eps_high, 0.0)
    w = np.ones((1, 12), np.float32)

    def f(ln):
        return losses.rl_loss("ppo", ln, jnp.asarray(lold[None], jnp.float32), jnp.asarray(adv[None], jnp.float32),
                              w, cfg)

    (loss_sum, sums), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(lnew[None], jnp.float32))
    np.testing.assert_allclose(float(loss_sum), ref_loss.sum(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g)[0], ref_grad, rtol=1e-5, atol=1e-7)
    # clipped = the gradient is zeroed by the clip
    expected_clipped = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - eps_low))
    assert np.array_equal(expected_clipped, ref_grad == 0)
    assert float(sums["clip_fraction"]) == expected_clipped.sum()
    assert float(sums["tokens"]) == 12
    if eps_low == 4.0:  # the paper's eps: only ratio > 5 with A > 0 is clipped (docs/recipe.md §3)
        assert expected_clipped.tolist() == [False] * 5 + [True] + [False] * 6


def test_token_weights_and_denominators_on_packed_rows():
    inputs = make_inputs()
    masks, segs = [x["mask"] for x in inputs], [x["seg"] for x in inputs]
    n_tok = sum(int(m.sum()) for m in masks)
    n_seq = len(np_sequences(inputs))
    assert n_seq == 7
    assert losses.denominator("token-mean", masks, segs) == n_tok
    assert losses.denominator("sequence-mean-token-mean", masks, segs) == n_seq
    assert losses.denominator("sequence-mean-token-sum", masks, segs) == n_seq
    assert losses.denominator("token-sum-constant", masks, segs, constant=1024) == 1024
    w = losses.token_weights(masks[0], segs[0], "sequence-mean-token-mean")
    np.testing.assert_allclose(w[0], [0, .5, .5, 0, 1 / 3, 1 / 3, 1 / 3, 0])
    np.testing.assert_allclose(w[1], [0, 0, .25, .25, .25, .25, 0, 0])
    for mode in ("token-mean", "sequence-mean-token-sum", "token-sum-constant"):
        assert np.array_equal(losses.token_weights(masks[1], segs[1], mode), masks[1].astype(np.float32))
    # without segment ids each row is one sequence
    assert losses.denominator("sequence-mean-token-sum", [masks[0]]) == 2
    assert losses.denominator("token-mean", np.zeros((2, 4))) == 1.0  # empty step: loss 0, not NaN
    with pytest.raises(ValueError, match="aggregation_constant"):
        losses.denominator("token-sum-constant", masks, segs)
    with pytest.raises(ValueError, match="segment 0"):
        losses.token_weights(np.ones((1, 3)), np.array([[1, 0, 1]]), "sequence-mean-token-mean")
    with pytest.raises(ValueError, match="rl.loss.aggregation"):
        losses.token_weights(masks[0], segs[0], "mean")


def test_metric_sums_match_numpy():
    inputs = make_inputs()
    cfg = LossConfig(clip_eps_low=0.2, clip_eps_high=0.28)
    _, sums = jax_step_loss("token-mean", "ppo", cfg, inputs, [jnp.asarray(x["lnew"], jnp.float32) for x in inputs])
    metric_np = {}
    sel = [x["mask"] == 1 for x in inputs]
    cat = lambda f: np.concatenate([f(x)[s] for x, s in zip(inputs, sel)])  # noqa: E731
    ratio = cat(lambda x: np.exp(x["lnew"] - x["lold"]))
    adv = cat(lambda x: x["adv"])
    metric_np.update(tokens=len(ratio), ratio=ratio.mean(), entropy=cat(lambda x: x["ent"]).mean(),
                     advantage=adv.mean(), logprob_gap=np.abs(np.log(ratio)).mean(),
                     clip_fraction=(((adv > 0) & (ratio > 1.28)) | ((adv < 0) & (ratio < 0.8))).mean())
    got = losses.metric_means(sums)
    for k, v in metric_np.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert 0 < got["clip_fraction"] < 1


@pytest.mark.parametrize("std", [False, True])
def test_group_advantages(std):
    r = np.array([0, 1, 1, 0, 3 / 7, 3 / 7, 3 / 7, 3 / 7, 1, 0, 0, 0], np.float64)
    g = r.reshape(3, 4)
    ref = g - g.mean(1, keepdims=True)
    if std:
        ref = ref / (g.std(1, keepdims=True) + 1e-6)
    got = losses.group_advantages(r, 4, divide_by_std=std, eps=1e-6)
    np.testing.assert_allclose(np.asarray(got), ref.reshape(-1), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[4:8] == 0)  # a group with equal rewards is kept with advantage 0
    with pytest.raises(ValueError, match="group_size=5"):
        losses.group_advantages(r, 5)


def test_registry_and_config_agree():
    fields = {f.name: f for f in dataclasses.fields(LossConfig)}
    assert set(fields["policy_loss"].metadata["choices"]) == set(losses.POLICY_LOSSES)
    assert tuple(fields["aggregation"].metadata["choices"]) == losses.AGGREGATIONS
    with pytest.raises(ValueError, match="registered twice"):
        losses.register_policy_loss("ppo")(losses.ppo_loss)
    with pytest.raises(ValueError, match="entropy_coef"):
        losses.rl_loss("ppo", jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1, 2)), np.ones((1, 2)), LossConfig())


def test_rl_loss_jits_with_static_config():
    x = make_inputs()[0]
    cfg = LossConfig(clip_eps_low=0.2, clip_eps_high=0.28)
    w = losses.token_weights(x["mask"], x["seg"], "token-mean")
    f = jax.jit(losses.rl_loss, static_argnums=(0, 5))
    args = [jnp.asarray(x[k], jnp.float32) for k in ("lnew", "lold", "adv")]
    eager, _ = losses.rl_loss("ppo", *args, w, cfg, entropy_bt=jnp.asarray(x["ent"], jnp.float32))
    jitted, _ = f("ppo", *args, w, cfg, entropy_bt=jnp.asarray(x["ent"], jnp.float32))
    np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-6)


def test_loss_on_gathered_positions_equals_the_full_row_loss():
    """rl_loss_fn with loss_tokens_per_row runs the LM head on each row's loss positions only; loss, metric sums
    and gradients equal those of the LM head over every position (the packer keeps rows within the cap)."""
    from qednano_jax.config import ModelConfig
    from qednano_jax.model import qwen3
    from qednano_jax.rl import batch
    from qednano_jax.rollout.base import Completion
    cfg = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    rng = np.random.default_rng(0)
    groups = []
    for g in range(3):
        lengths = rng.integers(1, 6, 2)
        comps = [Completion(token_ids=rng.integers(1, 256, n).tolist(), logprobs=(-3 * rng.random(n)).tolist(),
                            finish_reason="stop", text="", weight_version="0", prompt_tokens=0) for n in lengths]
        groups.append(batch.Group(prompt_ids=rng.integers(1, 256, 4 + 3 * g).tolist(), completions=comps,
                                  rewards=rng.random(2).tolist()))
    loss_cfg = LossConfig(entropy_coef=1e-2, aggregation="sequence-mean-token-mean")
    host, _ = batch.build_train_batch(groups, loss_cfg, seq_len=32, micro_batch_rows=2, samples_per_step=6,
                                      loss_tokens_per_row=6)
    assert host["valid"].sum() >= 2 and (host["weights"] != 0).sum(axis=-1).max() <= 6
    params = qwen3.init_params(cfg, jax.random.PRNGKey(1))
    results = []
    for k in (None, 6):
        fn = losses.rl_loss_fn(loss_cfg, 0.8, k)
        def total(p):
            out = [fn(cfg, p, {key: jnp.asarray(v[m]) for key, v in host.items() if key not in ("valid", "denominator")})
                   for m in range(int(host["valid"].sum()))]
            return sum(o[0] for o in out), jax.tree.map(lambda *x: sum(x), *[o[1] for o in out])
        (loss, sums), grads = jax.value_and_grad(total, has_aux=True)(params)
        results.append((loss, sums, grads))
    (l0, s0, g0), (l1, s1, g1) = results
    assert float(s0["tokens"]) == float((host["weights"] != 0).sum()) == float(s1["tokens"])
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    for key in s0:
        np.testing.assert_allclose(float(s1[key]), float(s0[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
