"""Rule sets as data (configs/mesh/*.yaml == sharding.RULE_SETS), the recipe configs, multi-host detection."""
import jax
import numpy as np
import pytest

from qednano_jax import sharding
from qednano_jax.config import CONFIGS_DIR, load_config

LOGICAL = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm", "head_dim_norm", "batch",
           "act_batch", "act_length", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab"}


@pytest.mark.parametrize("name", sorted(sharding.RULE_SETS))
def test_mesh_yaml_matches_rule_set(name):
    cfg = load_config(None, [f"mesh=mesh/{name}.yaml"])
    assert cfg.mesh.shape == sharding.MESH_SHAPES[name]
    norm = lambda r: {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in r.items()}
    assert norm(cfg.mesh.rules) == norm(sharding.RULE_SETS[name])
    assert set(cfg.mesh.rules) <= LOGICAL
    assert set(v for r in cfg.mesh.rules.values() for v in ([r] if isinstance(r, str) else r or [])) <= \
        {"data", "fsdp", "tensor", "sequence"}
    sharding.make_mesh(cfg.mesh.shape)  # fits the 8 test devices


def test_recipe_configs_load():
    cfg = load_config(CONFIGS_DIR / "sft.yaml")
    assert (cfg.stage, cfg.optim.lr, cfg.train.steps, cfg.train.batch_size, cfg.data.seq_len) == \
        ("sft", 3e-5, 620, 32, 45056)
    assert cfg.model.num_layers == 36 and cfg.data.path == "lm-provers/FineProofs-SFT"
    tiny = load_config(CONFIGS_DIR / "sft-tiny.yaml")
    default = load_config(None)
    for section in ("data", "optim", "train", "mesh"):
        assert getattr(tiny, section) == getattr(default, section), section


def test_single_host_needs_no_distributed_init(monkeypatch):
    for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append((a, k)))
    assert sharding.maybe_initialize_distributed() is False and not called
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert sharding.maybe_initialize_distributed() is True
    assert called[-1][1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "h0,h1,h2,h3")
    assert sharding.maybe_initialize_distributed() is True and called[-1] == ((), {})


def test_host_batch_to_global_sharded():
    mesh = sharding.make_mesh(sharding.MESH_SHAPES["dp"])
    sh = sharding.batch_sharding(mesh, sharding.RULE_SETS["dp"], 2, 0, (16, 4))
    x = np.arange(64).reshape(16, 4)
    g = sharding.host_to_global({"x": x}, {"x": sh})["x"]
    assert g.sharding.spec[0] == ("data", "fsdp") or g.sharding.spec[0] == "data"
    np.testing.assert_array_equal(np.asarray(g), x)
    assert len(g.addressable_shards) == 8 and g.addressable_shards[0].data.shape == (2, 4)
