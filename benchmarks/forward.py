"""Forward throughput of our jitted Qwen3 against transformers' Qwen3ForCausalLM (torch CPU), same weights.

    python benchmarks/forward.py                        # configs/model/small.yaml, 8 x 1024 tokens
    python benchmarks/forward.py --batch 2 --seq 256 model.num_layers=2

Both sides compute fp32 logits for every position of the same random token batch; the weights go through our
HF export (save_hf) into transformers. Warm-up (compilation) runs are excluded; the figure is the median of the
timed repeats. Target (issue 2): ours >= 1.3x transformers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
from transformers import Qwen3ForCausalLM

from qednano_jax.config import ModelConfig, apply_overrides, from_dict, load_yaml
from qednano_jax.model import hf, qwen3
import machine  # benchmarks/machine.py (this script's folder is on sys.path)


def _time_interleaved(fns: dict, repeats: int, warmup: int) -> tuple[dict, dict, dict]:
    """Median wall and process-CPU seconds per call of each fn. The fns alternate within each repeat, so a machine
    whose load changes during the run (shared CI runners) slows both sides alike; the CPU seconds are a second
    view when other jobs compete for the cores."""
    outs = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            outs[name] = fn()
    wall: dict = {name: [] for name in fns}
    cpu: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            outs[name] = fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    med = lambda d: {name: statistics.median(t) for name, t in d.items()}
    return med(wall), med(cpu), outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="model/small.yaml", help="model config (a configs/ path)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="model.key=value overrides, e.g. model.num_layers=2")
    args = ap.parse_args()

    raw = apply_overrides({"model": load_yaml(args.config)}, args.overrides)["model"]
    raw = {"bos_token_id": 0, "eos_token_id": 1, **raw, "dtype": "float32", "param_dtype": "float32"}
    cfg = from_dict(ModelConfig, raw)  # small vocabularies get in-vocab bos/eos ids (transformers checks them)
    params = qwen3.init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    n_tok = tokens.size
    print(f"config {args.config} {' '.join(args.overrides)}: hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
          f"vocab {cfg.vocab_size}; batch {args.batch} x {args.seq} tokens; fp32; {jax.devices()[0].platform} "
          f"x{len(jax.devices())}, torch threads {torch.get_num_threads()}")

    fwd = jax.jit(qwen3.forward, static_argnums=0)
    tokens_dev = jax.device_put(tokens)
    with tempfile.TemporaryDirectory() as d:
        hf.save_hf(cfg, params, d)
        model = Qwen3ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tokens_t = torch.from_numpy(tokens).long()

    def torch_fwd():
        with torch.no_grad():
            return model(tokens_t).logits

    secs, cpu, outs = _time_interleaved({"ours": lambda: fwd(cfg, params, tokens_dev).block_until_ready(),
                                    "torch": torch_fwd}, args.repeats, args.warmup)
    ours_s, ref_s, ours_out, ref_out = secs["ours"], secs["torch"], outs["ours"], outs["torch"]
    diff = float(np.abs(np.asarray(ours_out[:, -8:]) - ref_out[:, -8:].numpy()).max())
    print(f"ours (jax.jit)          {n_tok / ours_s:10,.0f} tokens/s   ({ours_s:7.2f} s / batch, "
          f"{cpu['ours']:7.2f} CPU s)")
    print(f"transformers (torch)    {n_tok / ref_s:10,.0f} tokens/s   ({ref_s:7.2f} s / batch, "
          f"{cpu['torch']:7.2f} CPU s)")
    print(f"ratio ours / transformers: {ref_s / ours_s:.2f}x wall, {cpu['torch'] / cpu['ours']:.2f}x CPU time "
          f"(target >= 1.3x); max |logit diff| {diff:.2e}")


if __name__ == "__main__":
    watch = machine.Watch()  # CPU, load and other processes' CPU share before and after: run on a quiet machine
    main()
    watch.done()
