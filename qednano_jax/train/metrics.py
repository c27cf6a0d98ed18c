"""Training metrics: a FLOP estimate for MFU, and one writer for stdout, metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

from qednano_jax import paths
from qednano_jax.config import ModelConfig


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward matmul FLOPs per trained token (3 x forward; the usual 6N-plus-attention estimate).

    Counts the projections, the MLP, the LM head and causal attention (q.k and p.v over seq_len / 2 keys on
    average); ignores norms, RoPE and softmax.
    """
    d, h, k, e, f, v, l = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                           cfg.vocab_size, cfg.num_layers)
    per_layer = 2 * d * (h * e + 2 * k * e) + 2 * h * e * d + 3 * 2 * d * f + 2 * 2 * h * e * (seq_len / 2)
    forward = l * per_layer + 2 * d * v
    return 3.0 * forward


class MetricsWriter:
    """Appends each step's scalars to run_dir/metrics.jsonl and TensorBoard (run_dir/tb); only on process 0.

    With run_dir on a store (gs://...) metrics.jsonl is a `paths.AppendFile`, and the TensorBoard events are written
    to a local temporary directory whose files are copied to run_dir/tb at most every `paths.SYNC_S` seconds and on
    close (tensorboardX writes gs:// and s3:// itself but no other scheme; one way serves every URL).
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, start_step: int = 0):
        """`start_step`: the step a resumed run restarts after; lines and TensorBoard events of later steps (written
        by the interrupted run after its last checkpoint) are dropped, so each step is logged once."""
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        run_dir = paths.resolve(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if path.exists():
            keep = [line for line in path.read_text().splitlines(keepends=True)
                    if line.strip() and _step_of(line) <= start_step and line.endswith("\n")]
            path.write_text("".join(keep))
        self.jsonl = paths.AppendFile(path)
        self.tb_dir, self.tb_local = run_dir / "tb", None
        if paths.is_url(run_dir):
            self.tb_local, self.synced = Path(tempfile.mkdtemp(prefix="qednano-tb-")), time.monotonic()
        from tensorboardX import SummaryWriter
        # purge_step: TensorBoard discards the earlier events of steps >= it (the interrupted run's tail)
        self.tb = SummaryWriter(str(self.tb_local or self.tb_dir), purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        for k, v in scalars.items():
            self.tb.add_scalar(f"train/{k}", v, step)
        if self.tb_local is not None and time.monotonic() - self.synced >= paths.SYNC_S:
            self.tb.flush()
            self._upload_tb()

    def _upload_tb(self) -> None:
        self.tb_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted(self.tb_local.iterdir()):
            paths.copy(f, self.tb_dir / f.name)
        self.synced = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
            if self.tb_local is not None:
                self._upload_tb()
                shutil.rmtree(self.tb_local)


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", math.inf))
    except ValueError:  # a torn last line of a killed run
        return math.inf


def format_metrics(step: int, m: dict) -> str:
    parts = [f"step {step}"]
    for k in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu"):
        if k in m:
            parts.append(f"{k} {m[k]:.4g}")
    return " | ".join(parts)
