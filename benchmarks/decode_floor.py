"""How fast a decode step can be on this machine: the weight matmuls of one step alone, against the native engine's
step and transformers `generate`, side by side in one run.

    .venv/bin/python benchmarks/decode_floor.py [--size small|tiny] [--prompts 32] [--new-tokens 128]

Issue 15 asks the native engine for >= 3x transformers `generate` at 32 prompts x 128 tokens (benchmarks/rollout.py).
This script bounds what any fp32 engine compiled by XLA:CPU can reach here. The floor is one decode step with
everything but the weight matmuls taken out: q, k, v, o, gate, up and down of every layer and the LM head, each
as the engine computes it ([batch, hidden] @ W.T, a 2-D matmul over the same weights), layer after layer, in a
compiled loop of `--new-tokens` steps (best of 3). No attention, norms, RoPE, KV cache or sampling; the outputs
are chained only by cheap elementwise ops. Ceiling tokens/s = batch / floor step, and ceiling / transformers is
the most an engine that does these matmuls could beat transformers by. The native engine's own step (its timed
generate / new tokens, prefill included; each engine the faster of two warmed-up calls) is printed beside it, with the share of it the floor takes.
Same random checkpoint and prompts as benchmarks/rollout.py. Some rows stop at EOS before `--new-tokens` (the
same rows in both engines); tokens/s count the tokens generated, as rollout.py does, while the ceiling counts
every row in every step, so it overstates what an engine can reach on these prompts: a bound, not a target.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from qednano_jax.config import RolloutConfig
from qednano_jax.data.tokenizer import load_tokenizer
from qednano_jax.model import qwen3
from qednano_jax.rollout import make_rollout
import machine  # benchmarks/machine.py (this script's folder is on sys.path)
import rollout as bench  # benchmarks/rollout.py: the checkpoint, the prompts, the engines' timed calls


def matmul_steps(cfg, params, x_bd: jax.Array, steps: int) -> jax.Array:
    """`steps` decode steps of weight matmuls only (module docstring), as the engine runs them: `params` from
    qwen3.unstack_layers, each layer's weights an array of its own."""
    layers = params["layers"]
    head = qwen3.head_weight(cfg, params)
    g = cfg.num_heads // cfg.num_kv_heads

    def step(_, x):
        h = x[:, None, :]
        for lp in layers:
            q, k, v = (qwen3._to_heads(h, lp[name]) for name in ("q_proj", "k_proj", "v_proj"))
            a = q + jnp.repeat(k + v, g, axis=2)  # keeps k and v live; attention itself is left out
            h = h + qwen3._from_heads(a, lp["o_proj"])
            gate, up = (jnp.einsum("btd,fd->btf", h, lp[name]) for name in ("gate_proj", "up_proj"))
            h = h + jnp.einsum("btf,df->btd", jax.nn.silu(gate) * up, lp["down_proj"])
        logits = jnp.einsum("btd,vd->btv", h, head)
        return x * 0.5 + logits.mean(-1)  # [b, 1] broadcast: the next step depends on this one

    return jax.lax.fori_loop(0, steps, step, x_bd)


def floor_step_s(cfg, params, batch: int, steps: int, repeats: int = 3) -> float:
    run = jax.jit(matmul_steps, static_argnums=(0, 3))
    x = jax.random.normal(jax.random.key(1), (batch, cfg.hidden_size), jnp.dtype(cfg.dtype))
    params = jax.block_until_ready(qwen3.unstack_layers(params))  # outside the jit, as NativeRollout places them
    jax.block_until_ready(run(cfg, params, x, steps))  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(cfg, params, x, steps))
        best = min(best, time.perf_counter() - t0)
    return best / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(bench.SIZES), default="small")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-floor-"))
    try:
        measure(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure(args: argparse.Namespace, root: Path) -> None:
    cfg, params, model_dir = bench.build_checkpoint(root, args.size, args.new_tokens)
    tok = load_tokenizer(model_dir)
    prompts = bench.make_prompts(tok, args.prompts)
    b, n = args.prompts, args.new_tokens

    native = make_rollout(RolloutConfig(backend="native", max_batch=b), cfg, params, tok)
    best = lambda runs: min(runs, key=lambda r: r[1])  # each engine: the faster of two warmed-up timed calls
    ntoks, nsecs, _, ntok_ids = best([bench.bench_rollout(native, prompts, n) for _ in range(2)])
    floor = floor_step_s(cfg, params, b, n)
    htoks, hsecs, _, htok_ids = best([bench.bench_transformers(model_dir, prompts, n, set(native.eos_ids))
                                      for _ in range(2)])
    ceiling, native_rate, hf_rate = b / floor, ntoks / nsecs, htoks / hsecs
    print(f"checkpoint {args.size}: {qwen3.count_params(params) / 1e6:.1f}M params, {b} prompts x {n} new tokens "
          f"(greedy), {ntoks} generated (rows stop at EOS); same tokens from both engines: {ntok_ids == htok_ids}")
    print(f"  matmul floor        {floor * 1e3:7.2f} ms/step   ceiling {ceiling:7.1f} tok/s")
    print(f"  native engine       {nsecs / n * 1e3:7.2f} ms/step   {native_rate:7.1f} tok/s   "
          f"(the floor is {floor / (nsecs / n):.0%} of its step)")
    print(f"  transformers        {hsecs / n * 1e3:7.2f} ms/step   {hf_rate:7.1f} tok/s")
    print(f"  ceiling / transformers {ceiling / hf_rate:.2f}x;  native / transformers {native_rate / hf_rate:.2f}x "
          f"(target 3x)")


if __name__ == "__main__":
    watch = machine.Watch()
    main()
    watch.done()
