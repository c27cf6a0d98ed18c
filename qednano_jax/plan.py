"""Sharding planner: `python -m qednano_jax.plan [CONFIG] [key=value ...] [--devices 8,32] [--tpu v5p] [--json PATH]
[--seq-len N] [--strategies dp,fsdp]` (the flags are shorthands for the plan.* config fields listed below).

Answers "does this config fit, and how fast would it run?" before paying for a pod (docs/design.md scale targets). For
each device count (plan.devices) and strategy (plan.strategies: the rule sets dp, fsdp, tp, fsdp_tp, fsdp_sp,
fsdp_tp_sp of sharding.py and the config's own mesh section) it compiles the REAL train step of the config's stage
(train/step.py make_train_step around sft_loss for `stage: sft`, around the RL loss of rl/losses.py for `rl` and `rc`;
the config's optimizer, remat policy and attention implementation) ahead of time on fake CPU devices from abstract
shapes (ShapeDtypeStructs carrying their shardings: no weights are allocated), for the stage's micro-batches
(`stage_step`) of plan.rows_per_device rows x plan.seq_len tokens per data-parallel shard, and reports per device:

  bytes      params, optimizer state (from the compiled step's input shardings), the fp32 gradients (sharded
             like the params; part of temp; with train.micro_batches > 1 the accumulator is another such buffer),
             and XLA's memory_analysis(): arguments, outputs, donated aliases and temporaries.
             peak = arguments + outputs - aliases + temporaries; fits = peak <= the TPU generation's HBM per
             device (configs/tpu.yaml).
  flops      matmul FLOPs counted from the compiled HLO's dot instructions, each computation weighted by how often it
             runs: while loops by XLA's known trip counts (the layer scan), and loops whose bounds are traced (flash
             attention's causal block loops) by the mean trip count model/attention.py puts in their name scope, so
             the attention's real work is counted, causal skipping included. XLA's cost_analysis() counts a loop
             body once (reported as xla_cost_flops: an undercount by about num_layers).
  collective all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute from the compiled HLO: count
             and bytes (the full buffer of the op, trip counts applied) and the ring-algorithm bytes each device
             sends ("link bytes": all-reduce 2(n-1)/n, gathers, scatters and all-to-all (n-1)/n, permutes 1x).
  estimate   step time = max(compute: flops / peak FLOP/s, memory: HLO operand + result bytes / HBM bandwidth,
             network: link bytes / ICI bandwidth), all per device; MFU = model FLOPs (metrics.train_flops_per_token,
             the 6N + attention count) / (step time x peak). A roofline-style bound, not a measurement: the CPU
             compiler's fusion and buffer decisions differ from the TPU compiler's, and the network term assumes the
             whole per-chip ICI bandwidth serves each collective with no overlap. The HBM term counts every
             unfused instruction's operands and results at the CPU compiler's (coarser) fusion granularity, so it
             is an upper bound; mfu_without_hbm (compute and network terms only) is the optimistic end.

A strategy whose rules do not divide a parameter dimension (tp over 64 devices with 8 KV heads) is reported as not
divisible with the offending axes, not compiled (plan.fallback=true compiles it with those axes replicated, as
sharding.py does at train time); a mesh the device count cannot form is reported as invalid, and a compile that
raises as compile failed.

JAX needs one CPU device per target device: the process sets XLA_FLAGS=--xla_force_host_platform_device_count=N
before importing jax, or re-runs itself in a subprocess when jax is already initialised with fewer devices.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from qednano_jax.config import CONFIGS_DIR, Config, ConfigError, load_config, to_dict

BUILTIN = ("dp", "fsdp", "tp", "fsdp_tp", "fsdp_sp", "fsdp_tp_sp")
TRIPS = "qednano_mean_trips="  # = model.attention.TRIPS (not imported: jax must not load before XLA_FLAGS is set)


# ----------------------------------------------------------------------------------------------- TPU table

def load_tpu(name: str, path: str | Path = CONFIGS_DIR / "tpu.yaml") -> dict:
    """configs/tpu.yaml entry `name` (or an alias) with per-DEVICE figures added (per chip / devices_per_chip)."""
    gens = yaml.safe_load(Path(path).read_text())["generations"]
    key = name.lower()
    for gen, row in gens.items():
        if key == gen or key in [a.lower() for a in row.get("aliases", [])]:
            per = row.get("devices_per_chip", 1)
            return {"name": gen, **row,
                    "device_peak_flops_per_s": row["peak_bf16_flops_per_s"] / per,
                    "device_hbm_bytes": row["hbm_bytes"] / per,
                    "device_hbm_bandwidth_bytes_per_s": row["hbm_bandwidth_bytes_per_s"] / per,
                    "device_ici_bandwidth_bytes_per_s": row["ici_bandwidth_bytes_per_s"] / per}
    raise ConfigError(f"plan.tpu: {name!r} is not a generation in {path} (known: {', '.join(gens)})")


# ----------------------------------------------------------------------------------------------- HLO text analysis

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_CALLEE = re.compile(r"\b(calls|body|to_apply|branch_computations|true_computation|false_computation)="
                     r"(\{[^}]*\}|%[\w.\-]+)")
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "iota"}


def array_dims(shape: str) -> list[tuple[str, list[int]]]:
    """[(dtype, dims)] of every array in an HLO shape string (a tuple shape lists several)."""
    return [(t, [int(d) for d in dims.split(",") if d]) for t, dims in _ARRAY.findall(shape) if t in DTYPE_BYTES]


def shape_bytes(shape: str) -> float:
    return sum(DTYPE_BYTES[t] * math.prod(d) for t, d in array_dims(shape))


def _split_shape(rest: str) -> tuple[str, str]:
    """'SHAPE op(...), attrs' -> (SHAPE, 'op(...), attrs'); tuple shapes are parenthesised."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1:].strip()
    shape, _, tail = rest.partition(" ")
    return shape, tail.strip()


def _operands(call: str) -> tuple[list[str], str]:
    """'op(%a, %b), attrs' -> (['a', 'b'], 'attrs')."""
    start = call.index("(")
    depth = 0
    for i in range(start, len(call)):
        depth += call[i] == "("
        depth -= call[i] == ")"
        if depth == 0:
            return re.findall(r"%([\w.\-]+)", call[start:i]), call[i + 1:]
    return re.findall(r"%([\w.\-]+)", call[start:]), ""


def parse_hlo(text: str) -> tuple[dict[str, list[dict]], str]:
    """HLO module text -> ({computation: [instruction dicts]}, entry computation name)."""
    comps: dict[str, list[dict]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = comps.setdefault(m.group(1), [])
                if line.startswith("ENTRY"):
                    entry = m.group(1)
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        shape, call = _split_shape(m.group(2))
        op = re.match(r"([\w\-]+)", call)
        if not op:
            continue
        operands, attrs = _operands(call)
        param = re.match(r"parameter\((\d+)\)", call)
        current.append({"name": m.group(1), "shape": shape, "op": op.group(1), "operands": operands, "attrs": attrs,
                        "root": line.lstrip().startswith("ROOT"), "param": int(param.group(1)) if param else None})
    return comps, entry


def _traffic(ins: dict, comps: dict, shapes: dict) -> float:
    """HBM bytes one unfused instruction (or fusion) reads and writes. A slice of a big buffer reads only the
    slice, and a dynamic-update-slice writes only the update (in place), whether alone or inside a fusion: flash
    attention's block loops slice and update whole-row buffers every iteration, which full-operand counting would
    charge as whole-row traffic per block."""
    op = ins["op"]
    if op == "dynamic-slice":
        return 2.0 * shape_bytes(ins["shape"])
    if op == "dynamic-update-slice":
        return 2.0 * shape_bytes(shapes.get(ins["operands"][1], ""))
    operand_bytes = [shape_bytes(shapes.get(o, "")) for o in ins["operands"]]
    out = shape_bytes(ins["shape"])
    callee = re.search(r"calls=%?([\w.\-]+)", ins["attrs"]) if op == "fusion" else None
    body = comps.get(callee.group(1), []) if callee else []
    if not body:
        return out + sum(operand_bytes)
    users: dict[str, list[dict]] = {}
    for i in body:
        for o in i["operands"]:
            users.setdefault(o, []).append(i)
    params = {i["param"]: i["name"] for i in body if i["op"] == "parameter"}
    total = 0.0
    for idx, nbytes in enumerate(operand_bytes):
        us = users.get(params.get(idx, ""), [])
        if us and all(u["op"] in ("dynamic-slice", "dynamic-update-slice") and u["operands"][0] == params[idx]
                      for u in us):  # read as slices; updated in place (the update is the root's write below)
            total += sum(shape_bytes(u["shape"]) for u in us if u["op"] == "dynamic-slice")
        else:
            total += nbytes
    root = next((i for i in body if i["root"]), None)
    if root is not None and root["op"] == "dynamic-update-slice":
        local = {i["name"]: i["shape"] for i in body}
        out = shape_bytes(local.get(root["operands"][1], ""))
    return total + out


def _trip_count(attrs: str) -> float | None:
    """A while loop's trip count: XLA's known_trip_count, else the mean that model.attention put in the loop's
    name scope (`attention.trips_scope`: loops whose bounds are traced, e.g. flash attention's causal key loop)."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', attrs)
    if m:
        return int(m.group(1))
    m = re.search(r'op_name="[^"]*' + re.escape(TRIPS) + r'([0-9.e+\-]+)/while"', attrs)
    return float(m.group(1)) if m else None


def _group_size(attrs: str, num_devices: int) -> int:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = {k.strip("' "): int(v) for k, v in re.findall(r"('[^']+')=(\d+)", m.group(1))}
        return math.prod(sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip())
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    return num_devices


def analyze_hlo(text: str, num_devices: int) -> dict:
    """Per-device matmul FLOPs, HBM traffic and collectives of one compiled (SPMD-partitioned) HLO module, each
    computation weighted by how many times it runs (while bodies x known trip count)."""
    comps, entry = parse_hlo(text)
    shapes = {i["name"]: i["shape"] for instrs in comps.values() for i in instrs}
    runs: dict[str, float] = {}
    fused: set[str] = set()
    unknown_trips = 0

    def visit(comp: str, times: float) -> None:
        nonlocal unknown_trips
        runs[comp] = runs.get(comp, 0.0) + times
        for ins in comps.get(comp, []):
            for kind, target in _CALLEE.findall(ins["attrs"]):
                if kind == "to_apply":  # scalar reducers of reduce / all-reduce / sort: no traffic of their own
                    continue
                factor = 1.0
                if kind == "body":
                    trips = _trip_count(ins["attrs"])
                    unknown_trips += trips is None
                    factor = float(trips or 1)
                if kind == "calls" and ins["op"] == "fusion":
                    fused.update(re.findall(r"%?([\w.\-]+)", target))
                for callee in re.findall(r"%?([\w.\-]+)", target):
                    if callee in comps:
                        visit(callee, times * factor)

    visit(entry, 1.0)
    flops = hbm = 0.0
    coll = {op: {"count": 0.0, "bytes": 0.0, "link_bytes": 0.0} for op in COLLECTIVES}
    for comp, times in runs.items():
        for ins in comps[comp]:
            op = ins["op"]
            if op == "dot":
                lhs = array_dims(shapes.get(ins["operands"][0], ""))
                out = array_dims(ins["shape"])
                m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins["attrs"])
                if lhs and out and m:
                    contract = math.prod(lhs[0][1][int(d)] for d in m.group(1).split(",") if d)
                    flops += times * 2.0 * math.prod(out[0][1]) * contract
            operand_bytes = sum(shape_bytes(shapes.get(o, "")) for o in ins["operands"])
            if comp not in fused and op not in _NO_TRAFFIC and not op.endswith("-done"):
                hbm += times * _traffic(ins, comps, shapes)
            base = op[:-6] if op.endswith("-start") else op
            if base in COLLECTIVES:
                size = max(shape_bytes(ins["shape"]), operand_bytes)
                if op.endswith("-start"):  # async start ops return (operands, results): count the results only
                    size = shape_bytes(ins["shape"]) - operand_bytes
                n = _group_size(ins["attrs"], num_devices)
                factor = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(base, (n - 1) / n)
                c = coll[base]
                c["count"] += times
                c["bytes"] += times * size
                c["link_bytes"] += times * size * factor
    return {"matmul_flops": flops, "hbm_bytes": hbm, "collectives": coll, "unknown_trip_counts": unknown_trips}


# ----------------------------------------------------------------------------------------------- one plan

def strategy_mesh(cfg: Config, name: str) -> tuple[dict, dict]:
    """(mesh shape, rules) of a named rule set, or of the config's mesh section for `config`."""
    from qednano_jax import sharding
    if name == "config":
        return dict(cfg.mesh.shape), dict(cfg.mesh.rules)
    if name not in sharding.RULE_SETS:
        raise ConfigError(f"plan.strategies: {name!r} is not one of {list(sharding.RULE_SETS) + ['config']}")
    return dict(sharding.MESH_SHAPES[name]), dict(sharding.RULE_SETS[name])


def _norm_rules(rules: dict) -> dict:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in rules.items() if v is not None}


def divisibility_problems(model_cfg, mesh, rules) -> list[str]:
    """Parameter axes whose rule names mesh axes that do not divide the dimension (sharding.py would replicate)."""
    import jax
    from qednano_jax.model import qwen3
    from qednano_jax.sharding import _as_tuple

    out: list[str] = []
    axes = jax.tree.leaves(qwen3.param_axes(model_cfg), is_leaf=lambda x: isinstance(x, tuple))
    shapes = jax.tree.leaves(qwen3.param_shapes(model_cfg), is_leaf=lambda x: isinstance(x, tuple))
    for ax, shape in zip(axes, shapes):
        for name, dim in zip(ax, shape):
            target = [a for a in _as_tuple(rules.get(name) if name else None) if mesh.shape.get(a, 1) > 1]
            size = math.prod(mesh.shape[a] for a in target) if target else 1
            msg = f"{name} ({dim}) % {'x'.join(target)} ({size})"
            if target and dim % size and msg not in out:
                out.append(msg)
    return out


def _shard_bytes(tree, shardings) -> int:
    import jax
    return sum(int(math.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def stage_step(cfg: Config):
    """(loss_fn, {batch key: dtype}, micro-batches) of the train step this config's stage runs: the SFT loss over
    train.micro_batches micro-batches, or for `rl` / `rc` the RL loss (trainer logprobs at the sampling temperature,
    entropy, PPO ratio, packed weights) over 2 micro-batches (an RL step always accumulates: its fp32 accumulator
    is planned; memory is per micro-batch, FLOPs x 2)."""
    import numpy as np
    from qednano_jax.train import step as step_lib
    if cfg.stage == "sft":
        keys = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
        return step_lib.sft_loss, {k: np.int32 for k in keys}, cfg.train.micro_batches
    from qednano_jax.rl.batch import BATCH_KEYS, FLOAT_KEYS, loss_tokens_per_row
    from qednano_jax.rl.losses import rl_loss_fn
    return (rl_loss_fn(cfg.rl.loss, cfg.rl.temperature, loss_tokens_per_row(cfg)),
            {k: np.float32 if k in FLOAT_KEYS else np.int32 for k in BATCH_KEYS}, 2)


def plan_one(cfg: Config, strategy: str, n_devices: int, tpu: dict) -> dict:
    """Compile the train step for one (strategy, device count) and collect its figures (see the module doc)."""
    import jax
    import jax.numpy as jnp
    from qednano_jax import sharding
    from qednano_jax.model import qwen3
    from qednano_jax.train import metrics, optim, step as step_lib

    model_cfg = cfg.model
    shape, rules = strategy_mesh(cfg, strategy)
    row: dict[str, Any] = {"strategy": strategy, "devices": n_devices, "mesh": None, "status": "ok", "reason": ""}
    if jax.device_count() < n_devices:
        raise RuntimeError(f"plan: {n_devices} devices requested, jax has {jax.device_count()} (set XLA_FLAGS "
                           f"--xla_force_host_platform_device_count before importing jax)")
    try:
        mesh = sharding.make_mesh(shape, jax.devices()[:n_devices])
    except ValueError as e:
        return {**row, "status": "invalid", "reason": str(e)}
    row["mesh"] = dict(mesh.shape)
    problems = divisibility_problems(model_cfg, mesh, rules)
    if problems:
        row["reason"] = "; ".join(problems)
        if not cfg.plan.fallback:
            return {**row, "status": "not divisible"}
        row["status"] = "replicated fallback"

    seq_len = cfg.plan.seq_len or cfg.data.seq_len
    seq_shards = math.prod(mesh.shape[a] for a in sharding._as_tuple(rules.get("act_length")) if a in mesh.shape)
    if seq_shards > 1 and seq_len % (2 * seq_shards):
        return {**row, "status": "not divisible", "reason": f"seq_len ({seq_len}) % 2 x sequence ({2 * seq_shards})"}
    dp = math.prod(mesh.shape[a] for a in sharding._as_tuple(rules.get("batch")) if a in mesh.shape)
    rows = cfg.plan.rows_per_device * dp
    optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
    st_sh = step_lib.state_shardings(model_cfg, optimizer, mesh, rules)
    loss_fn, dtypes, micro = stage_step(cfg)
    b_sh = step_lib.batch_shardings(mesh, rules, dtypes, (micro, rows, seq_len))
    fn = step_lib.make_train_step(model_cfg, loss_fn, optimizer, optim.schedule(cfg.optim, cfg.train.steps),
                                  mesh=mesh, rules=rules, state_sh=st_sh, batch_sh=b_sh)
    params = qwen3.abstract_params(model_cfg)
    state = jax.eval_shape(lambda: step_lib.TrainState(params=params, opt_state=optimizer.init(params),
                                                       step=jnp.zeros((), jnp.int32), rng=jnp.zeros((2,), jnp.uint32)))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, st_sh)
    batch = {k: jax.ShapeDtypeStruct((micro, rows, seq_len), dt, sharding=b_sh[k]) for k, dt in dtypes.items()}
    batch["denominator"] = jax.ShapeDtypeStruct((), jnp.float32, sharding=b_sh["denominator"])

    t0 = time.perf_counter()
    try:
        compiled = fn.lower(state, batch).compile()
    except Exception as e:  # noqa: BLE001 - one strategy failing to build is a result, not the end of the plan
        return {**row, "status": "compile failed", "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    row["compile_s"] = time.perf_counter() - t0

    mem = compiled.memory_analysis()
    n_params = qwen3.count_params(params)
    p_bytes = _shard_bytes(state.params, st_sh.params)
    grad_bytes = sum(int(math.prod(s.shard_shape(x.shape))) * 4
                     for x, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(st_sh.params)))
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    row["bytes"] = {"params": p_bytes, "opt_state": _shard_bytes(state.opt_state, st_sh.opt_state),
                    "grads": grad_bytes, "temp": mem.temp_size_in_bytes,
                    "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
                    "aliased": mem.alias_size_in_bytes, "peak": peak}
    # the analytic count: params + AdamW m and v in the param dtype, divided by the mesh axes the rules shard params on
    param_axes = {a for name, t in rules.items() if name not in ("batch",) and not name.startswith("act_")
                  for a in sharding._as_tuple(t) if mesh.shape.get(a, 1) > 1}
    factor = math.prod(mesh.shape[a] for a in param_axes) if param_axes else 1
    itemsize = jnp.dtype(model_cfg.param_dtype).itemsize
    analytic = 3 * itemsize * n_params / factor
    row["analytic"] = {"params": n_params, "bytes_per_param": 3 * itemsize, "shard_factor": factor,
                       "params_opt_bytes": analytic,
                       "ratio": (row["bytes"]["params"] + row["bytes"]["opt_state"]) / analytic}

    hlo = analyze_hlo(compiled.as_text(), n_devices)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    tokens = micro * rows * seq_len
    model_flops = metrics.train_flops_per_token(model_cfg, seq_len) * tokens / n_devices
    row["flops"] = {"hlo_matmul": hlo["matmul_flops"], "model": model_flops,
                    "xla_cost_flops": float(cost.get("flops", 0.0)), "unknown_trip_counts": hlo["unknown_trip_counts"]}
    row["collectives"] = {k: v for k, v in hlo["collectives"].items() if v["count"]}
    link = sum(v["link_bytes"] for v in hlo["collectives"].values())
    t = {"compute_s": hlo["matmul_flops"] / tpu["device_peak_flops_per_s"],
         "hbm_s": hlo["hbm_bytes"] / tpu["device_hbm_bandwidth_bytes_per_s"],
         "ici_s": link / tpu["device_ici_bandwidth_bytes_per_s"]}
    step_s = max(t.values())
    row["estimate"] = {**t, "hbm_traffic_bytes": hlo["hbm_bytes"], "link_bytes": link, "step_s": step_s,
                       "bound": max(t, key=t.get)[:-2], "tokens_per_step": tokens,
                       "tokens_per_s_per_device": tokens / n_devices / step_s if step_s else 0.0,
                       "mfu": model_flops / (step_s * tpu["device_peak_flops_per_s"]) if step_s else 0.0,
                       "mfu_without_hbm": model_flops / (max(t["compute_s"], t["ici_s"])
                                                          * tpu["device_peak_flops_per_s"]) if step_s else 0.0}
    row["fits"] = peak <= tpu["device_hbm_bytes"]
    return row


def strategies_for(cfg: Config) -> list[str]:
    out = []
    for name in cfg.plan.strategies:
        if name == "config":
            same = any(strategy_mesh(cfg, b)[0] == dict(cfg.mesh.shape)
                       and _norm_rules(strategy_mesh(cfg, b)[1]) == _norm_rules(dict(cfg.mesh.rules)) for b in BUILTIN)
            if same:
                continue
        strategy_mesh(cfg, name)  # validates the name
        out.append(name)
    return out


def plan(cfg: Config, log=print) -> dict:
    """All (device count, strategy) plans of `cfg` in this process (needs max(plan.devices) jax devices)."""
    from qednano_jax.model import qwen3
    tpu = load_tpu(cfg.plan.tpu)
    rows = []
    for n in cfg.plan.devices:
        for s in strategies_for(cfg):
            log(f"plan: {s} on {n} devices ...")
            rows.append(plan_one(cfg, s, n, tpu))
    return {"tpu": {k: v for k, v in tpu.items() if k != "aliases"}, "seq_len": cfg.plan.seq_len or cfg.data.seq_len,
            "stage": cfg.stage, "rows_per_device": cfg.plan.rows_per_device, "micro_batches": stage_step(cfg)[2],
            "model": {"params": qwen3.count_params(qwen3.abstract_params(cfg.model)), **to_dict(cfg.model)},
            "results": rows}


# ----------------------------------------------------------------------------------------------- output

def _fmt(x: float, unit: float) -> str:
    return f"{x / unit:.2f}"


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


_SHORT = {"all-reduce": "AR", "all-gather": "AG", "reduce-scatter": "RS", "all-to-all": "A2A",
          "collective-permute": "CP"}


def format_table(report: dict) -> str:
    """Fixed-width table of a `plan` report: bytes per device (GiB, or MiB for small models), collectives as
    `op count/size`, the step-time estimate with its compute / HBM / ICI terms in ms."""
    tpu = report["tpu"]
    peaks = [r["bytes"]["peak"] for r in report["results"] if "bytes" in r]
    unit, uname = (2**30, "GiB") if max(peaks, default=0) >= 2**30 else (2**20, "MiB")
    _gb = lambda x: _fmt(x, unit)  # noqa: E731
    head = ["devices", "strategy", "mesh d/f/t/s", "params", "opt", "grads", "temp", "peak", "fits", "collectives",
            "TFLOP", "step ms", "compute/hbm/ici ms", "MFU (no HBM)", "compile s"]
    lines = [head]
    for r in report["results"]:
        mesh = "/".join(str(r["mesh"].get(a, 1)) for a in ("data", "fsdp", "tensor", "sequence")) if r["mesh"] else "-"
        if "bytes" not in r:
            lines.append([str(r["devices"]), r["strategy"], mesh, r["status"] + ": " + r["reason"]])
            continue
        b, e = r["bytes"], r["estimate"]
        coll = " ".join(f"{_SHORT[k]} {v['count']:.0f}/{_gb(v['bytes'])}" for k, v in r["collectives"].items()) or "-"
        lines.append([str(r["devices"]), r["strategy"] + ("*" if r["status"] != "ok" else ""), mesh,
                      _gb(b["params"]), _gb(b["opt_state"]), _gb(b["grads"]), _gb(b["temp"]), _gb(b["peak"]),
                      "yes" if r["fits"] else "NO", coll, _num(r['flops']['hlo_matmul'] / 1e12),
                      _num(e['step_s'] * 1e3),
                      "/".join(_num(e[k] * 1e3) for k in ("compute_s", "hbm_s", "ici_s")),
                      f"{e['mfu']:.1%} ({e['mfu_without_hbm']:.0%})", f"{r['compile_s']:.0f}"])
    widths = [max(len(l[i]) for l in lines if len(l) > i and len(l) == len(head)) for i in range(len(head))]
    out = [f"TPU {tpu['name']}: {tpu['device_hbm_bytes'] / 2**30:.1f} GiB HBM, "
           f"{tpu['device_peak_flops_per_s'] / 1e12:.0f} TFLOP/s per device; {report.get('stage', 'sft')} step, "
           f"{report.get('micro_batches', 1)} "
           f"micro-batch(es) of {report['rows_per_device']} row(s) x {report['seq_len']} tokens per "
           f"data-parallel shard; {report['model']['params']:,} params; bytes in {uname} per device"]
    for l in lines:
        out.append(("  ".join(c.ljust(w) for c, w in zip(l, widths)) if len(l) == len(head)
                    else "  ".join(c.ljust(w) for c, w in zip(l[:3], widths)) + "  " + l[3]).rstrip())
    if any(r["status"] == "replicated fallback" for r in report["results"]):
        out.append("* compiled with the non-divisible axes replicated (plan.fallback)")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- CLI

def _parse(argv: list[str]) -> tuple[str | None, list[str]]:
    """CONFIG, overrides; --devices/--tpu/--json/--seq-len/--strategies become plan.* overrides."""
    flags = {"--devices": "plan.devices", "--tpu": "plan.tpu", "--json": "plan.json", "--seq-len": "plan.seq_len",
             "--strategies": "plan.strategies"}
    path, overrides, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        key, _, val = a.partition("=")
        if key in flags:
            if not val:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{key}: missing value")
                i, val = i + 1, argv[i + 1]
            if key in ("--devices", "--strategies"):
                val = "[" + val + "]"
            overrides.append(f"{flags[key]}={val}")
        elif "=" in a:
            overrides.append(a)
        elif path is None and not a.startswith("-"):
            path = a
        else:
            raise ConfigError(f"plan: unexpected argument {a!r} (usage: python -m qednano_jax.plan [CONFIG] "
                              "[key=value ...] [--devices 8,32] [--tpu v5p] [--json PATH])")
        i += 1
    return path, overrides


def _device_flags(n: int) -> str:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    return f"{flags} --xla_force_host_platform_device_count={n}".strip()


def main(argv: list[str] | None = None) -> int:
    from qednano_jax import cli
    return cli.run(lambda: _main(list(sys.argv[1:] if argv is None else argv)))


def _main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        from qednano_jax.config import PlanConfig, describe
        print(__doc__)
        print("\n".join(describe(PlanConfig, "plan.")))
        return 0
    path, overrides = _parse(argv)
    cfg = load_config(path, overrides)
    strategies_for(cfg)
    load_tpu(cfg.plan.tpu)
    need = max(cfg.plan.devices)
    from jax._src import xla_bridge  # XLA_FLAGS is read when the first backend starts, not at `import jax`
    if not xla_bridge.backends_are_initialized():
        os.environ["XLA_FLAGS"] = _device_flags(need)
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    if jax.default_backend() != "cpu" or jax.device_count() < need:
        env = {**os.environ, "XLA_FLAGS": _device_flags(need), "JAX_PLATFORMS": "cpu"}
        return subprocess.run([sys.executable, "-m", "qednano_jax.plan", *argv], env=env).returncode
    report = plan(cfg, log=lambda m: print(m, file=sys.stderr))
    print(format_table(report))
    if cfg.plan.json:
        Path(cfg.plan.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.plan.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {cfg.plan.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
