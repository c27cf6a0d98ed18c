"""HF Qwen3 checkpoints in and out (docs/design.md principle 5, docs/recipe.md §1).

In: a local HF directory (config.json + model.safetensors, or shards listed in model.safetensors.index.json) is read
straight onto the target sharding, one parameter at a time, each device reading only its own slice of the files.
Out: config.json, safetensors shard(s) (+ index), generation_config.json and the tokenizer files, which transformers'
`from_pretrained` and SGLang load as they are.
Either side may be a URL (gs://bucket/run/hf, see `qednano_jax.paths`): a remote checkpoint is copied into a local
temporary directory to load (safetensors reads local files), and each shard of a remote export is written to a local
temporary file and streamed up, so neither needs more memory than the local case (disk: one shard, or the whole
checkpoint to load).

`MAPPING` is the single table between HF tensor names and our param paths; loading and saving both walk it, so a
layout fix in one place fixes both directions. Safetensors only: no pickle, no remote code.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator

from etils import epath
import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy views use)
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from qednano_jax import paths
from qednano_jax.config import ModelConfig, UserError, from_dict
from qednano_jax.model import qwen3
from qednano_jax.sharding import Rules, tree_shardings

ARCHITECTURE, MODEL_TYPE = "Qwen3ForCausalLM", "qwen3"
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors dtype codes a float parameter may be stored as
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
# Sampling defaults of Qwen3-4B-Thinking-2507's own generation_config.json (docs/recipe.md §1 base model)
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the mapping.

    `hf` is the HF tensor name; `{i}` marks a per-layer tensor, stacked on our leading `layers` axis. `split`
    (from qwen3.OUT_AXES) = 0: same shape both sides. `split` = n > 0: HF holds a torch Linear weight [out, in] and
    we hold the same bytes as [out..., in...], our first n (per-layer) axes making HF's `out` axis: a reshape, never
    a transpose; e.g. q_proj HF [H*E, D] <-> ours [H, E, D] (n = 2), o_proj HF [D, H*E] <-> ours [D, H, E] (n = 1).
    """
    hf: str
    ours: tuple[str, ...]

    @property
    def split(self) -> int:
        return qwen3.OUT_AXES.get(self.ours[-1], 0)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


MAPPING = (
    Entry("model.embed_tokens.weight", ("embed",)),
    Entry("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm")),
    Entry("model.layers.{i}.self_attn.q_proj.weight", ("layers", "q_proj")),
    Entry("model.layers.{i}.self_attn.k_proj.weight", ("layers", "k_proj")),
    Entry("model.layers.{i}.self_attn.v_proj.weight", ("layers", "v_proj")),
    Entry("model.layers.{i}.self_attn.q_norm.weight", ("layers", "q_norm")),
    Entry("model.layers.{i}.self_attn.k_norm.weight", ("layers", "k_norm")),
    Entry("model.layers.{i}.self_attn.o_proj.weight", ("layers", "o_proj")),
    Entry("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm")),
    Entry("model.layers.{i}.mlp.gate_proj.weight", ("layers", "gate_proj")),
    Entry("model.layers.{i}.mlp.up_proj.weight", ("layers", "up_proj")),
    Entry("model.layers.{i}.mlp.down_proj.weight", ("layers", "down_proj")),
    Entry("model.norm.weight", ("final_norm",)),
    Entry("lm_head.weight", ("lm_head",)),
)
TIED_HEAD = "lm_head.weight"  # may appear in a tied checkpoint; accepted when equal to the embedding


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _leaf_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one HF tensor of `entry`, given our (stacked) leaf shape."""
    s = shape[1:] if entry.per_layer else shape
    if not entry.split:
        return tuple(s)
    return (math.prod(s[:entry.split]), math.prod(s[entry.split:]))


def _entries(cfg: ModelConfig) -> list[tuple[Entry, tuple[int, ...]]]:
    """(entry, our leaf shape) for every leaf of `cfg`'s params, in mapping order."""
    shapes = qwen3.param_shapes(cfg)
    out = []
    for e in MAPPING:
        try:
            out.append((e, tuple(_get(shapes, e.ours))))
        except KeyError:  # lm_head of a tied model
            continue
    return out


def hf_tensors(cfg: ModelConfig) -> Iterator[tuple[str, Entry, int | None, tuple[int, ...]]]:
    """(HF name, entry, layer or None, HF shape) of every tensor of an HF checkpoint of `cfg`, in mapping order."""
    for e, shape in _entries(cfg):
        hf_shape = _leaf_shape(e, shape)
        for layer in range(cfg.num_layers) if e.per_layer else [None]:
            yield (e.hf.format(i=layer) if e.per_layer else e.hf), e, layer, hf_shape


@functools.partial(jax.jit, static_argnames=("dtype",))
def _cast(x: jax.Array, *, dtype: str) -> jax.Array:
    return x.astype(dtype)


@functools.partial(jax.jit, static_argnames=("pad", "dtype", "sharding"))
def _host_blocks(x: jax.Array, *, pad: int, dtype: str, sharding: Any) -> jax.Array:
    """Stacked layers, padded with `pad` zero layers, cast and resharded by `sharding` (per-host export)."""
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return jax.lax.with_sharding_constraint(x.astype(dtype), sharding)


def _in_dtype(leaf: jax.Array, dtype: str) -> jax.Array:
    """`leaf` in `dtype` (cast on its devices; as it is when it already is). Our layout is HF's (see Entry), so the
    bytes of each layer of a stacked leaf are the bytes of its HF tensor."""
    return leaf if jnp.dtype(leaf.dtype) == jnp.dtype(dtype) else _cast(leaf, dtype=dtype)


def _read_block(view: Any, entry: Entry, shape: tuple[int, ...], idx: tuple[slice, ...]) -> np.ndarray:
    """Block `idx` of our per-layer array of shape `shape`, reading only the rows/columns of the HF tensor it needs.

    For a linear weight (`split` = n > 0) the HF rows/columns are whole groups of our first out/in axis (e.g. whole
    heads); the finer slices of the remaining axes are taken after the reshape.
    """
    if not entry.split:
        return view[idx] if idx else view[:]
    n = entry.split
    outs, ins = shape[:n], shape[n:]
    out_idx, in_idx = idx[:n], idx[n:]

    def coarse(dims, sl):
        r = math.prod(dims[1:])
        return slice(sl[0].start * r, sl[0].stop * r)

    block = view[coarse(outs, out_idx), coarse(ins, in_idx)]  # HF layout [out, in]
    block = block.reshape(out_idx[0].stop - out_idx[0].start, *outs[1:], in_idx[0].stop - in_idx[0].start, *ins[1:])
    return block[(slice(None),) + out_idx[1:] + (slice(None),) + in_idx[1:]]


# ----------------------------------------------------------------------------------------------- config

def model_config_from_hf(hf: dict, **overrides: Any) -> ModelConfig:
    """ModelConfig from an HF Qwen3 config.json dict (transformers 4 `rope_theta` or 5 `rope_parameters`).

    The checkpoint's dtype becomes both `dtype` and `param_dtype` unless overridden. Anything our decoder does not
    implement (another architecture, sliding windows, RoPE scaling, attention bias, another activation) is an error.
    """
    arch = hf.get("architectures") or [ARCHITECTURE]
    mtype = hf.get("model_type", MODEL_TYPE)
    if ARCHITECTURE not in arch or mtype != MODEL_TYPE:
        raise CheckpointError(f"config.json: architecture {arch} / model_type {mtype!r} is not supported; "
                         f"only {ARCHITECTURE} (model_type {MODEL_TYPE!r}) is")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for where, r in (("rope_parameters", rope), ("rope_scaling", scaling)):
        kind = r.get("rope_type", r.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"config.json: {where}.rope_type {kind!r} is not supported (only plain RoPE)")
    checks = (("hidden_act", "silu"), ("attention_bias", False), ("use_sliding_window", False))
    for key, want in checks:
        if hf.get(key, want) != want:
            raise CheckpointError(f"config.json: {key} = {hf[key]!r} is not supported (expected {want!r})")
    kinds = set(hf.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise CheckpointError(f"config.json: layer_types {sorted(kinds)} are not supported (only full_attention)")
    theta = hf.get("rope_theta", rope.get("rope_theta"))
    if theta is None:
        raise CheckpointError("config.json: no rope_theta (top level or in rope_parameters)")
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    eos = hf.get("eos_token_id")
    fields = {
        "vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"],
        "intermediate_size": hf["intermediate_size"], "num_layers": hf["num_hidden_layers"],
        "num_heads": hf["num_attention_heads"],
        "num_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        "rope_theta": float(theta), "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "max_position_embeddings": hf.get("max_position_embeddings", 32768),
        "initializer_range": hf.get("initializer_range", 0.02),
        "dtype": dtype, "param_dtype": dtype,
    }
    if hf.get("bos_token_id") is not None:
        fields["bos_token_id"] = hf["bos_token_id"]
    if eos is not None:
        fields["eos_token_id"] = eos[0] if isinstance(eos, list) else eos
    fields.update(overrides)
    return from_dict(ModelConfig, fields)


def hf_config_dict(cfg: ModelConfig) -> dict:
    """config.json of `cfg` for transformers (4 and 5) and SGLang; the weights' dtype is `cfg.param_dtype`."""
    L = cfg.num_layers
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": L, "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": L, "layer_types": ["full_attention"] * L,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "initializer_range": cfg.initializer_range, "use_cache": True,
        "torch_dtype": cfg.param_dtype, "dtype": cfg.param_dtype,
    }


def generation_config_dict(cfg: ModelConfig) -> dict:
    """generation_config.json: stop ids (EOS and the BOS/<|endoftext|> id, as Qwen3 ships) and sampling defaults."""
    eos = [cfg.eos_token_id] + ([cfg.bos_token_id] if cfg.bos_token_id != cfg.eos_token_id else [])
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.bos_token_id,
            **GENERATION_DEFAULTS}


# ----------------------------------------------------------------------------------------------- load

class CheckpointError(UserError):
    """An HF checkpoint directory that cannot be loaded as a Qwen3 (missing or malformed files, another
    architecture, wrong shapes); the message names the file."""


def _open_safetensors(path: Path):
    try:
        return safe_open(path, framework="np")
    except Exception as e:  # noqa: BLE001 - safetensors' errors do not name the file (a truncated one, say)
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (an HF checkpoint directory needs it)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local checkpoint directory as is, or a hub id (e.g. `Qwen/Qwen3-4B-Thinking-2507`) fetched into the HF cache:
    config, safetensors and tokenizer files only (never pickled weights or remote code)."""
    if paths.is_url(name_or_path):
        raise CheckpointError(f"{name_or_path}: a URL is not a local checkpoint directory; load_hf copies it down "
                                "(or copy it to local disk first)")
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).count("/") != 1:
        raise CheckpointError(f"{name_or_path}: not a checkpoint directory (nor an org/name hub id)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", *TOKENIZER_FILES]))
    except Exception as e:  # offline, unknown repo, no access: say which checkpoint and why
        raise CheckpointError(f"{name_or_path}: no such local directory, and the hub download failed: "
                                f"{type(e).__name__}: {e}") from None


def _tensor_files(path: Path) -> tuple[dict[str, Path], Path]:
    """{tensor name: file} from the index (sharded) or the single file; also the file that lists the names."""
    if (path / INDEX_FILE).is_file():
        weight_map = _read_json(path / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path / INDEX_FILE}: no weight_map")
        files = {name: path / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {path / INDEX_FILE} but missing")
        return files, path / INDEX_FILE
    if (path / SINGLE_FILE).is_file():
        with _open_safetensors(path / SINGLE_FILE) as f:
            return {name: path / SINGLE_FILE for name in f.keys()}, path / SINGLE_FILE
    raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints load)")


def _check_tensors(cfg: ModelConfig, files: dict[str, Path], listing: Path, handles: dict[Path, Any]) -> None:
    """Every tensor present with the right shape and a float dtype, and nothing else (TIED_HEAD aside)."""
    expected = {name: shape for name, _, _, shape in hf_tensors(cfg)}
    for name, f in files.items():
        if name not in handles[f].keys():
            raise CheckpointError(f"{f}: tensor {name} is listed in {listing} but not stored in this file")
        view = handles[f].get_slice(name)
        shape, dtype = tuple(view.get_shape()), view.get_dtype()
        if name not in expected and not (name == TIED_HEAD and cfg.tie_word_embeddings):
            raise CheckpointError(f"{f}: unexpected tensor {name} {list(shape)} (not part of a Qwen3 checkpoint with "
                             f"{cfg.num_layers} layers, tie_word_embeddings={cfg.tie_word_embeddings})")
        want = expected.get(name, (cfg.vocab_size, cfg.hidden_size))
        if shape != want:
            raise CheckpointError(f"{f}: tensor {name} has shape {list(shape)}, config.json implies {list(want)}")
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{f}: tensor {name} has dtype {dtype}; a weight must be one of {list(FLOAT_DTYPES)}")
    missing = [n for n in expected if n not in files]
    if missing:
        raise CheckpointError(f"{listing}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    if TIED_HEAD in files and cfg.tie_word_embeddings:
        head = handles[files[TIED_HEAD]].get_tensor(TIED_HEAD)
        embed = handles[files["model.embed_tokens.weight"]].get_tensor("model.embed_tokens.weight")
        if not np.array_equal(head, embed):
            raise CheckpointError(f"{files[TIED_HEAD]}: tensor {TIED_HEAD} differs from model.embed_tokens.weight but "
                             f"config.json says tie_word_embeddings=true")


@contextlib.contextmanager
def local_checkpoint(name_or_path: str | Path) -> Iterator[Path]:
    """`resolve_checkpoint`, except that a URL is copied (config.json, index, safetensors) into a temporary local
    directory that lives until the context exits."""
    if not paths.is_url(name_or_path):
        yield resolve_checkpoint(name_or_path)
        return
    src = paths.resolve(name_or_path)
    if not (src / "config.json").exists():
        raise CheckpointError(f"{src}: no config.json (not an HF checkpoint directory)")
    with tempfile.TemporaryDirectory(prefix="qednano-hf-") as tmp:
        local = Path(tmp) / src.name
        local.mkdir()
        for f in [src / "config.json", src / INDEX_FILE, *src.glob("model*.safetensors")]:
            if f.exists():
                paths.copy(f, local / f.name)
        yield local


def load_hf(path: str | Path, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
            rules: Rules | None = None) -> tuple[ModelConfig, qwen3.Params]:
    """Load an HF Qwen3 checkpoint (a directory, a hub id or a URL: see `local_checkpoint`) -> (ModelConfig, params).

    `dtype` sets `param_dtype` (default: the checkpoint's). With `mesh`, each leaf is placed by `qwen3.param_axes`
    and `rules` (no rules: replicated); each device reads only its slice from the files, so host memory stays at
    about one tensor. Without `mesh` the params go to the first local device. Further non-shape fields (remat,
    chunks) are set with `dataclasses.replace` on the returned config.
    """
    with local_checkpoint(path) as local:
        return _load_hf(local, dtype, mesh, rules)


def inspect_checkpoint(path: str | Path) -> ModelConfig:
    """The architecture of an HF checkpoint, after the checks `load_hf` makes (config.json, the safetensors
    headers, every tensor's name, shape and dtype) without reading the weights: a CheckpointError names the file."""
    with local_checkpoint(path) as local:
        cfg = model_config_from_hf(_read_json(local / "config.json"))
        files, listing = _tensor_files(local)
        with contextlib.ExitStack() as stack:
            handles = {f: stack.enter_context(_open_safetensors(f)) for f in sorted(set(files.values()))}
            _check_tensors(cfg, files, listing, handles)
    return cfg


def _load_hf(path: Path, dtype: str | None, mesh: jax.sharding.Mesh | None,
             rules: Rules | None) -> tuple[ModelConfig, qwen3.Params]:
    overrides = {"param_dtype": dtype} if dtype else {}
    cfg = model_config_from_hf(_read_json(path / "config.json"), **overrides)
    files, listing = _tensor_files(path)
    shapes = qwen3.param_shapes(cfg)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes, is_leaf=lambda x: isinstance(x, tuple))
    else:
        shardings = tree_shardings(qwen3.param_axes(cfg), rules or {}, mesh, shapes)
    np_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    out: dict = {}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(_open_safetensors(f)) for f in sorted(set(files.values()))}
        _check_tensors(cfg, files, listing, handles)
        for entry, shape in tqdm(_entries(cfg), desc=f"load {path.name}", disable=None, leave=False):
            leaf = _load_leaf(entry, shape, _get(shardings, entry.ours), files, handles, np_dtype)
            node = out
            for k in entry.ours[:-1]:
                node = node.setdefault(k, {})
            node[entry.ours[-1]] = leaf
    return cfg, out


def _load_leaf(entry: Entry, shape: tuple[int, ...], sharding: Any, files: dict[str, Path],
               handles: dict[Path, Any], np_dtype: np.dtype) -> jax.Array:
    views: dict[str, Any] = {}

    def view(name):
        if name not in views:
            views[name] = handles[files[name]].get_slice(name)
        return views[name]

    blocks: dict[tuple, np.ndarray] = {}  # replicated leaves: read each distinct block once

    def callback(index):
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        idx = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
        key = tuple((s.start, s.stop) for s in idx)
        if key not in blocks:
            if entry.per_layer:
                parts = [_read_block(view(entry.hf.format(i=layer)), entry, shape[1:], idx[1:])
                         for layer in range(idx[0].start, idx[0].stop)]
                block = np.stack(parts)
            else:
                block = _read_block(view(entry.hf), entry, shape, idx)
            blocks[key] = np.ascontiguousarray(block.astype(np_dtype, copy=False))
        return blocks[key]

    return jax.make_array_from_callback(shape, sharding, callback)


# ----------------------------------------------------------------------------------------------- save

def _to_host(x: jax.Array) -> np.ndarray:
    """One parameter, gathered to this host (all processes take part when it spans hosts)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_hf(config: ModelConfig, params: qwen3.Params, path: str | Path, *, tokenizer_dir: str | Path | None = None,
            dtype: str | None = None, max_shard_bytes: int = 5_000_000_000) -> Path | epath.Path:
    """Write an HF checkpoint directory of `params` into `path` (a local directory or a URL; created if needed).

    Weights are saved in `dtype` (default: the params' dtype), split into shards of at most `max_shard_bytes`
    (plus an index) when they do not fit one file. Parameters are gathered to the host one at a time and each shard
    is written as soon as it is complete, so host memory stays near one shard plus two parameters: the cast of the
    next parameter is dispatched before this one is written, so that the two overlap (bf16 export of the
    benchmarks' small checkpoint: 0.62x -> 0.85x of a raw write of the same bytes). Earlier weight
    files in `path` are removed so that the directory never mixes two checkpoints; writing atomically (temp dir +
    rename) is the caller's job.

    Multi-host (every process calls this; `path` must be storage all hosts see: a bucket or a shared filesystem):
    each host writes the safetensors file of its own block of layers (the stacked layer params, padded to a multiple
    of H, are resharded so that host h holds layers [h B, (h+1) B) with B = ceil(L / H): an all-to-all, no
    whole-model gather; a host past the last layer writes no file) and process 0 the file of the other tensors
    (embedding, final norm, head: gathered) and the index; the function returns once every file is written.
    """
    path = paths.resolve(path) if paths.is_url(path) else Path(path)
    save_dtype = dtype or str(jnp.dtype(_get(params, ("embed",)).dtype))
    cfg = dataclasses.replace(config, param_dtype=save_dtype)
    if jax.process_count() > 1:
        return _save_per_host(cfg, params, path, tokenizer_dir)
    np_dtype = np.dtype(jnp.dtype(save_dtype))
    tensors = list(hf_tensors(cfg))
    shard_of, sizes = {}, [0]
    for name, _, _, shape in tensors:  # greedy plan in mapping order, so shards complete one after another
        nbytes = math.prod(shape) * np_dtype.itemsize
        if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
            sizes.append(0)
        shard_of[name] = len(sizes) - 1
        sizes[-1] += nbytes
    n = len(sizes)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    _prepare_dir(path, names)
    shard, left = None, [sum(1 for s in shard_of.values() if s == i) for i in range(n)]
    entries = [entry for entry, _ in _entries(cfg)]
    ahead = _in_dtype(_get(params, entries[0].ours), save_dtype)
    for i, entry in enumerate(tqdm(entries, desc=f"save {path.name}", disable=None, leave=False)):
        leaf = ahead
        if i + 1 < len(entries):  # dispatched, not awaited: the next cast runs while this leaf is written
            ahead = _in_dtype(_get(params, entries[i + 1].ours), save_dtype)
        host = _to_host(leaf)
        for layer in range(cfg.num_layers) if entry.per_layer else [None]:  # in plan order: shard after shard
            name = entry.hf.format(i=layer) if entry.per_layer else entry.hf
            k = shard_of[name]
            if shard is None:
                shard = _ShardWriter(path / names[k], [(t, s) for t, _, _, s in tensors if shard_of[t] == k],
                                     np_dtype)
            shard.write(name, host[layer] if entry.per_layer else host)
            left[k] -= 1
            if not left[k]:
                shard.close()
                shard = None
        del leaf, host
    _write_metadata(cfg, path, tensors, names, shard_of, sum(sizes), tokenizer_dir)
    return path


def _prepare_dir(path: Path | epath.Path, names: list[str]) -> None:
    """Create `path` and remove weight files that are not part of the checkpoint about to be written there."""
    path.mkdir(parents=True, exist_ok=True)
    for old in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        if old.name not in names and old.exists():
            old.unlink()


def _write_metadata(cfg: ModelConfig, path: Path | epath.Path, tensors: list, names: list[str],
                    file_of: dict[str, int], total_size: int, tokenizer_dir: str | Path | None) -> None:
    """The index (when the weights span several files), config.json, generation_config.json, tokenizer files."""
    if len(names) > 1:
        index = {"metadata": {"total_size": total_size},
                 "weight_map": {name: names[file_of[name]] for name, _, _, _ in tensors}}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(hf_config_dict(cfg), indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation_config_dict(cfg), indent=2) + "\n")
    if tokenizer_dir is None:
        return
    copied = [f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).is_file()]
    if not copied:
        raise CheckpointError(f"{tokenizer_dir}: no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    for f in copied:
        paths.copy(Path(tokenizer_dir) / f, path / f)


def _save_per_host(cfg: ModelConfig, params: qwen3.Params, path: Path | epath.Path,
                   tokenizer_dir: str | Path | None) -> Path | epath.Path:
    """`save_hf` on several hosts, each writing its own layers (see save_hf)."""
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    n, me, layers = jax.process_count(), jax.process_index(), cfg.num_layers
    per = -(-layers // n)  # layers a host writes; the last hosts may have fewer or none
    k = -(-layers // per)  # hosts that own layers, each one file; file k: the other tensors
    mine_n = max(0, min(per, layers - me * per))
    np_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    names = [f"model-{i + 1:05d}-of-{k + 1:05d}.safetensors" for i in range(k + 1)]
    tensors = list(hf_tensors(cfg))
    file_of = {name: (layer // per if layer is not None else k) for name, _, layer, _ in tensors}
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    hosts = jax.sharding.Mesh(np.asarray(devices).reshape(n, -1), ("hosts", "local"))
    by_host = NamedSharding(hosts, P("hosts"))
    if me == 0:
        _prepare_dir(path, names)
    multihost_utils.sync_global_devices("qednano_save_hf_start")  # the directory exists, stale files are gone
    mine = (_ShardWriter(path / names[me], [(t, s) for t, _, _, s in tensors if file_of[t] == me], np_dtype)
            if mine_n else None)
    rest = (_ShardWriter(path / names[k], [(t, s) for t, _, _, s in tensors if file_of[t] == k], np_dtype)
            if me == 0 else None)
    for entry, _ in _entries(cfg):
        leaf = _get(params, entry.ours)
        if entry.per_layer:  # this host's block of layers, [per, ...] in HF layout, resharded without a gather
            blocks = _host_blocks(leaf, pad=n * per - layers, dtype=cfg.param_dtype, sharding=by_host)
            host = np.asarray(jax.device_get(blocks.addressable_shards[0].data))
            for j in range(mine_n):
                mine.write(entry.hf.format(i=me * per + j), host[j])
        else:
            host = _to_host(_in_dtype(leaf, cfg.param_dtype))  # collective
            if rest is not None:
                rest.write(entry.hf, host)
        del leaf, host
    if mine is not None:
        mine.close()
    if rest is not None:
        rest.close()
        total = sum(math.prod(shape) for _, _, _, shape in tensors) * np_dtype.itemsize
        _write_metadata(cfg, path, tensors, names, file_of, total, tokenizer_dir)
    multihost_utils.sync_global_devices("qednano_save_hf_done")  # every host's file is complete
    return path


_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


def _preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks before it is written (Linux fallocate(2)): the filesystem then maps each written page
    to a block already allocated instead of reserving one per page (a 51 MB write: 24-40 ms -> 16-19 ms on ext4).
    Where the call is missing or the filesystem does not support it, nothing happens; the write allocates as usual.
    Not posix_fallocate, which emulates the call by writing zeros where the filesystem lacks it."""
    fallocate = getattr(_libc(), "fallocate64", None)
    if fallocate is None or size <= 0:
        return
    fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fallocate(fd, 0, 0, size)  # a failure (EOPNOTSUPP, ENOSPC: the write will report it) leaves the file as it was


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


class _ShardWriter:
    """One safetensors file written tensor by tensor, straight from the arrays' buffers, each at its own offset and
    in any order (safetensors' save_file needs every tensor at once and copies each to bytes first). The header is
    known from the plan: u64 little-endian length, JSON {name: dtype, shape, data_offsets} padded with spaces to a
    multiple of 8 bytes, then the data in header order. An existing file of the same size is overwritten in place
    (every byte of it is written again), reusing its blocks and page cache: a 100 MB write took 10-11 ms that way
    against 22 ms into a new file (and up to 280 ms when the kernel had no free pages at hand). A remote `dst` is
    written to a local temporary file and copied up on close."""

    def __init__(self, dst: Path | epath.Path, specs: list[tuple[str, tuple[int, ...]]], dtype: np.dtype):
        header, off, self.at = {"__metadata__": {"format": "pt"}}, 0, {}
        for name, shape in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype.name], "shape": list(shape), "data_offsets": [off, off + nbytes]}
            self.at[name] = (off, nbytes)
            off += nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        self.dst, self.tmp = dst, (tempfile.TemporaryDirectory(prefix="qednano-hf-") if paths.is_url(dst) else None)
        self.local = Path(self.tmp.name) / dst.name if self.tmp else Path(dst)
        self.fd = os.open(self.local, os.O_WRONLY | os.O_CREAT, 0o644)
        self.base = 8 + len(head)
        if os.fstat(self.fd).st_size != self.base + off:  # a file of the same size is overwritten in place
            os.ftruncate(self.fd, 0)
            _preallocate(self.fd, self.base + off)
        self._pwrite(struct.pack("<Q", len(head)) + head, 0)

    def _pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view:  # pwrite may write less than asked (at most 2 GiB a call on Linux)
            k = os.pwrite(self.fd, view, offset)
            view, offset = view[k:], offset + k

    def write(self, name: str, a: np.ndarray) -> None:
        off, nbytes = self.at[name]
        if a.nbytes != nbytes:
            raise ValueError(f"{name}: {a.nbytes} bytes, the header says {nbytes}")
        self._pwrite(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data, self.base + off)

    def close(self) -> None:
        os.close(self.fd)
        if self.tmp:
            paths.copy(self.local, self.dst)
            self.tmp.cleanup()
