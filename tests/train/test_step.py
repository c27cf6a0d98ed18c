"""The pure train step: every sharding strategy matches one device; accumulation matches one big batch; the SFT
loss is the masked NLL of the full-logits forward; the LR schedules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qednano_jax import sharding
from qednano_jax.config import ModelConfig, OptimConfig
from qednano_jax.model import qwen3
from qednano_jax.train import optim, step as step_lib

CFG = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
                  head_dim=8, logprob_chunk=8)
KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
OPT = OptimConfig(lr=1e-3, warmup_ratio=0.0, weight_decay=0.1, clip_norm=1.0)


def packed_batch(rows: int, t: int = 32, seed: int = 0) -> dict:
    """Random packed rows: 2-3 segments per row, padding at the end, loss on the second half of each segment."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((rows, t), np.int32) for k in KEYS}
    for r in range(rows):
        pos = 0
        for seg in range(1, rng.integers(2, 4) + 1):
            n = int(rng.integers(5, 12))
            if pos + n > t:
                break
            out["tokens"][r, pos:pos + n] = rng.integers(0, CFG.vocab_size, n)
            out["targets"][r, pos:pos + n] = rng.integers(0, CFG.vocab_size, n)
            out["loss_mask"][r, pos + n // 2:pos + n] = 1
            out["segment_ids"][r, pos:pos + n] = seg
            out["positions"][r, pos:pos + n] = np.arange(n)
            pos += n
    return out


def run_steps(mesh_shape, rules, batches, micro: int, devices=None, compiled: bool = False):
    mesh = sharding.make_mesh(mesh_shape, devices)
    opt = optim.make_optimizer(OPT, 10)
    st_sh = step_lib.state_shardings(CFG, opt, mesh, rules)
    state = step_lib.init_state(CFG, opt, step_lib.random_params(CFG, 0, st_sh.params), 0, st_sh)
    m0 = batches[0]["tokens"]
    b_sh = step_lib.batch_shardings(mesh, rules, KEYS, (micro, m0.shape[0] // micro, m0.shape[1]))
    fn = step_lib.make_train_step(CFG, step_lib.sft_loss, opt, optim.schedule(OPT, 10), mesh=mesh, rules=rules,
                                  state_sh=st_sh, batch_sh=b_sh)

    def placed(b):
        mb = jax.device_put(step_lib.split_micro(b, micro), {k: b_sh[k] for k in KEYS})
        mb["denominator"] = jnp.float32(b["loss_mask"].sum())
        return mb

    if compiled:  # train/sft.py's path: compiled ahead, for the first batch's shapes and shardings
        fn = step_lib.compile_step(fn, state, placed(batches[0]))
    losses = []
    for b in batches:
        old, (state, m) = state, fn(state, placed(b))
        assert not compiled or old.params["embed"].is_deleted()  # the compiled step still donates the state
        losses.append(float(m["loss"]))
    return losses, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def single_device():
    batches = [packed_batch(8, seed=s) for s in range(3)]
    return batches, run_steps({"data": 1, "fsdp": 1, "tensor": 1}, sharding.RULE_SETS["dp"], batches, 1,
                              jax.devices()[:1])


SP4 = {"data": 1, "fsdp": 2, "tensor": 1, "sequence": 4}


@pytest.mark.parametrize("strategy", ["dp", "fsdp", "tp", "fsdp_tp", "fsdp_sp", "fsdp_tp_sp", "fsdp_sp4"])
def test_strategy_matches_single_device(single_device, strategy):
    batches, (ref_losses, ref_params, _) = single_device
    shape = SP4 if strategy == "fsdp_sp4" else sharding.MESH_SHAPES[strategy]
    strategy = strategy.removesuffix("4")
    losses, params, state = run_steps(shape, sharding.RULE_SETS[strategy], batches, 1)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # the params really are sharded as the strategy says
    spec = state.params["layers"]["gate_proj"].sharding.spec
    expect = {"dp": (None, None, None), "fsdp": (None, "fsdp", None),  # [layers, mlp, embed]
              "tp": (None, "tensor", None), "fsdp_tp": (None, "tensor", "fsdp"),
              "fsdp_sp": (None, ("fsdp", "sequence"), None), "fsdp_tp_sp": (None, "tensor", ("fsdp", "sequence"))
              }[strategy]
    assert tuple(spec) + (None,) * (3 - len(spec)) == expect


@pytest.mark.parametrize("loss", ["sft", "rl"])
@pytest.mark.parametrize("seq", [2, 4])
def test_sequence_parallel_loss_and_grads_match_one_device(loss, seq):
    """Packed rows whose segments straddle the 2n load-balanced chunks; the RL loss with logprobs, entropy, ratio
    and per-token weights, all length-sharded."""
    from qednano_jax.config import LossConfig
    from qednano_jax.rl.losses import rl_loss_fn

    b = packed_batch(4, t=48, seed=7)
    rng = np.random.default_rng(8)
    b["weights"] = b["loss_mask"].astype(np.float32) * rng.uniform(0.5, 1.5, b["loss_mask"].shape).astype(np.float32)
    b["old_logprobs"] = -rng.uniform(4, 7, b["loss_mask"].shape).astype(np.float32) * b["loss_mask"]
    b["advantages"] = rng.normal(size=b["loss_mask"].shape).astype(np.float32) * b["loss_mask"]
    fn = step_lib.sft_loss if loss == "sft" else rl_loss_fn(LossConfig(entropy_coef=1e-2), 0.8)
    params = qwen3.init_params(CFG, jax.random.PRNGKey(2))
    f = lambda p, mb: fn(CFG, p, mb)[0]
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(f))(params, b)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8 // seq, "tensor": 1, "sequence": seq})
    rules = sharding.RULE_SETS["fsdp_sp"]

    def sharded(p, mb):
        with sharding.use_rules(mesh, rules):
            return jax.value_and_grad(f)(p, mb)

    b_sh = {k: sharding.batch_sharding(mesh, rules, 2, 0, v.shape) for k, v in b.items()}
    got_loss, grads = jax.jit(sharded, in_shardings=(step_lib.param_shardings(CFG, mesh, rules), b_sh))(params, b)
    assert abs(float(got_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        assert np.abs(np.asarray(g) - np.asarray(r)).max() <= 1e-5 * max(1.0, np.abs(np.asarray(r)).max()), \
            jax.tree_util.keystr(path)


def test_ahead_compiled_step_matches_the_jitted_one(single_device):
    """compile_step (train/sft.py's path) gives the jitted step's losses and params, sharded, and still donates
    (run_steps checks each step's input state is deleted)."""
    batches, (ref_losses, ref_params, _) = single_device
    losses, params, _ = run_steps(sharding.MESH_SHAPES["fsdp"], sharding.RULE_SETS["fsdp"], batches, 1,
                                  compiled=True)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_accumulation_equals_big_batch():
    big = packed_batch(8, seed=5)
    shape, rules = sharding.MESH_SHAPES["fsdp"], sharding.RULE_SETS["fsdp"]
    l1, p1, _ = run_steps(shape, rules, [big], 1)
    # 4 micro-batches of 8 rows on 8 data shards: tile the batch 4x so each micro-batch is also 8 rows... instead
    # split the same 8 rows into 4 micro-batches of 2 rows on a 2-way fsdp mesh
    l4, p4, _ = run_steps({"data": 1, "fsdp": 2, "tensor": 1}, rules, [big], 4, jax.devices()[:2])
    np.testing.assert_allclose(l4, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_sft_loss_is_masked_nll_of_full_logits():
    b = packed_batch(2, seed=3)
    params = qwen3.init_params(CFG, jax.random.PRNGKey(1))
    loss_sum, sums = step_lib.sft_loss(CFG, params, {k: jnp.asarray(v) for k, v in b.items()})
    logits = qwen3.forward(CFG, params, b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"])
    lp = jax.nn.log_softmax(logits, -1)
    nll = -np.take_along_axis(np.asarray(lp), b["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss_sum), float((nll * b["loss_mask"]).sum()), rtol=1e-5)
    assert float(sums["loss_tokens"]) == b["loss_mask"].sum()
    assert float(sums["tokens"]) == (b["segment_ids"] > 0).sum()


def test_schedules():
    cos = optim.schedule(OptimConfig(lr=1.0, warmup_ratio=0.1, schedule="cosine", final_lr_ratio=0.1), 100)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(55)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5) and float(cos(100)) == pytest.approx(0.1)
    const = optim.schedule(OptimConfig(lr=1e-6, warmup_ratio=0.0, schedule="constant"), 100)
    assert all(float(const(s)) == pytest.approx(1e-6) for s in (0, 50, 99))


def test_weight_decay_skips_norms():
    opt = optim.make_optimizer(OptimConfig(lr=1.0, weight_decay=0.5, warmup_ratio=0.0, schedule="constant",
                                           clip_norm=0.0), 10)
    params = {"w": jnp.ones(3), "final_norm": jnp.ones(3)}
    upd, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    np.testing.assert_allclose(upd["w"], -0.5)
    np.testing.assert_allclose(upd["final_norm"], 0.0)
    # decay_norms (the released RL stack): every parameter decays, norms included
    opt = optim.make_optimizer(OptimConfig(lr=1.0, weight_decay=0.5, warmup_ratio=0.0, schedule="constant",
                                           clip_norm=0.0, decay_norms=True), 10)
    upd, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    np.testing.assert_allclose(upd["w"], -0.5)
    np.testing.assert_allclose(upd["final_norm"], -0.5)
