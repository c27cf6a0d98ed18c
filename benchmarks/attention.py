"""Attention implementations side by side: forward+backward time and XLA's compiled temporaries of a 2-layer
scanned, fully rematerialised decoder stack, at growing row lengths, with the growth ratio per doubling.

    python benchmarks/attention.py                                  # 2k, 4k, 8k, 16k tokens; flash, blocked, splash
    python benchmarks/attention.py --lengths 2048,4096 --impls flash,blocked --repeats 3

The shape is the one the memory test uses (hidden 512, 4 heads of 128, 2 KV heads, one packed row of 3 segments,
fp32). Temp bytes are from `compiled.memory_analysis()` (deterministic); times are medians of the timed repeats
after one warm-up run. `splash` runs in Pallas interpret mode off TPU, so only its memory is a fair figure here;
it is timed only with --time-splash. A run whose temporaries exceed --max-run-gib is compiled but not run.
Run on a quiet machine (the script prints the load average before and after and warns when it was busy).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import machine  # benchmarks/machine.py (this script's folder is on sys.path)
from qednano_jax.config import ModelConfig
from qednano_jax.model import qwen3


def step_fn(impl: str, block: int):
    cfg = ModelConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=128, remat_policy="full", attention_impl=impl, attention_chunk=block)

    def loss(p, tok, seg, pos):
        h = qwen3.hidden_states(cfg, p, tok, positions=pos, segment_ids=seg)
        return jnp.sum(qwen3.token_logprobs(cfg, p, h, tok))

    return cfg, jax.jit(jax.value_and_grad(loss))


def packed_row(t: int):
    tok = np.random.default_rng(0).integers(0, 1024, (1, t)).astype(np.int32)
    cuts = [0, t // 3, (2 * t) // 3, t]
    seg = np.zeros((1, t), np.int32)
    pos = np.zeros((1, t), np.int32)
    for i in range(3):
        seg[0, cuts[i]:cuts[i + 1]] = i + 1
        pos[0, cuts[i]:cuts[i + 1]] = np.arange(cuts[i + 1] - cuts[i])
    return tok, seg, pos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="2048,4096,8192,16384")
    ap.add_argument("--impls", default="flash,blocked,splash")
    ap.add_argument("--block", type=int, default=512, help="model.attention_chunk")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-run-gib", type=float, default=8.0)
    ap.add_argument("--time-splash", action="store_true")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    impls = args.impls.split(",")
    watch = machine.Watch()
    print(f"{jax.devices()[0].platform} x{len(jax.devices())}; 2 layers, hidden 512, 4 x 128 heads, 2 KV heads, "
          f"full remat, fp32, block {args.block}, value_and_grad of one packed row")
    rows = {}
    for impl in impls:
        cfg, fn = step_fn(impl, args.block)
        params = qwen3.init_params(cfg, jax.random.key(0))
        for t in lengths:
            tok, seg, pos = packed_row(t)
            t0 = time.perf_counter()
            compiled = fn.lower(params, tok, seg, pos).compile()
            compile_s = time.perf_counter() - t0
            temp = compiled.memory_analysis().temp_size_in_bytes
            secs = None
            if temp <= args.max_run_gib * 2**30 and (impl != "splash" or args.time_splash):
                jax.block_until_ready(compiled(params, tok, seg, pos))
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(compiled(params, tok, seg, pos))
                    times.append(time.perf_counter() - t0)
                secs = statistics.median(times)
            rows[impl, t] = (temp, secs, compile_s)
    print(f"{'impl':8} {'tokens':>7} {'temp GiB':>9} {'x/doubling':>10} {'fwd+bwd s':>10} {'x/doubling':>10} "
          f"{'tokens/s':>9} {'compile s':>9}")
    for impl in impls:
        prev = None
        for t in lengths:
            temp, secs, cs = rows[impl, t]
            grow = f"{temp / prev[0]:.2f}" if prev else "-"
            tgrow = f"{secs / prev[1]:.2f}" if prev and secs and prev[1] else "-"
            sec_s = f"{secs:.3f}" if secs else "not run"
            tps = f"{t / secs:,.0f}" if secs else "-"
            print(f"{impl:8} {t:7d} {temp / 2**30:9.3f} {grow:>10} {sec_s:>10} {tgrow:>10} {tps:>9} {cs:9.1f}")
            prev = (temp, secs)
    watch.done()


if __name__ == "__main__":
    main()
