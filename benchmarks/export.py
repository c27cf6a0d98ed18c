"""HF export cost against a raw safetensors write of the same tensors, fp32 and bf16, side by side in one run.

    .venv/bin/python benchmarks/export.py [--size small|tiny|medium] [--repeats 3]

For each dtype, best of `--repeats`:
- raw write: safetensors' own `save_file` of the tensors already on the host, already cast and already in HF layout
  (read back untimed from an export), as one file: serialisation and the file write
  only (the same reference as benchmarks/rollout.py);
- save_hf: `model.hf.save_hf` from the on-device params (gather, cast, write each tensor from its buffer, metadata;
  our params are in HF's layout, so there is no transpose);
- export_version: `rollout.refit.export_version` with the default keep_last = 2, in the steady state of a training
  run (two untimed exports first): save_hf into the temp dir that the oldest export was renamed to, overwriting its
  file in place, then rename. What a refit pays before the servers load the file.
Speed = raw write s / our s (target >= 0.8x). Every other file is deleted before the next write, and every timed write
starts after `os.sync()` (untimed), so none is throttled by the kernel flushing an earlier one's dirty pages (without
it the raw write alone varied 10x, 0.025-0.25 s, run to run). Files go to a fresh temp dir under /tmp (or `--dir`).
The script re-executes itself with glibc's huge-page tunable, as the trainer (where refits run) does
(qednano_jax/hostmem.py): both sides run in that one process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qednano_jax import hostmem
from qednano_jax.config import ModelConfig
from qednano_jax.model import hf, qwen3
from qednano_jax.rollout import refit
import machine  # benchmarks/machine.py (this script's folder is on sys.path)

SIZES = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16),
    "small": dict(vocab_size=512, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                  num_kv_heads=4, head_dim=64),  # the checkpoint of benchmarks/rollout.py: 102 MB in fp32
    "medium": dict(vocab_size=32768, hidden_size=1024, intermediate_size=3072, num_layers=12, num_heads=16,
                   num_kv_heads=8, head_dim=64),
}


def raw_write(cfg: ModelConfig, params, dtype: str, path: Path) -> float:
    """Seconds of safetensors' save_file of the HF tensors (read back, untimed, from a save_hf export: already on the
    host, cast and in HF layout) as one file into `path`."""
    from safetensors.numpy import load_file, save_file
    hf.save_hf(cfg, params, path / "src", dtype=dtype)
    tensors = load_file(str(path / "src" / hf.SINGLE_FILE))
    os.sync()
    t0 = time.perf_counter()
    save_file(tensors, str(path / hf.SINGLE_FILE), metadata={"format": "pt"})
    return time.perf_counter() - t0


def timed(fn) -> float:
    os.sync()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the files go (default: a fresh temp dir)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-export-", dir=args.dir))
    cfg = ModelConfig(initializer_range=0.1, **SIZES[args.size])
    params = jax.block_until_ready(qwen3.init_params(cfg, jax.random.key(0)))
    n = qwen3.count_params(params)
    print(f"checkpoint {args.size}: {n / 1e6:.1f}M params; best of {args.repeats}; speed = raw write s / our s")
    try:
        for dtype in ("float32", "bfloat16"):
            np_dtype = np.dtype(jnp.dtype(dtype))
            times = {"raw write": [], "save_hf": [], "export_version": []}
            for k in range(2):  # the refit's steady state: from the third export on, the oldest one is overwritten
                refit.export_version(cfg, params, root / "refit", f"warm{k}", dtype=dtype)
            for k in range(args.repeats):
                times["raw write"].append(raw_write(cfg, params, dtype, root / "raw"))
                shutil.rmtree(root / "raw")
                times["save_hf"].append(timed(lambda: hf.save_hf(cfg, params, root / "hf", dtype=dtype)))
                shutil.rmtree(root / "hf")
                times["export_version"].append(timed(lambda: refit.export_version(
                    cfg, params, root / "refit", f"v{k}", dtype=dtype)))
                refit.wait_pruned()
            shutil.rmtree(root / "refit")
            raw = min(times["raw write"])
            print(f"{dtype} ({n * np_dtype.itemsize / 1e6:.0f} MB):")
            for name, ts in times.items():
                best = min(ts)
                print(f"  {name:<15} {best:7.3f}s  ({raw / best:.2f}x)   all: {', '.join(f'{t:.3f}' for t in ts)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    hostmem.use_huge_pages()  # as `python -m qednano_jax.train`, where refits run; both sides alike
    watch = machine.Watch()
    main()
    watch.done()
