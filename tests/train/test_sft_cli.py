"""The SFT CLI end to end: a run SIGKILLed mid-training and restarted with the same command matches the
uninterrupted run bit for bit and consumes each example once per epoch; the tiny model overfits the bundled
sample data; config errors name the field."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from qednano_jax.config import Config
from qednano_jax.data.tokenizer import train_tiny_tokenizer
from sft_rows import WORDS, make_rows, write_jsonl

N_ROWS = 10


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_cli")
    rows = make_rows(N_ROWS, min_words=5, max_words=15)
    data = write_jsonl(d / "rows.jsonl", rows)
    tok = train_tiny_tokenizer([" ".join(WORDS)] * 10 + [r["problem"] for r in rows], d / "tok", 320)
    from transformers import AutoTokenizer
    vocab = len(AutoTokenizer.from_pretrained(str(tok)))
    return d, [f"data.path={data}", f"data.tokenizer={tok}", "data.seq_len=128", f"model.vocab_size={vocab}",
               "model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=4", "model.num_kv_heads=2",
               "model.head_dim=8", "model.logprob_chunk=32", "train.batch_size=4", "train.micro_batches=2",
               "train.steps=24", "optim.lr=3e-3", "checkpoint.every=3", "train.export_hf=false",
               "train.progress=false", "mesh.shape={data: 2, fsdp: -1, tensor: 1}"]


def _cli(args, run_dir):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "qednano_jax.train", *args, f"train.run_dir={run_dir}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _last_per_step(path: Path, key: str) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec[key]
    return out


@pytest.fixture(scope="module")
def reference(tiny_setup):
    """The uninterrupted 24-step run: its per-step losses."""
    d, args = tiny_setup
    ref = _cli(args, d / "ref")
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out
    ref_loss = _last_per_step(d / "ref" / "metrics.jsonl", "loss")
    assert sorted(ref_loss) == list(range(1, 25))
    return ref_loss


def _signal_once_logged(proc, metrics: Path, lines: int, sig) -> None:
    """Send `sig` to `proc` as soon as `metrics` holds `lines` lines (or give up when it ends first)."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= lines:
            proc.send_signal(sig)
            return
        time.sleep(0.02)


def _steps_logged(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_sigterm_saves_the_step_exits_0_and_resumes_exactly(tiny_setup, reference):
    """SIGTERM (how a spot TPU VM is stopped) mid-run: the step finishes, a checkpoint of it is saved, exit 0 with
    how to resume; the same command then continues, every step logged once, losses equal to the uninterrupted run."""
    d, args = tiny_setup
    run = d / "term"
    victim = _cli(args, run)
    metrics = run / "metrics.jsonl"
    _signal_once_logged(victim, metrics, 4, signal.SIGTERM)
    out, _ = victim.communicate(timeout=600)
    assert victim.returncode == 0, out
    last = _steps_logged(metrics)[-1]
    assert last < 24 and f"SIGTERM: stopped after step {last} with a checkpoint at step {last}" in out
    assert "re-run the same command to resume" in out
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == last  # saved at the step it stopped on, not at the last multiple of checkpoint.every
    assert not (run / ".lock").exists()
    again = _cli(args, run)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert f"step {last}" in out and "resumed from" in out
    assert _steps_logged(metrics) == list(range(1, 25))
    assert _last_per_step(metrics, "loss") == reference


def test_sigkill_resume_is_bit_exact(tiny_setup, reference):
    d, args = tiny_setup
    ref_loss = reference

    victim = _cli(args, d / "run")
    metrics = d / "run" / "metrics.jsonl"
    _signal_once_logged(victim, metrics, 8, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = len(metrics.read_text().splitlines())
    assert killed_at < 24
    again = _cli(args, d / "run")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert "resumed from" in out
    loss = _last_per_step(metrics, "loss")
    assert loss == ref_loss  # every step, bit for bit (floats round-trip exactly through JSON)
    assert _steps_logged(metrics) == list(range(1, 25))  # the killed run's steps after its checkpoint: once

    ids = _last_per_step(d / "run" / "consumed.process_0.jsonl", "ids")
    assert ids == _last_per_step(d / "ref" / "consumed.process_0.jsonl", "ids")
    counts = Counter(i for s in sorted(ids) for i in ids[s])
    total = sum(counts.values())
    stats = json.loads((d / "run" / "data_stats.json").read_text())
    assert stats["used"] == N_ROWS and set(counts) == set(range(N_ROWS))
    assert all(c in (total // N_ROWS, total // N_ROWS + 1) for c in counts.values())  # once per epoch


def test_config_errors_and_help(capsys):
    from qednano_jax.train.cli import main
    assert main(["data.overlong=sometimes"]) == 2
    assert "data.overlong" in capsys.readouterr().err
    assert main(["train.nope=1"]) == 2
    assert "train.nope: unknown config key" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "train.micro_batches" in capsys.readouterr().out
    assert Config().stage == "sft"
