"""benchmarks/device.py, the one prepared accelerator run: its tiny CPU mode runs every section through the same code
(real figures checked against independent expectations), and nothing on its path imports grain, datasets or
tensorboardX (a device image has only its own jax, flax, optax, numpy, safetensors and transformers)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = ("grain", "datasets", "tensorboardX")


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return env


def test_tiny_run_covers_every_section_with_sane_figures(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device.py"), "--tiny", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "device.json").read_text())
    secs = res["sections"]
    assert set(secs) == {"export", "sft", "attention", "rollout", "sft_long", "rl_long"}
    for name, r in secs.items():
        assert r["status"] == "ok", (name, r)
        assert r["imported_forbidden"] == [], name
    # a random-init LM's loss is close to ln(vocab) (tiny vocabulary 512)
    for name in ("sft", "sft_long"):
        assert abs(secs[name]["loss"] - math.log(512)) < 0.5, secs[name]["loss"]
        assert len(secs[name]["step_s"]) == 2 and min(secs[name]["tokens_per_s"]) > 0
    assert secs["sft_long"]["tokens"] == 512 and secs["rl_long"]["tokens"] == 256
    # bf16 export: 2 bytes per parameter plus the safetensors header
    e = secs["export"]
    assert 2 * e["params"] < e["bytes"] < 2 * e["params"] + 65536
    att = secs["attention"]["results"]
    assert att["flash@128"]["max_abs_err"] < 2e-2 and att["blocked@128"]["max_abs_err"] < 2e-2
    assert "flash@256" in att and "blocked@256" not in att
    r = secs["rollout"]
    assert r["prompts"] <= r["generated"] <= r["prompts"] * r["new_tokens"] and r["decode_tokens_per_s"] > 0
    assert "sft " in p.stdout and "rl_long" in p.stdout  # the table


def test_its_modules_import_no_data_or_tensorboard_library():
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import device; "
            "import qednano_jax.rl.batch, qednano_jax.rl.losses, qednano_jax.train.step, qednano_jax.train.optim, "
            "qednano_jax.train.metrics, qednano_jax.rollout.native, qednano_jax.model.hf, qednano_jax.sharding; "
            f"print([m for m in {FORBIDDEN!r} if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "[]"
