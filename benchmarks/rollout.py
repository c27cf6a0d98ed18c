"""Rollout throughput and refit cost, side by side in one run (issue 4 targets).

    .venv/bin/python benchmarks/rollout.py [--size small|tiny] [--prompts 32] [--new-tokens 128] [--sglang-busy-poll]
    .venv/bin/python benchmarks/rollout.py --prompts 8 --new-tokens 2048      # the long-generation shape

Generated tokens/s for `--prompts` prompts x `--new-tokens` greedy tokens on one random Qwen3 checkpoint (a 512-token
BPE vocabulary trained here) for: the native engine (in process), `python -m qednano_jax.serve` over HTTP,
transformers `generate` (torch fp32, batched, left-padded), and the real SGLang server on CPU (fp32, --sleep-on-idle
unless --sglang-busy-poll; only when QEDNANO_SGLANG_VENV is set). Greedy, so every engine produces the same tokens;
each is warmed up first (compile time reported apart). Targets (issue 15): native >= 1.5x SGLang, >= 3x transformers;
export >= 0.8x and refit (export + update) >= 0.5x raw write speed.

Refit, per server, 5 refits with the default keep_last = 2, each after `os.sync()` (untimed, as the raw write); the
figure is the best of the last 3, the steady state of a training run, where each export overwrites the files of the
oldest one in place (the first two write new files; all five are printed): export (`refit.export_version`: gather
the params to the host, cast, write the safetensors file into a temp dir, rename, set older exports aside for
deletion on a background thread) and
update (`/update_weights_from_disk` with flush_cache: the server reads the file and copies it into its model; then
`/get_model_info` to confirm the version). The reference, "raw write", is best of 3 of safetensors' own `save_file`
of the same tensors, already on the host and already in HF layout, onto the same disk: serialisation and the file
write only. So export - raw write is our overhead (host copies, casts, rename, prune), and update is the
server's load, which a faster writer cannot shorten. Speeds are raw write seconds / our seconds (1.0x = as fast).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

from qednano_jax import hostmem
from qednano_jax.config import ModelConfig, RolloutConfig
from qednano_jax.data.tokenizer import load_tokenizer, train_tiny_tokenizer
from qednano_jax.model import hf, qwen3
from qednano_jax.rollout import SamplingParams, make_rollout
from qednano_jax.rollout import refit as refit_lib
import machine  # benchmarks/machine.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent
SIZES = {  # vocabulary: the 512-token tokenizer trained below (SGLang needs a real tokenizer dir)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
    "small": dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64),
}
CORPUS = [f"Let n = {i}. Then n^2 = {i * i}, and n + {j} = {i + j}." for i in range(60) for j in (1, 2, 5)] + [
    "Proof. Suppose, for contradiction, that the claim fails.", "By induction on n the sum equals n^2.",
    "Hence |a + b| <= |a| + |b|, which completes the proof.", "Therefore x is divisible by 3. QED."] * 5


def build_checkpoint(root: Path, size: str, new_tokens: int) -> tuple[ModelConfig, dict, Path]:
    """The random checkpoint (HF dir under `root`), with room for a prompt plus `new_tokens` generated tokens."""
    positions = max(2048, 1 << (new_tokens + 64 - 1).bit_length())
    tok_dir = train_tiny_tokenizer(CORPUS, root / "tokenizer", vocab_size=512)
    tok = load_tokenizer(tok_dir)
    cfg = ModelConfig(vocab_size=len(tok), initializer_range=0.1, max_position_embeddings=positions,
                      bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), **SIZES[size])
    params = qwen3.init_params(cfg, jax.random.key(0))
    return cfg, params, hf.save_hf(cfg, params, root / "model", tokenizer_dir=tok_dir)


def make_prompts(tok, n: int) -> list[list[int]]:
    return [tok(f"Let n = {i}. Then n^2 = {i * i}, hence" + " so" * (i % 7))["input_ids"] for i in range(n)]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_rollout(rollout, prompts, new_tokens, full_warmup=True):
    """Warm-up (the full call when it compiles the same shapes, else a 2-prompt x 4-token call), then a timed call."""
    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    small = SamplingParams(max_new_tokens=4, temperature=0)
    _, warm = timed(lambda: rollout.generate(prompts, sp) if full_warmup else rollout.generate(prompts[:2], small))
    out, secs = timed(lambda: rollout.generate(prompts, sp))
    return sum(len(g[0].token_ids) for g in out), secs, warm, [g[0].token_ids for g in out]


def bench_transformers(model_dir, prompts, new_tokens, eos_ids):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def run(n):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, temperature=None,
                                  top_p=None, top_k=None, pad_token_id=0)
    _, warm = timed(lambda: run(4))
    out, secs = timed(lambda: run(new_tokens))
    toks = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        toks.append(row[:end])
    return sum(map(len, toks)), secs, warm, toks


def start_server(cmd: list[str], url: str, log: Path, timeout: float = 600) -> subprocess.Popen:
    import requests
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited; see {log}")
        try:
            if requests.get(f"{url}/health_generate", timeout=30).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no answer from {url}; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, 9)


def raw_write_seconds(cfg, params, path: Path) -> float:
    """safetensors' save_file of the same tensors, already on the host in HF layout (read back, untimed, from an
    export), as one file."""
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(hf.save_hf(cfg, params, path / "src") / hf.SINGLE_FILE))
    os.sync()
    _, secs = timed(lambda: save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"}))
    return secs


def synced_refit(client, params, version: str):
    """One timed refit after os.sync() (untimed), then (untimed) the background deletion of the pruned export."""
    os.sync()
    r = client.refit(params, version)
    refit_lib.wait_pruned()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--port", type=int, default=31870)
    ap.add_argument("--sglang-busy-poll", action="store_true",
                    help="run SGLang in its default mode, its scheduler polling a whole core (default here: "
                         "--sleep-on-idle, as the tests run it; on a 2-core machine the busy poller slows the client)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    cfg, params, model_dir = build_checkpoint(root, args.size, args.new_tokens)
    tok = load_tokenizer(model_dir)
    prompts = make_prompts(tok, args.prompts)
    print(f"checkpoint {args.size}: {qwen3.count_params(params) / 1e6:.1f}M params, {args.prompts} prompts x "
          f"{args.new_tokens} new tokens (greedy), prompt lengths {min(map(len, prompts))}-{max(map(len, prompts))},"
          f" {os.cpu_count()} CPU cores")
    rows, ref_tokens = {}, None

    def report(name, result):
        nonlocal ref_tokens
        n, secs, warm, toks = result
        same = "" if ref_tokens is None else ("  same tokens" if toks == ref_tokens else "  TOKENS DIFFER")
        ref_tokens = ref_tokens or toks
        rows[name] = n / secs
        print(f"  {name:<26} {n:6d} tokens  {secs:7.2f}s  {n / secs:9.1f} tok/s   (warm-up {warm:.1f}s){same}",
              flush=True)

    print("generation:")
    native = make_rollout(RolloutConfig(backend="native", max_batch=max(args.prompts, 1)), cfg, params, tok)
    report("native (in process)", bench_rollout(native, prompts, args.new_tokens))
    report("transformers generate", bench_transformers(model_dir, prompts, args.new_tokens, set(native.eos_ids)))

    servers = [("qednano_jax.serve (HTTP)", [sys.executable, "-m", "qednano_jax.serve", "--model-path",
                                             str(model_dir), "--port", str(args.port)])]
    venv = os.environ.get("QEDNANO_SGLANG_VENV")
    here = Path(os.environ.get("QEDNANO_SGLANG_CPU") or ROOT.parent / "shared" / "sglang-cpu")
    if venv:
        env_cmd = ["env", "SGLANG_USE_CPU_ENGINE=1", "HF_HUB_OFFLINE=1", f"PYTHONPATH={here / 'stand-in'}"]
        servers.append(("SGLang CPU (HTTP)", env_cmd + [f"{venv}/bin/python", "-m", "sglang.launch_server",
                                                        "--model-path", str(model_dir), "--device", "cpu",
                                                        "--host", "127.0.0.1", "--port", str(args.port + 1),
                                                        "--max-total-tokens",
                                                        str(max(16384, args.prompts * (args.new_tokens + 64))), "--dtype", "float32"]
                        + ([] if args.sglang_busy_poll else ["--sleep-on-idle"])))
    else:
        print("  SGLang CPU: skipped (QEDNANO_SGLANG_VENV unset)")
    refits = {}
    raws = []
    for _ in range(3):
        raws.append(raw_write_seconds(cfg, params, root / "raw"))
        shutil.rmtree(root / "raw")
    raw = min(raws)
    new_params = qwen3.init_params(cfg, jax.random.key(1))
    for i, (name, cmd) in enumerate(servers):  # SGLang compiles nothing: a short warm-up is enough
        url = f"http://127.0.0.1:{args.port + i}"
        proc = start_server(cmd, url, root / f"server-{i}.log")
        try:
            client = make_rollout(RolloutConfig(backend="sglang", urls=(url,), concurrency=args.prompts,
                                                refit_dir=str(root / f"refit-{i}")), cfg)
            report(name, bench_rollout(client, prompts, args.new_tokens, full_warmup="SGLang" not in name))
            refits[name] = [synced_refit(client, new_params if k % 2 == 0 else params, f"v{k}") for k in range(5)]
        finally:
            stop_server(proc)

    print("ratios:")
    nat = rows["native (in process)"]
    for name, tps in rows.items():
        if name != "native (in process)":
            print(f"  native / {name:<26} {nat / tps:6.2f}x")
    print(f"refit of {qwen3.count_params(params) * 4 / 1e6:.0f} MB (fp32), best of refits 3-5; raw safetensors "
          f"write {raw:.3f}s (best of 3; see the module doc). Speed = raw write s / our s:")
    for name, rs in refits.items():
        best = min(rs[2:], key=lambda r: r.total_s)
        print(f"  {name:<26} export {best.export_s:.3f}s ({raw / best.export_s:.2f}x; target 0.8x) + update "
              f"{best.update_s:.3f}s ({raw / best.update_s:.2f}x) = refit {best.total_s:.3f}s "
              f"({raw / best.total_s:.2f}x; target 0.5x)")
        print(f"  {'':<26} all five, export + update: "
              + ", ".join(f"{r.export_s:.3f} + {r.update_s:.3f}" for r in rs))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    hostmem.use_huge_pages()  # as `python -m qednano_jax.train`, where refits run; both sides alike
    watch = machine.Watch()  # CPU, load and other processes' CPU share before and after: run on a quiet machine
    main()
    watch.done()
