"""orbax checkpoints: a full TrainState round-trips onto its shardings with the data state and extra; an
interrupted save (tmp dir, or a process killed while writing) is never the step resumed from."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from qednano_jax import sharding
from qednano_jax.config import ModelConfig, OptimConfig
from qednano_jax.train import checkpoint as ckpt_lib, optim, step as step_lib

CFG = ModelConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                  head_dim=8)


def _state(mesh, rules, seed):
    opt = optim.make_optimizer(OptimConfig(), 10)
    sh = step_lib.state_shardings(CFG, opt, mesh, rules)
    return step_lib.init_state(CFG, opt, step_lib.random_params(CFG, seed, sh.params), seed, sh), sh, opt


def test_round_trip_onto_shardings(tmp_path):
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rules = sharding.RULE_SETS["fsdp"]
    state, sh, opt = _state(mesh, rules, 1)
    ck = ckpt_lib.Checkpointer(tmp_path, every=2, keep=2)
    assert not ck.save(1, state.to_dict(), data_state={"next": 1})  # not due
    assert ck.save(2, state.to_dict(), data_state={"next": 2}, extra={"weight_version": 7})
    ck.close()
    ck = ckpt_lib.Checkpointer(tmp_path, every=2, keep=2)
    assert ck.latest_step() == 2
    other, _, _ = _state(mesh, rules, 2)
    tree, data, extra = ck.restore(2, ckpt_lib.abstract_like(other.to_dict(), sh.to_dict()))
    assert data == {"next": 2} and extra == {"weight_version": 7}
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(state.to_dict())):
        np.testing.assert_array_equal(a, b)
    assert tree["params"]["embed"].sharding == sh.params["embed"]
    ck.close()


def test_unfinalised_step_is_never_resumed(tmp_path):
    ck = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3)
    ck.save(1, {"a": jnp.arange(4)}, data_state={"n": 1})
    ck.close()
    (tmp_path / "2.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)  # a save that never finalised
    ck = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3)
    assert ck.latest_step() == 1
    tree, data, _ = ck.restore(1, {"a": jax.ShapeDtypeStruct((4,), jnp.int32)})
    np.testing.assert_array_equal(tree["a"], np.arange(4)) and data == {"n": 1}
    ck.close()


def test_process_killed_during_async_save(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, jax.numpy as jnp
        from qednano_jax.train.checkpoint import Checkpointer
        ck = Checkpointer({str(tmp_path)!r}, every=1, keep=3)
        ck.save(1, {{"a": jnp.ones((4,))}}, data_state={{"n": 1}})
        ck.wait()
        ck.save(2, {{"a": jnp.ones((64, 1024, 1024))}}, data_state={{"n": 2}})  # 256 MB, written in background
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == -signal.SIGKILL
    ck = ckpt_lib.Checkpointer(tmp_path, every=1, keep=3)
    assert ck.latest_step() == 1
    _, data, _ = ck.restore(1, {"a": jax.ShapeDtypeStruct((4,), jnp.float32)})
    assert data == {"n": 1}
    ck.close()
