"""SFT step throughput: our jitted step vs transformers Qwen3 + torch AdamW, same config and batch (CPU, fp32).

    python benchmarks/sft_step.py [--batch 2] [--seq 256] [--steps 3] [--model small]

Each side runs in its own subprocess (so peak RSS is its own), with the glibc huge-page tunable that
`python -m qednano_jax.train` sets for itself (qednano_jax/hostmem.py), and does: forward, backward, global-norm
clip 1.0, AdamW. Prints tokens/s of both and their ratio (target >= 1.6x), our MFU against a measured CPU fp32
matmul peak (target >= 50%), and each side's peak host memory against params + grads + AdamW moments (16 bytes /
param; target at most 2x).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import machine  # benchmarks/machine.py (this script's folder is on sys.path)

from qednano_jax import hostmem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(vocab: int, batch: int, seq: int, seed: int = 0):
    import numpy as np
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qednano_jax import sharding
    from qednano_jax.config import ModelConfig, OptimConfig, from_dict, load_yaml
    from qednano_jax.model import qwen3
    from qednano_jax.train import metrics, optim, step as step_lib

    cfg = from_dict(ModelConfig, load_yaml(f"{ROOT}/configs/model/{args.model}.yaml"))
    base_rss = _rss_mb()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    rules = sharding.RULE_SETS["dp"]
    ocfg = OptimConfig(lr=1e-4, warmup_ratio=0.0, schedule="constant", clip_norm=1.0)
    opt = optim.make_optimizer(ocfg, 100)
    st_sh = step_lib.state_shardings(cfg, opt, mesh, rules)
    state = step_lib.init_state(cfg, opt, step_lib.random_params(cfg, 0, st_sh.params), 0, st_sh)
    keys = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    b_sh = step_lib.batch_shardings(mesh, rules, keys, (1, args.batch, args.seq))
    fn = step_lib.make_train_step(cfg, step_lib.sft_loss, opt, optim.schedule(ocfg, 100), mesh=mesh, rules=rules,
                                  state_sh=st_sh, batch_sh=b_sh)
    tokens, targets = _batch(cfg.vocab_size, args.batch, args.seq)
    ones = np.ones_like(tokens)
    b = {"tokens": tokens, "targets": targets, "loss_mask": ones, "segment_ids": ones,
         "positions": np.broadcast_to(np.arange(args.seq, dtype=np.int32), tokens.shape).copy()}
    b = jax.device_put({k: v[None] for k, v in b.items()}, {k: b_sh[k] for k in keys})
    b["denominator"] = jnp.float32(tokens.size)
    fn = step_lib.compile_step(fn, state, b)  # as train/sft.py does
    state, m = fn(state, b)  # warm up
    jax.block_until_ready(m)
    losses = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = fn(state, b)
        losses.append(float(m["loss"]))
    dt = (time.perf_counter() - t0) / args.steps
    n = qwen3.count_params(state.params)
    return {"tokens_per_s": tokens.size / dt, "step_s": dt, "params": n, "loss": losses,
            "flops_per_token": metrics.train_flops_per_token(cfg, args.seq),
            "peak_rss_mb": _rss_mb(), "base_rss_mb": base_rss}


def run_torch(args) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qednano_jax.config import ModelConfig, from_dict, load_yaml

    torch.set_num_threads(os.cpu_count() or 1)
    c = from_dict(ModelConfig, load_yaml(f"{ROOT}/configs/model/{args.model}.yaml"))
    base_rss = _rss_mb()
    hf = Qwen3Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                     num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
                     rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
                     max_position_embeddings=c.max_position_embeddings, attention_dropout=0.0)
    hf._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(hf).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    tokens, targets = _batch(c.vocab_size, args.batch, args.seq)
    x, y = torch.from_numpy(tokens).long(), torch.from_numpy(targets).long()

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    step()  # warm up
    losses = []
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses.append(step())
    dt = (time.perf_counter() - t0) / args.steps
    n = sum(p.numel() for p in model.parameters())
    return {"tokens_per_s": tokens.size / dt, "step_s": dt, "params": n, "loss": losses,
            "peak_rss_mb": _rss_mb(), "base_rss_mb": base_rss}


def run_peak(args) -> dict:
    """fp32 matmul FLOP/s of this CPU (jitted 2048^3 dots): the MFU denominator."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(3):
            out = f(a)
        out.block_until_ready()
        best = max(best, 3 * 2 * n ** 3 / (time.perf_counter() - t0))
    return {"flops": best}


def _side(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--side", name, "--batch", str(args.batch), "--seq",
           str(args.seq), "--steps", str(args.steps), "--model", args.model]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    env = hostmem.huge_pages_env(env) or env  # every side runs as `python -m qednano_jax.train` would
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name} side failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=("jax", "torch", "peak"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--model", default="small", help="configs/model/<name>.yaml")
    args = p.parse_args()
    if args.side:
        print(json.dumps({"jax": run_jax, "torch": run_torch, "peak": run_peak}[args.side](args)))
        return
    peak = _side("peak", args)["flops"]
    ours = _side("jax", args)
    ref = _side("torch", args)
    mfu = ours["tokens_per_s"] * ours["flops_per_token"] / peak
    state_mb = 16 * ours["params"] / 2 ** 20
    print(f"SFT step, configs/model/{args.model}.yaml ({ours['params']:,} params), batch {args.batch} x "
          f"{args.seq} tokens, fp32, {os.cpu_count()} CPU threads, {args.steps} timed steps after a warm-up")
    print(f"{'':28s}{'qednano_jax':>14s}{'torch+HF':>14s}")
    print(f"{'tokens/s':28s}{ours['tokens_per_s']:14.1f}{ref['tokens_per_s']:14.1f}")
    print(f"{'step time (s)':28s}{ours['step_s']:14.3f}{ref['step_s']:14.3f}")
    print(f"{'peak RSS (MiB)':28s}{ours['peak_rss_mb']:14.0f}{ref['peak_rss_mb']:14.0f}")
    print(f"{'RSS after imports (MiB)':28s}{ours['base_rss_mb']:14.0f}{ref['base_rss_mb']:14.0f}")
    print(f"{'loss (timed steps)':28s}{ours['loss'][-1]:14.4f}{ref['loss'][-1]:14.4f}")
    print(f"speed ratio ours/torch: {ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x (target >= 1.6x)")
    print(f"MFU: {ours['tokens_per_s'] * ours['flops_per_token'] / 1e9:.1f} GFLOP/s of model FLOPs vs measured "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s = {100 * mfu:.0f}% (target >= 50%)")
    print(f"params + grads + AdamW m, v = {state_mb:.0f} MiB; peak RSS minus import baseline: ours "
          f"{ours['peak_rss_mb'] - ours['base_rss_mb']:.0f} MiB ({(ours['peak_rss_mb'] - ours['base_rss_mb']) / state_mb:.2f}x), "
          f"torch {ref['peak_rss_mb'] - ref['base_rss_mb']:.0f} MiB "
          f"({(ref['peak_rss_mb'] - ref['base_rss_mb']) / state_mb:.2f}x; target <= 2x)")


if __name__ == "__main__":
    if "--side" in sys.argv:  # a measured side: its last stdout line is its JSON result
        main()
    else:
        watch = machine.Watch()  # CPU, load and other processes' CPU share before and after: run on a quiet machine
        main()
        watch.done()
