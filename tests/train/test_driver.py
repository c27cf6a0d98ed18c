"""train/driver.py: the run-dir lock, the resume check of the saved config, atomic exports, the non-finite guard of
the train step, and metrics that log each step once after a resume."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from qednano_jax import sharding
from qednano_jax.config import ConfigError, ModelConfig, OptimConfig, load_config, to_dict
from qednano_jax.train import driver, metrics, optim, step as step_lib


def _cfg(run_dir, *extra):
    return load_config(None, [f"train.run_dir={run_dir}", *extra])


def test_run_closes_what_the_loop_registered_and_releases_the_lock_when_the_loop_raises(tmp_path):
    import signal
    cfg = _cfg(tmp_path, "train.progress=false", "train.log_every=3", "train.steps=10")
    closed, before = [], signal.getsignal(signal.SIGTERM)

    class Resource:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)

    with pytest.raises(RuntimeError, match="boom"):
        with driver.Run(cfg, "sft") as run:
            run.closing(Resource("checkpointer"))
            run.closing(Resource("log file"))
            run.begin(0)
            assert signal.getsignal(signal.SIGTERM) != before  # the preemption handler is in place
            assert [s for s in range(1, 11) if run.log_due(s)] == [3, 6, 9, 10] and run.log_due(4, stopping=True)
            run.record(3, {"loss": 1.5}, "step 3")
            raise RuntimeError("boom")
    assert closed == ["log file", "checkpointer"]  # last registered first
    assert signal.getsignal(signal.SIGTERM) == before
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3]
    driver.open_run(cfg, False).release()  # the lock was released: a new job takes the run dir


def _fake_checkpoint(run_dir):
    (run_dir / "checkpoints" / "4").mkdir(parents=True)


def test_second_job_is_refused_naming_the_holder_and_a_dead_holder_is_stale(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / driver.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                             "heartbeat": time.time()}))
        with pytest.raises(ConfigError, match=f"in use by pid {holder.pid} on host {socket.gethostname()}"):
            driver.open_run(_cfg(tmp_path), False)
        assert not (tmp_path / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    lock = driver.open_run(_cfg(tmp_path), False)  # the holder is gone: its lock is stale
    assert json.loads((tmp_path / driver.LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(ConfigError, match="in use by pid"):  # held by this job: another opener is refused
        other = driver.RunLock(tmp_path)
        other.me = {"host": socket.gethostname(), "pid": os.getpid() + 1}  # a different process on this host
        other.acquire()
    lock.release()
    assert not (tmp_path / driver.LOCK_NAME).exists()
    # another host's lock: live while its heartbeat is fresh, stale after LOCK_STALE_S
    rec = {"host": "other-vm", "pid": 1, "heartbeat": time.time()}
    (tmp_path / driver.LOCK_NAME).write_text(json.dumps(rec))
    with pytest.raises(ConfigError, match="on host other-vm"):
        driver.open_run(_cfg(tmp_path), False)
    (tmp_path / driver.LOCK_NAME).write_text(json.dumps({**rec, "heartbeat": time.time() - driver.LOCK_STALE_S - 1}))
    driver.open_run(_cfg(tmp_path), False).release()


def test_resume_with_a_changed_config_is_refused_before_anything_is_written(tmp_path):
    driver.open_run(_cfg(tmp_path, "optim.lr=0.001"), False).release()
    saved = (tmp_path / "config.yaml").read_text()
    _fake_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match=r"changed: optim\.lr \(a resumed run keeps its config"):
        driver.open_run(_cfg(tmp_path, "optim.lr=0.002"), True)
    with pytest.raises(ConfigError, match=r"changed: model\.hidden_size"):  # even with the flag
        driver.open_run(_cfg(tmp_path, "optim.lr=0.001", "model.hidden_size=128",
                             "train.allow_resume_changes=true"), True)
    with pytest.raises(ConfigError, match=r"resuming .* with changed train\.steps; pass "
                                          r"train\.allow_resume_changes=true"):
        driver.open_run(_cfg(tmp_path, "optim.lr=0.001", "train.steps=80"), True)
    assert (tmp_path / "config.yaml").read_text() == saved  # never overwritten by a refused run
    assert not (tmp_path / driver.LOCK_NAME).exists()  # and the lock of the refused run is gone
    driver.open_run(_cfg(tmp_path, "optim.lr=0.001", "train.steps=80", "train.allow_resume_changes=true"),
                    True).release()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["steps"] == 80
    driver.open_run(_cfg(tmp_path, "optim.lr=0.001", "train.steps=80", "train.allow_resume_changes=true"),
                    True).release()  # the same config again: nothing changed


def test_config_changes_compare_tables_whole():
    cfg = load_config(None)
    saved = to_dict(cfg)
    saved["mesh"]["shape"] = {"data": 2, "fsdp": -1, "tensor": 1}
    saved["rl"]["loss"]["clip_eps_low"] = 0.2
    assert driver.config_changes(saved, cfg) == ["mesh.shape", "rl.loss.clip_eps_low"]


def test_atomic_export_keeps_the_previous_complete_export(tmp_path):
    target = tmp_path / "hf"

    def write(files):
        def go(d):
            d.mkdir(parents=True)
            for name, text in files.items():
                if text is None:
                    raise RuntimeError("killed mid-export")
                (d / name).write_text(text)
        return go

    with pytest.raises(RuntimeError):  # a first export that dies: nothing at the target
        driver.atomic_export(target, write({"model.safetensors": "v0", "config.json": None}))
    assert not target.exists()
    driver.atomic_export(target, write({"model.safetensors": "v1", "config.json": "{}"}))
    with pytest.raises(RuntimeError):
        driver.atomic_export(target, write({"model.safetensors": "v2", "config.json": None}))
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert (target / "model.safetensors").read_text() == "v1"
    driver.atomic_export(target, write({"model.safetensors": "v3", "config.json": "{}"}))
    assert (target / "model.safetensors").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary or old copies left


_EXPORT_LOOP = """
import sys, jax, numpy as np
from qednano_jax.config import ModelConfig
from qednano_jax.model import hf, qwen3
from qednano_jax.train import driver
cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16)
for i in range(1000):  # each export holds params filled with its own number, with 3 shards and an index
    params = jax.tree.map(lambda x: np.full(x.shape, float(i), np.float32), qwen3.init_params(cfg, jax.random.PRNGKey(0)))
    driver.atomic_export(sys.argv[1], lambda tmp: hf.save_hf(cfg, params, str(tmp), max_shard_bytes=60_000))
    print(i, flush=True)
"""


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.7])
def test_sigkill_during_exports_leaves_a_complete_one_or_none(tmp_path, delay):
    """A process exporting a sharded HF checkpoint again and again, SIGKILLed at some point: the target is then
    absent (only before the first export completes) or one complete export that loads with every tensor of one
    version; the next export cleans up what the killed one left."""
    from qednano_jax.model.hf import load_hf
    target = tmp_path / "hf"
    proc = subprocess.Popen([sys.executable, "-c", _EXPORT_LOOP, str(target)], stdout=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # one export done: jax imported and the loop warm
    assert first.strip() == "0"
    time.sleep(delay)
    proc.kill()
    proc.wait()
    if not target.exists():  # killed between the two renames of the swap: the previous export is the .old copy
        (target,) = tmp_path.glob(".hf.old-*")
    _, params = load_hf(target)
    values = {float(np.asarray(x).ravel()[0]) for x in jax.tree.leaves(params)}
    assert len(values) == 1, values  # every tensor from the same export
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors.index.json"]
        + [p.name for p in target.glob("model-*.safetensors")]) and len(list(target.glob("model-*"))) >= 2
    target = tmp_path / "hf"
    driver.atomic_export(target, lambda tmp: tmp.mkdir())  # the next export sweeps the killed one's leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_non_finite_step_leaves_the_state_as_it_was():
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=8)
    opt_cfg = OptimConfig(lr=1e-2, warmup_ratio=0.0)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    rules = sharding.RULE_SETS["dp"]
    opt = optim.make_optimizer(opt_cfg, 10)
    st_sh = step_lib.state_shardings(cfg, opt, mesh, rules)
    state = step_lib.init_state(cfg, opt, step_lib.random_params(cfg, 0, st_sh.params), 0, st_sh)
    keys = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    b_sh = step_lib.batch_shardings(mesh, rules, keys, (1, 2, 8))
    fn = step_lib.make_train_step(cfg, step_lib.sft_loss, opt, optim.schedule(opt_cfg, 10), mesh=mesh, rules=rules,
                                  state_sh=st_sh, batch_sh=b_sh)
    batch = {k: jnp.ones((1, 2, 8), jnp.int32) for k in keys}
    before = jax.tree.map(np.asarray, state.to_dict())
    bad, m = fn(state, {**batch, "denominator": jnp.float32(0.0)})  # loss / 0 = inf
    assert float(m["finite"]) == 0.0 and not np.isfinite(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.tree.map(np.asarray, bad.to_dict()))):
        np.testing.assert_array_equal(a, b)  # params, optimizer state, step and RNG unchanged
    with pytest.raises(driver.NonFinite, match=r"step 7: non-finite loss .* checkpoint \(step 6\) is the last good"):
        driver.check_finite(7, {k: float(v) for k, v in m.items()}, lambda: 6)
    good, m = fn(bad, {**batch, "denominator": jnp.float32(16.0)})
    assert float(m["finite"]) == 1.0 and int(good.step) == 1


def test_metrics_after_a_resume_log_each_step_once(tmp_path):
    w = metrics.MetricsWriter(tmp_path)
    for s in range(1, 6):
        w.write(s, {"loss": float(s)})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a torn line of a killed run
    w = metrics.MetricsWriter(tmp_path, start_step=3)  # resumed from the step-3 checkpoint
    for s in range(4, 7):
        w.write(s, {"loss": 10.0 + s})
    w.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
