"""One accelerator, one prepared run: the project's absolute numbers on a GPU or TPU chip (random-init weights).

    PYTHONPATH=. python3 benchmarks/device.py --out DIR [--peak-flops 989e12] [--budget-s 450]   # the 4B shapes
    .venv/bin/python benchmarks/device.py --tiny --out DIR                                   # same code, tiny, CPU

Sections, cheapest first, each in its own child process (so `peak_bytes_in_use` is that section's own high-water
mark, and an out-of-memory or a crash costs one row of the table, not the run):

    export     the 4B params (fp32 on the device) to safetensors in bf16 (model.hf.save_hf: gather, cast, HF layout,
               write) against a raw write of the same bytes (the written tensors read back, then one write per
               tensor into one file): seconds, GB/s, raw / ours
    sft        the SFT step (train/step.py: bf16 compute, fp32 params, AdamW, full remat, one device) on one packed
               row of --sft-len tokens: compile s, step s, tokens/s, model TFLOP/s, MFU = model FLOP/s / --peak-flops
    attention  the attention implementations (model/attention.py) that run on this backend, forward + backward of
               one 4B layer's shapes at --attn-len tokens, against the whole-mask reference at 2,048 tokens
    rollout    the native engine (rollout/native.py, bf16 weights) on --prompts prompts of --prompt-len tokens x
               --new-tokens new tokens: prefill tokens/s (a 1-token call) and decode tokens/s (the rest)
    sft_long   the SFT step at the first of --long-lens that fits one device (the planner: 45,056 needs ~100 GiB)
    rl_long    the RL loss step (rl/losses.py rl_loss_fn: logprobs at the sampling temperature, entropy, PPO ratio)
               at --rl-len tokens (the RC stage's 49,920)

Model FLOPs are train/metrics.train_flops_per_token (6N plus causal attention, remat's recompute not counted). The
step is timed after one warm-up step, twice, both reported. Writes DIR/device.json and prints a table. Imports only
jax, flax, optax, numpy, safetensors and the project's model / train-step / rollout modules: no grain, datasets or
tensorboardX (each section reports what it imported; tests/test_device_benchmark.py checks it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("grain", "datasets", "tensorboardX")
GiB = 2 ** 30


# ----------------------------------------------------------------------------------------------- shared pieces

def model_config(tiny: bool, **overrides):
    from qednano_jax.config import ModelConfig, load_yaml
    if tiny:
        base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, max_position_embeddings=4096, dtype="bfloat16", param_dtype="float32",
                    remat_policy="full", logprob_chunk=64, attention_chunk=64)
    else:
        base = load_yaml(ROOT / "configs" / "model" / "qwen3-4b-thinking-2507.yaml")
    return ModelConfig(**{**base, **overrides})


def memory() -> dict:
    import jax
    stats = jax.local_devices()[0].memory_stats() or {}
    return {"peak_gib": stats.get("peak_bytes_in_use", 0) / GiB or None,
            "limit_gib": stats.get("bytes_limit", 0) / GiB or None}


def packed_segments(t: int, n: int):
    """[t] segment ids and positions of n equal documents packed into one row (the last one takes the remainder)."""
    import numpy as np
    size = t // n
    seg = np.minimum(np.arange(t) // size, n - 1) + 1
    pos = np.arange(t) - (seg - 1) * size
    return seg.astype(np.int32), pos.astype(np.int32)


def train_step_section(cfg, seq_len: int, loss: str, steps: int = 2) -> dict:
    """Compile and time the one-device train step (the SFT loss or the RL loss) on one packed row."""
    import jax
    import numpy as np
    from qednano_jax import sharding
    from qednano_jax.config import LossConfig, OptimConfig
    from qednano_jax.rl.batch import BATCH_KEYS, FLOAT_KEYS
    from qednano_jax.rl.losses import rl_loss_fn
    from qednano_jax.train import metrics, optim, step as step_lib

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
    rules = sharding.RULE_SETS["fsdp"]
    ocfg = OptimConfig()
    optimizer = optim.make_optimizer(ocfg, 100)
    st_sh = step_lib.state_shardings(cfg, optimizer, mesh, rules)
    rng = np.random.default_rng(0)
    seg, pos = packed_segments(seq_len, 4)
    row = lambda x: x[None, None]  # [micro 1, rows 1, t]
    tokens = rng.integers(0, cfg.vocab_size, (1, 1, seq_len), dtype=np.int32)
    targets = rng.integers(0, cfg.vocab_size, (1, 1, seq_len), dtype=np.int32)
    if loss == "sft":
        loss_fn = step_lib.sft_loss
        host = {"tokens": tokens, "targets": targets, "loss_mask": np.ones_like(tokens), "segment_ids": row(seg),
                "positions": row(pos)}
    else:
        loss_fn = rl_loss_fn(LossConfig(), 0.8)
        host = {"tokens": tokens, "targets": targets, "positions": row(pos), "segment_ids": row(seg),
                "weights": np.full((1, 1, seq_len), 1.0 / seq_len, np.float32),
                "old_logprobs": np.full((1, 1, seq_len), -2.0, np.float32),
                "advantages": np.where(row(seg) % 2, 0.5, -0.5).astype(np.float32)}
        assert set(host) == set(BATCH_KEYS) and all(host[k].dtype == np.float32 for k in FLOAT_KEYS)
    b_sh = step_lib.batch_shardings(mesh, rules, tuple(host), (1, 1, seq_len))
    fn = step_lib.make_train_step(cfg, loss_fn, optimizer, optim.schedule(ocfg, 100), mesh=mesh, rules=rules,
                                  state_sh=st_sh, batch_sh=b_sh)
    params = step_lib.random_params(cfg, 0, st_sh.params)
    state = step_lib.init_state(cfg, optimizer, params, 0, st_sh)
    batch = {k: jax.device_put(v, b_sh[k]) for k, v in host.items()}
    batch["denominator"] = jax.device_put(np.float32(seq_len), b_sh["denominator"])
    t0 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    flops = metrics.train_flops_per_token(cfg, seq_len) * seq_len
    loss_v = float(m["loss"])
    assert np.isfinite(loss_v) and float(m["finite"]) == 1.0, m
    return {"tokens": seq_len, "compile_s": compile_s, "step_s": times,
            "tokens_per_s": [seq_len / t for t in times], "model_tflop_per_s": [flops / t / 1e12 for t in times],
            "model_tflop_per_step": flops / 1e12, "loss": loss_v,
            "temp_gib": compiled.memory_analysis().temp_size_in_bytes / GiB, **memory()}


# ----------------------------------------------------------------------------------------------- sections

def section_sft(a) -> dict:
    return train_step_section(model_config(a.tiny), a.sft_len, "sft")


def section_sft_long(a) -> dict:
    """The first of --long-lens that compiles and runs on one device (a failure is recorded, the next one tried
    in a fresh child process by the parent)."""
    return train_step_section(model_config(a.tiny), a.long_len, "sft")


def section_rl_long(a) -> dict:
    return train_step_section(model_config(a.tiny), a.rl_len, "rl")


def section_attention(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from qednano_jax.model import attention
    cfg = model_config(a.tiny)
    impls = ["flash", "blocked"] + (["cudnn"] if jax.default_backend() == "gpu" else []) + (
        ["splash"] if jax.default_backend() == "tpu" else [])
    out = {}
    for t, check in ((min(2048, a.attn_len // 2), True), (a.attn_len, False)):
        rng = np.random.default_rng(0)
        q, k, v, w = (jnp.asarray(rng.normal(size=(1, t, n, cfg.head_dim)), jnp.bfloat16)
                      for n in (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads, cfg.num_heads))
        seg = jnp.asarray(packed_segments(t, 4)[0][None])
        ref = None
        if check:
            f32 = lambda x: x.astype(jnp.float32)
            ref = jax.jit(lambda q, k, v: attention.reference(q, k, v, (seg, seg)))(f32(q), f32(k), f32(v))
        for impl in impls:
            if impl == "blocked" and not check:
                continue  # quadratic backward memory: short rows only
            key = f"{impl}@{t}"
            try:
                fwd_bwd = jax.jit(lambda q, k, v, impl=impl: jax.vjp(
                    lambda q, k, v: attention.attention(q, k, v, (seg, seg), cfg.attention_chunk, impl),
                    q, k, v)[1](w))
                fwd = jax.jit(lambda q, k, v, impl=impl: attention.attention(q, k, v, (seg, seg),
                                                                           cfg.attention_chunk, impl))
                jax.block_until_ready((fwd(q, k, v), fwd_bwd(q, k, v)))
                t0 = time.perf_counter()
                o = jax.block_until_ready(fwd(q, k, v))
                t1 = time.perf_counter()
                jax.block_until_ready(fwd_bwd(q, k, v))
                t2 = time.perf_counter()
                row = {"fwd_s": t1 - t0, "fwd_bwd_s": t2 - t1}
                if ref is not None:
                    row["max_abs_err"] = float(jnp.abs(o.astype(jnp.float32) - ref).max())
                out[key] = row
            except Exception as e:  # noqa: BLE001 - an implementation this backend cannot run is a result
                out[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {"results": out, **memory()}


def section_rollout(a) -> dict:
    import jax
    import numpy as np
    from qednano_jax.model import qwen3
    from qednano_jax.rollout.base import SamplingParams
    from qednano_jax.rollout.native import NativeRollout
    cfg = model_config(a.tiny, param_dtype="bfloat16", remat_policy="none")
    params = jax.jit(lambda k: qwen3.init_params(cfg, k))(jax.random.key(0))
    engine = NativeRollout(cfg, params, max_batch=a.prompts)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, a.prompt_len).tolist() for _ in range(a.prompts)]
    one = SamplingParams(max_new_tokens=1, temperature=1.0, seed=0)
    full = SamplingParams(max_new_tokens=a.new_tokens, temperature=1.0, seed=0)
    t0 = time.perf_counter()
    engine.generate(prompts, one)
    prefill_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.generate(prompts, one)
    prefill = time.perf_counter() - t0
    runs = []
    for _ in range(2):  # the first includes the decode loop's compile
        t0 = time.perf_counter()
        out = engine.generate(prompts, full)
        runs.append((time.perf_counter() - t0, sum(len(c[0].token_ids) for c in out)))
    (first_s, _), (secs, new) = runs
    return {"prompts": a.prompts, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "generated": new,
            "prefill_s": prefill, "prefill_tokens_per_s": a.prompts * a.prompt_len / prefill,
            "prefill_first_call_s": prefill_first, "generate_s": secs, "generate_first_call_s": first_s,
            "decode_tokens_per_s": (new - a.prompts) / max(secs - prefill, 1e-9),
            "total_tokens_per_s": new / secs, **memory()}


def section_export(a) -> dict:
    import jax
    import numpy as np
    from safetensors import safe_open
    from qednano_jax.model import hf, qwen3
    from qednano_jax.train import step as step_lib
    from qednano_jax import sharding
    cfg = model_config(a.tiny)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
    p_sh = step_lib.param_shardings(cfg, mesh, sharding.RULE_SETS["fsdp"])
    params = step_lib.random_params(cfg, 0, p_sh)
    jax.block_until_ready(params)
    with tempfile.TemporaryDirectory(prefix="qednano-device-", dir=a.scratch) as tmp:
        t0 = time.perf_counter()
        out = hf.save_hf(cfg, params, Path(tmp) / "hf", dtype="bfloat16")
        ours = time.perf_counter() - t0
        files = sorted(out.glob("*.safetensors"))
        nbytes = sum(f.stat().st_size for f in files)
        tensors = []
        for f in files:
            with safe_open(str(f), "numpy") as h:
                tensors += [h.get_tensor(k) for k in h.keys()]
        del params
        raw_file = Path(tmp) / "raw.bin"
        t0 = time.perf_counter()
        with open(raw_file, "wb") as fh:
            for x in tensors:
                fh.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
        raw = time.perf_counter() - t0
        assert raw_file.stat().st_size <= nbytes
    return {"params": qwen3.count_params(qwen3.abstract_params(cfg)), "bytes": nbytes, "export_s": ours,
            "export_gb_per_s": nbytes / ours / 1e9, "raw_write_s": raw, "raw_gb_per_s": nbytes / raw / 1e9,
            "raw_over_ours": raw / ours, **memory()}


SECTIONS = {"export": section_export, "sft": section_sft, "attention": section_attention,
            "rollout": section_rollout, "sft_long": section_sft_long, "rl_long": section_rl_long}


# ----------------------------------------------------------------------------------------------- the parent

def run_child(a, name: str, timeout: float, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, __file__, "--section", name, *a.child_args, *extra]
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # JAX's GPU default of 75% cannot hold a 45k-token step
    if a.tiny:  # a smoke test whose run time is compile time: XLA's backend optimisation off
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:300]
        oom = "RESOURCE_EXHAUSTED" in p.stderr or "out of memory" in p.stderr.lower()
        return {"status": "out of memory" if oom else f"failed (exit {p.returncode})", "error": tail,
                "wall_s": wall}
    return {"status": "ok", "wall_s": wall, **json.loads(lines[-1])}


def fmt(x, nd=1) -> str:
    if x is None:
        return "-"
    if isinstance(x, list):
        return " / ".join(fmt(v, nd) for v in x)
    return f"{x:,.{nd}f}" if isinstance(x, float) else str(x)


def table(res: dict, peak: float) -> str:
    lines = ["section    status      figures"]
    for name, r in res["sections"].items():
        if r.get("status") != "ok":
            lines.append(f"{name:<10} {r.get('status')}: {r.get('error', '')}")
            continue
        if name in ("sft", "sft_long", "rl_long"):
            mfu = [f / (peak / 1e12) * 100 for f in r["model_tflop_per_s"]] if peak else None
            lines.append(f"{name:<10} ok          {r['tokens']:,} tokens: compile {fmt(r['compile_s'])} s, step "
                         f"{fmt(r['step_s'], 3)} s, {fmt(r['tokens_per_s'], 0)} tokens/s, "
                         f"{fmt(r['model_tflop_per_s'])} model TFLOP/s, MFU {fmt(mfu)} %, peak "
                         f"{fmt(r['peak_gib'])} GiB")
        elif name == "rollout":
            lines.append(f"{name:<10} ok          {r['prompts']} x ({r['prompt_len']} + {r['new_tokens']}): prefill "
                         f"{fmt(r['prefill_tokens_per_s'], 0)} tokens/s, decode {fmt(r['decode_tokens_per_s'], 0)} "
                         f"tokens/s ({r['generated']:,} generated in {fmt(r['generate_s'])} s; first call "
                         f"{fmt(r['generate_first_call_s'])} s), peak {fmt(r['peak_gib'])} GiB")
        elif name == "export":
            lines.append(f"{name:<10} ok          {r['bytes'] / 1e9:.2f} GB bf16: export {fmt(r['export_s'], 2)} s "
                         f"({fmt(r['export_gb_per_s'], 2)} GB/s), raw write {fmt(r['raw_write_s'], 2)} s "
                         f"({fmt(r['raw_gb_per_s'], 2)} GB/s): {fmt(r['raw_over_ours'], 2)}x raw")
        elif name == "attention":
            cells = [f"{k} " + (v["error"] if "error" in v else
                                f"fwd {fmt(v['fwd_s'] * 1e3)} ms, fwd+bwd {fmt(v['fwd_bwd_s'] * 1e3)} ms"
                                + (f", err {v['max_abs_err']:.1e}" if "max_abs_err" in v else ""))
                     for k, v in r["results"].items()]
            lines.append(f"{name:<10} ok          " + "; ".join(cells))
    return "\n".join(lines)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny model and short rows (the CPU test of this script)")
    ap.add_argument("--out", default="runs/device", help="folder for device.json")
    ap.add_argument("--peak-flops", type=float, default=989e12, help="the device's dense bf16 peak FLOP/s for MFU "
                    "(H200 / H100 SXM datasheet: 989e12)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget: a section that cannot start "
                    "with 30 s left is skipped, and each child is killed at the time left")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, from " + ", ".join(SECTIONS))
    ap.add_argument("--sft-len", type=int, default=None, help="SFT row length (4,096; tiny 256)")
    ap.add_argument("--long-lens", default=None, help="SFT row lengths to try, longest first (45056,32768,16384; tiny 512)")
    ap.add_argument("--rl-len", type=int, default=None, help="RL row length (49,920; tiny 256)")
    ap.add_argument("--attn-len", type=int, default=None, help="attention row length (16,384; tiny 256)")
    ap.add_argument("--prompts", type=int, default=None, help="rollout prompts (64; tiny 4)")
    ap.add_argument("--prompt-len", type=int, default=None, help="rollout prompt tokens (512; tiny 16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="rollout new tokens per prompt (1,024; tiny 16)")
    ap.add_argument("--scratch", default=None, help="folder for the export's temporary files (default: the system's)")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--long-len", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    big = dict(sft_len=4096, long_lens="45056,32768,16384", rl_len=49920, attn_len=16384, prompts=64,
               prompt_len=512, new_tokens=1024)
    tiny = dict(sft_len=128, long_lens="512", rl_len=256, attn_len=256, prompts=4, prompt_len=16,
                new_tokens=16)
    for k, v in (tiny if a.tiny else big).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.child_args = [*(["--tiny"] if a.tiny else []), f"--sft-len={a.sft_len}", f"--rl-len={a.rl_len}",
                    f"--attn-len={a.attn_len}", f"--prompts={a.prompts}", f"--prompt-len={a.prompt_len}",
                    f"--new-tokens={a.new_tokens}", *([f"--scratch={a.scratch}"] if a.scratch else [])]
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.section:  # a child: one section, one JSON line on stdout
        r = SECTIONS[a.section](a)
        r["imported_forbidden"] = sorted(m for m in FORBIDDEN if m in sys.modules)
        import jax
        r["device"] = str(jax.local_devices()[0].device_kind)
        print(json.dumps(r))
        return 0
    names = [s for s in a.sections.split(",") if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        print(f"device.py: --sections: unknown {', '.join(unknown)} (choices: {', '.join(SECTIONS)})", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import machine  # benchmarks/machine.py
    watch = machine.Watch()
    t_start = time.perf_counter()
    res = {"date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(a).items() if k != "child_args"},
           "sections": {}}
    for name in names:
        left = a.budget_s - (time.perf_counter() - t_start)
        if left < 30:
            res["sections"][name] = {"status": "skipped: out of time"}
            continue
        if name == "sft_long":
            for n in [int(x) for x in a.long_lens.split(",")]:
                left = a.budget_s - (time.perf_counter() - t_start)
                r = run_child(a, name, left, [f"--long-len={n}"]) if left >= 30 else {"status": "skipped: no time"}
                res["sections"][f"{name}"] = r
                res.setdefault("tried_long_lens", []).append({"tokens": n, "status": r["status"]})
                if r["status"] == "ok" or "time" in r["status"]:
                    break
        else:
            res["sections"][name] = run_child(a, name, left)
        print(f"{name}: {res['sections'][name]['status']} ({res['sections'][name].get('wall_s', 0):.0f} s)",
              flush=True)
    res["wall_s"] = time.perf_counter() - t_start
    res["device"] = next((r["device"] for r in res["sections"].values() if "device" in r), None)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "device.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"\n{res['device']}, {res['date']}, {res['wall_s']:.0f} s wall; MFU against {a.peak_flops:.3g} FLOP/s")
    print(table(res, a.peak_flops))
    print(f"wrote {out / 'device.json'}")
    watch.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
