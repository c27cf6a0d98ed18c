"""HF checkpoints in and out: bit-identical round trips (one file and sharded), transformers and SGLang load our
export, clear errors on foreign or damaged checkpoints, and loading straight onto fsdp / tp meshes."""
import dataclasses
import json
import os
import socket
import subprocess
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import requests
import torch
from qwen3_reference import build_hf_qwen3, right_padded, torch_logits
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import AutoTokenizer, GenerationConfig, Qwen3ForCausalLM

from qednano_jax import sharding
from qednano_jax.config import ModelConfig
from qednano_jax.model import hf, qwen3

forward = jax.jit(qwen3.forward, static_argnums=0)


def init_params(cfg: ModelConfig, key) -> dict:
    """Random params drawn with numpy (no RNG compile): matrices ~ N(0, 0.2), norm weights ~ 1 + N(0, 0.2)."""
    rng = np.random.default_rng(int(jax.random.key_data(key).sum()))
    dtype = jax.numpy.dtype(cfg.param_dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(qwen3.param_shapes(cfg),
                                                           is_leaf=lambda x: isinstance(x, tuple))
    out = [(float(str(path[-1].key).endswith("norm")) + 0.2 * rng.normal(size=shape)).astype(np.float32)
           for path, shape in leaves]
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x, dtype) for x in out])


def _tensors(d: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (one file or shards)."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_bit_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def _assert_same_params(p, q):
    assert jax.tree.structure(p) == jax.tree.structure(q)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(p), jax.tree.leaves(q)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """Transformers checkpoint (untied head, GQA 4) -> (dir, torch model)."""
    d = tmp_path_factory.mktemp("untied")
    return d, build_hf_qwen3(d, tie=False, hidden=40, heads=8, kv_heads=2, head_dim=6, theta=5e6)


# ----------------------------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("tie", [True, False])
def test_hf_to_ours_to_hf_is_bit_identical(tmp_path, tie):
    src = tmp_path / "src"
    build_hf_qwen3(src, tie=tie)
    cfg, params = hf.load_hf(src)
    hf.save_hf(cfg, params, tmp_path / "out")
    _assert_bit_identical(_tensors(src), _tensors(tmp_path / "out"))
    assert ("lm_head.weight" in _tensors(tmp_path / "out")) != tie
    theirs, ours = json.loads((src / "config.json").read_text()), json.loads((tmp_path / "out/config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps", "bos_token_id",
                "eos_token_id", "max_position_embeddings", "model_type", "architectures", "rope_parameters"):
        assert ours[key] == theirs[key], key


def test_sharded_export_has_an_index_and_round_trips(tmp_path, untied):
    src, _ = untied
    cfg, params = hf.load_hf(src)
    out = hf.save_hf(cfg, params, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / hf.INDEX_FILE).read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not (out / hf.SINGLE_FILE).exists()
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in _tensors(out).values())
    for f in shards:  # the limit holds, except for a tensor larger than it on its own
        sizes = [x.nbytes for x in load_file(f).values()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    _assert_bit_identical(_tensors(src), _tensors(out))
    cfg2, params2 = hf.load_hf(out)
    assert cfg2 == cfg
    _assert_same_params(params, params2)
    hf.save_hf(cfg2, params2, out)  # one file again: the old shards and index go away
    assert sorted(p.name for p in out.glob("model*")) == [hf.SINGLE_FILE]
    _assert_bit_identical(_tensors(src), _tensors(out))


def test_bf16_params_are_saved_as_bf16(tmp_path):
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_heads=2, num_kv_heads=1, head_dim=8,
                      bos_token_id=0, eos_token_id=1, param_dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    hf.save_hf(cfg, params, tmp_path / "bf16")
    with safe_open(tmp_path / "bf16" / hf.SINGLE_FILE, framework="np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "bf16/config.json").read_text())["torch_dtype"] == "bfloat16"
    cfg2, back = hf.load_hf(tmp_path / "bf16")
    assert cfg2.param_dtype == "bfloat16"
    _assert_same_params(params, back)
    _, up = hf.load_hf(tmp_path / "bf16", dtype="float32")  # exact upcast
    _assert_same_params(jax.tree.map(lambda x: np.asarray(x).astype(np.float32), params), up)
    # fp32 master params exported as bf16 (rollout refit): round to nearest even, like torch
    p32 = init_params(dataclasses.replace(cfg, param_dtype="float32"), jax.random.key(1))
    hf.save_hf(cfg, p32, tmp_path / "down", dtype="bfloat16")
    got = load_file(tmp_path / "down" / hf.SINGLE_FILE)["model.embed_tokens.weight"]
    want = torch.from_numpy(np.array(p32["embed"])).to(torch.bfloat16).view(torch.int16).numpy()
    assert got.dtype == ml_dtypes.bfloat16 and np.array_equal(got.view(np.int16), want)


# ----------------------------------------------------------------------------------------------- export

def test_export_loads_in_transformers_with_same_logits(tmp_path):
    from qednano_jax.data.tokenizer import train_tiny_tokenizer
    tok_dir = train_tiny_tokenizer(["the proof is complete", "let x be a real number"] * 20, tmp_path / "tok", 300)
    cfg = ModelConfig(vocab_size=300, hidden_size=40, intermediate_size=56, num_heads=8, num_kv_heads=4, head_dim=6,
                      tie_word_embeddings=False, rope_theta=5e6, initializer_range=0.2, bos_token_id=0,
                      eos_token_id=2)
    params = init_params(cfg, jax.random.key(0))
    out = hf.save_hf(cfg, params, tmp_path / "export", tokenizer_dir=tok_dir)
    model = Qwen3ForCausalLM.from_pretrained(str(out)).eval()
    tokens, mask = right_padded(np.random.default_rng(0), [9, 6], vocab=300)
    ref = torch_logits(model, tokens, mask)
    ours = np.asarray(forward(cfg, params, tokens, segment_ids=mask))
    assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4
    assert model.config.rope_parameters["rope_theta"] == 5e6
    gen = GenerationConfig.from_pretrained(str(out))
    assert (gen.temperature, gen.top_p, gen.top_k, gen.eos_token_id) == (0.6, 0.95, 20, [2, 0])
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template and tok("the proof")["input_ids"] == AutoTokenizer.from_pretrained(str(tok_dir))(
        "the proof")["input_ids"]


# ----------------------------------------------------------------------------------------------- config

def test_config_dict_round_trips_and_reads_both_rope_styles():
    cfg = ModelConfig(rope_theta=5e6, tie_word_embeddings=False, head_dim=24, max_position_embeddings=262144)
    d = hf.hf_config_dict(cfg)
    assert hf.model_config_from_hf(d) == cfg
    legacy = {k: v for k, v in d.items() if k not in ("rope_parameters", "dtype")}  # transformers 4 style
    v5 = {k: v for k, v in d.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}  # transformers 5
    assert hf.model_config_from_hf(legacy) == hf.model_config_from_hf(v5) == cfg
    assert hf.model_config_from_hf(d, remat_policy="full").remat_policy == "full"
    real = {  # Qwen/Qwen3-4B-Thinking-2507 config.json (docs/recipe.md §1)
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2560, "intermediate_size": 9728, "max_position_embeddings": 262144,
        "max_window_layers": 36, "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 5000000, "sliding_window": None,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936,
        "bos_token_id": 151643, "eos_token_id": 151645}
    got = hf.model_config_from_hf(real)
    assert qwen3.count_params(qwen3.abstract_params(got)) == 4_022_468_096
    assert (got.rope_theta, got.head_dim, got.param_dtype) == (5e6, 128, "bfloat16")


@pytest.mark.parametrize("change, needle", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "LlamaForCausalLM"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}, "qwen3_moe"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_config_names_the_problem(change, needle):
    with pytest.raises(ValueError, match=needle):
        hf.model_config_from_hf({**hf.hf_config_dict(ModelConfig()), **change})


# ----------------------------------------------------------------------------------------------- damaged checkpoints

def _damage(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / hf.SINGLE_FILE)
    edit(tensors)
    save_file(tensors, dst / hf.SINGLE_FILE, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"), r"model\.layers\.1\.self_attn\.k_norm\.weight is missing"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((64, 40), np.float32)}),
     r"unexpected tensor model\.layers\.2\.mlp\.up_proj\.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": np.zeros((40, 40), np.float32)}),
     r"model\.layers\.0\.self_attn\.o_proj\.weight has shape \[40, 40\], config.json implies \[40, 48\]"),
    (lambda t: t.update({"model.norm.weight": np.ones(40, np.int32)}), r"model\.norm\.weight has dtype I32"),
], ids=["missing", "extra", "misshaped", "int_dtype"])
def test_damaged_checkpoint_names_the_tensor(tmp_path, untied, edit, needle):
    bad = _damage(untied[0], tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=needle) as e:
        hf.load_hf(bad)
    assert str(bad) in str(e.value)  # and the file


def test_tied_checkpoint_with_an_lm_head(tmp_path):
    src = tmp_path / "src"
    build_hf_qwen3(src, tie=True)
    same = _damage(src, tmp_path / "same", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
    _assert_same_params(hf.load_hf(src)[1], hf.load_hf(same)[1])
    other = _damage(src, tmp_path / "other", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    with pytest.raises(ValueError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight"):
        hf.load_hf(other)


def test_missing_weight_files_are_named(tmp_path, untied):
    with pytest.raises(hf.CheckpointError, match="no-such-org/no-such-model"):  # offline hub id
        hf.load_hf("no-such-org/no-such-model")
    with pytest.raises(hf.CheckpointError, match="nowhere/at/all"):
        hf.load_hf(tmp_path / "nowhere/at/all")
    with pytest.raises(hf.CheckpointError, match="config.json"):
        hf.load_hf(tmp_path)
    (tmp_path / "config.json").write_text((untied[0] / "config.json").read_text())
    with pytest.raises(hf.CheckpointError, match="model.safetensors"):
        hf.load_hf(tmp_path)
    (tmp_path / hf.INDEX_FILE).write_text(json.dumps({"weight_map": {"model.norm.weight": "gone.safetensors"}}))
    with pytest.raises(hf.CheckpointError, match="gone.safetensors"):
        hf.load_hf(tmp_path)


# ----------------------------------------------------------------------------------------------- sharded load

@pytest.mark.parametrize("mesh_shape, rule_set", [
    ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
    ({"data": 2, "fsdp": 1, "tensor": 4}, "tp"),
])
def test_load_onto_mesh_shards_params_and_keeps_logits(untied, mesh_shape, rule_set):
    src, model = untied
    cfg, plain = hf.load_hf(src)
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.RULE_SETS[rule_set]
    cfg2, params = hf.load_hf(src, mesh=mesh, rules=rules)
    _assert_same_params(plain, params)
    specs = jax.tree.map(lambda x: tuple(x.sharding.spec), params)
    axis = "fsdp" if rule_set == "fsdp" else "tensor"
    if rule_set == "fsdp":  # embed axis (vocab for the embedding) over fsdp
        assert specs["embed"][0] == "fsdp" and specs["layers"]["q_proj"][3] == "fsdp"
        assert specs["layers"]["down_proj"][1] == "fsdp" and specs["lm_head"][0] == "fsdp"
    else:  # heads, mlp and vocab over tensor; 2 kv heads do not divide 4 shards, so k/v stay replicated
        assert specs["layers"]["q_proj"][1] == "tensor" and specs["layers"]["o_proj"][2] == "tensor"
        assert specs["layers"]["gate_proj"][1] == "tensor" and specs["embed"][0] == "tensor"
        assert "tensor" not in specs["layers"]["k_proj"]
    for x in jax.tree.leaves(params):
        if x.ndim > 1 and x.size >= 96 * 40:
            assert x.sharding.spec != jax.sharding.PartitionSpec(*[None] * x.ndim)
            assert axis in tuple(x.sharding.spec)
            assert x.addressable_shards[0].data.size < x.size
    tokens, mask = right_padded(np.random.default_rng(6), [9, 4, 7, 2, 9, 5, 3, 8])
    ref = np.asarray(forward(cfg, plain, tokens, segment_ids=mask))
    with sharding.use_rules(mesh, rules):
        data = sharding.batch_sharding(mesh, rules, 2)
        got = jax.jit(qwen3.forward, static_argnums=0)(cfg2, params, jax.device_put(tokens, data),
                                                       segment_ids=jax.device_put(mask, data))
    assert np.abs(np.asarray(got) - ref)[mask.astype(bool)].max() <= 1e-5
    assert np.abs(ref - torch_logits(model, tokens, mask))[mask.astype(bool)].max() <= 1e-4


def test_load_reads_fine_slices_when_layers_and_head_dim_are_split(untied):
    src, _ = untied
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = {"layers": "data", "head_dim": "tensor", "embed": "fsdp", "heads": "fsdp", "mlp": "tensor"}
    _, params = hf.load_hf(src, mesh=mesh, rules=rules)
    assert tuple(params["layers"]["o_proj"].sharding.spec) == ("data", "fsdp", None, "tensor")  # [L, D, H, E]
    assert tuple(params["layers"]["q_proj"].sharding.spec) == ("data", "fsdp", "tensor", None)  # [L, H, E, D]
    _assert_same_params(hf.load_hf(src)[1], params)


# ----------------------------------------------------------------------------------------------- SGLang

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.sglang
@pytest.mark.slow
def test_sglang_serves_our_export(tmp_path):
    """The real SGLang server loads our bf16 export; its greedy tokens' logprobs match our model's. Then
    /update_weights_from_disk (what refit calls) loads a different checkpoint exported across 3 files with an
    index, as a multi-host export is laid out, and its logprobs match that checkpoint's."""
    venv = os.environ.get("QEDNANO_SGLANG_VENV")
    if not venv:
        pytest.skip("set QEDNANO_SGLANG_VENV to a SGLang venv (see /work/shared/sglang-cpu/README.md)")
    from qednano_jax.data.tokenizer import prompt_ids, train_tiny_tokenizer
    from qednano_jax.rollout.refit import update_from_disk
    tok_dir = train_tiny_tokenizer(["the proof is complete", "let x be a real number", "hence q.e.d."] * 30,
                                   tmp_path / "tok", 512)
    cfg = ModelConfig(vocab_size=512, initializer_range=0.2, bos_token_id=0, eos_token_id=2, param_dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    out = hf.save_hf(cfg, params, tmp_path / "model", tokenizer_dir=tok_dir)
    params2 = init_params(cfg, jax.random.key(1))
    out2 = hf.save_hf(cfg, params2, tmp_path / "sharded", tokenizer_dir=tok_dir, max_shard_bytes=90_000)
    assert len(list(out2.glob("*.safetensors"))) == 3
    serve = Path(os.environ.get("QEDNANO_SGLANG_CPU") or Path(__file__).resolve().parents[2].parent
                 / "shared/sglang-cpu") / "serve.sh"
    port = _free_port()
    pid = int(subprocess.run([str(serve), venv, str(out), str(port), "--sleep-on-idle"], check=True, capture_output=True,
                             text=True).stdout.split()[-1])
    url = f"http://127.0.0.1:{port}"
    prompt = prompt_ids(AutoTokenizer.from_pretrained(str(out)), "prove that x is real")

    def greedy():
        r = requests.post(f"{url}/generate", timeout=120, json={
            "input_ids": prompt, "return_logprob": True,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}}).json()
        return [(lp, t) for lp, t, _ in r["meta_info"]["output_token_logprobs"]]

    try:
        got = greedy()
        update_from_disk(requests.Session(), url, out2, "2", timeout=120)
        got2 = greedy()
    finally:
        os.kill(pid, 15)
    def error(p, g):  # max |SGLang logprob - ours| over the 8 tokens SGLang chose
        tokens = np.array([prompt + [t for _, t in g]], np.int32)
        logp = np.asarray(jax.nn.log_softmax(forward(dataclasses.replace(cfg, param_dtype="float32"),
                                                     jax.tree.map(lambda x: np.asarray(x, np.float32), p), tokens)))
        n = len(prompt)
        return max(abs(lp - logp[0, n - 1 + i, t]) for i, (lp, t) in enumerate(g))

    assert len(got) == len(got2) == 8
    errors = [[error(p, g) for g in (got, got2)] for p in (params, params2)]
    # SGLang computes in bf16: within 0.08 of the checkpoint it serves, far from the other one
    assert errors[0][0] < 0.08 and errors[1][1] < 0.08 and min(errors[0][1], errors[1][0]) > 0.3, errors
