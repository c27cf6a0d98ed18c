"""RC loop throughput: the jitted native RC loop (one program for all turns) against the host loop (one generate
call per turn and role), on the same tiny model, problems and seeds.

    python benchmarks/rc.py                                  # 8 problems, 3 turns, 64 reasoning + 32 summary tokens
    python benchmarks/rc.py --problems 16 --reasoning 128 --serve

Both sides run rc/cycle.py's `rc_turn` over the same RC state: `rc_loop_jit` on the native engine's jitted decode
loop, and `rc_loop_host` over a Rollout backend: the in-process `NativeRollout` (always) and, with --serve, the
same checkpoint behind `python -m qednano_jax.serve` over HTTP. Decoding is greedy, so every side generates the
same tokens (checked: "same states"). tokens/s counts reasoning + summarizer tokens; warm-up (compilation) runs are
excluded; the figure is the median of interleaved repeats. Target (issue 6): jitted >= 1.5x the host loop.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from qednano_jax.config import ModelConfig
from qednano_jax.data.tokenizer import load_tokenizer, train_tiny_tokenizer
from qednano_jax.model import qwen3
from qednano_jax.rc import cycle, prompts, state as rcs
from qednano_jax.rollout.base import SamplingParams
from qednano_jax.rollout.native import NativeRollout
import machine  # benchmarks/machine.py (this script's folder is on sys.path)

WORDS = "let n be an integer so that the sum of squares is even hence by induction every prime p divides x".split()


def _problems(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [f"Generate a rigorous proof to the following question:\n\nProblem {i}: prove that "
            + " ".join(rng.choice(WORDS, size=int(rng.integers(12, 30)))) + "." for i in range(n)]


def _serve(model_dir: Path) -> tuple[subprocess.Popen, str]:
    import requests
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qednano_jax.serve", "--model-path", str(model_dir), "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if requests.get(f"{url}/health_generate", timeout=30).status_code == 200:
                return proc, url
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError("qednano_jax.serve did not become healthy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--reasoning", type=int, default=64, help="H_R: reasoning tokens per turn")
    ap.add_argument("--summary", type=int, default=32, help="H_S: summary tokens per turn")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--serve", action="store_true", help="also time the host loop over HTTP (qednano_jax.serve)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="rc-bench-"))
    tok_dir = train_tiny_tokenizer([prompts.SOLVE_PROMPT, prompts.SUMMARY_PROMPT, *_problems(64)] * 4, tmp / "tok", 512)
    tok = load_tokenizer(tok_dir)
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_layers=args.layers, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096,
                      initializer_range=0.1, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    params = qwen3.init_params(cfg, jax.random.key(0))
    engine = NativeRollout(cfg, params, tok, max_batch=max(64, args.problems))
    tpl = cycle.make_templates(tok, step_by_step=True)
    pb, pl = cycle.tokenize_texts(tok, _problems(args.problems))
    s0 = rcs.init_state(np.arange(args.problems), [], turns=args.turns, summary_width=args.summary,
                        reasoning_width=args.reasoning)
    # greedy: the HTTP server draws its own per-request random streams, so only greedy decoding gives every side
    # the same tokens (the in-process sides also agree when sampled: tests/rc/test_train.py)
    psp = SamplingParams(max_new_tokens=args.reasoning, temperature=0.0, seed=11)
    ssp = SamplingParams(max_new_tokens=args.summary, temperature=0.0, seed=12)

    sides = {
        "jitted": lambda: jax.block_until_ready(
            cycle.run_native(engine, engine, tpl, pb, pl, s0, policy_sampling=psp, summary_sampling=ssp)),
        "host (native)": lambda: cycle.rc_loop_host(engine, engine, tpl, pb, pl, s0, policy_sampling=psp,
                                                    summary_sampling=ssp),
    }
    server = None
    if args.serve:
        from qednano_jax.config import RolloutConfig
        from qednano_jax.model.hf import save_hf
        from qednano_jax.rollout import make_rollout
        save_hf(cfg, params, str(tmp / "model"), tokenizer_dir=tok_dir)
        server, url = _serve(tmp / "model")
        http = make_rollout(RolloutConfig(backend="sglang", urls=(url,)), cfg)
        sides["host (HTTP serve)"] = lambda: cycle.rc_loop_host(http, http, tpl, pb, pl, s0, policy_sampling=psp,
                                                                summary_sampling=ssp)
    try:
        outs = {name: fn() for name, fn in sides.items()}          # warm-up: compiles every shape once
        outs = {name: fn() for name, fn in sides.items()}
        times: dict = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                t0 = time.perf_counter()
                outs[name] = fn()
                times[name].append(time.perf_counter() - t0)
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
    ref = outs["jitted"]
    tokens = int(np.asarray(ref.lengths).sum() + np.asarray(ref.summary_tokens).sum())
    print(f"model hidden {args.hidden}, {args.layers} layers, vocab {cfg.vocab_size}; {args.problems} problems x "
          f"{args.turns} turns, H_R {args.reasoning}, H_S {args.summary}; {tokens} generated tokens per run; "
          f"{jax.devices()[0].platform}; median of {args.repeats}")
    base = statistics.median(times["jitted"])
    print(f"{'loop':<20}{'s/run':>10}{'tokens/s':>12}{'jitted / this':>16}{'same states':>14}")
    for name, t in times.items():
        med = statistics.median(t)
        same = all(np.array_equal(np.asarray(getattr(ref, f)), np.asarray(getattr(outs[name], f)))
                   for f in ("outputs", "history", "lengths", "summary_tokens"))
        print(f"{name:<20}{med:>10.3f}{tokens / med:>12.1f}{med / base:>15.2f}x{str(same):>14}")


if __name__ == "__main__":
    watch = machine.Watch()  # CPU, load and other processes' CPU share before and after: run on a quiet machine
    main()
    watch.done()
