"""configs/rl.yaml is docs/recipe.md §3 number for number; configs/rl-tiny.yaml runs through the real CLI with no server."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qednano_jax.config import load_config
from qednano_jax.data.rl import RL_PROMPT

ROOT = Path(__file__).resolve().parents[2]


def test_rl_yaml_is_the_paper_recipe():
    c = load_config(ROOT / "configs" / "rl.yaml")
    assert c.stage == "rl" and c.data.path == "lm-provers/FineProofs-RL" and c.data.prompt_template == RL_PROMPT
    assert (c.rl.prompts_per_step, c.rl.group_size, c.rl.max_tokens, c.data.seq_len) == (64, 16, 49152, 49920)
    assert (c.rl.temperature, c.rl.top_p, c.rl.top_k) == (0.8, 1.0, -1)
    lo = c.rl.loss
    assert (lo.policy_loss, lo.clip_eps_low, lo.clip_eps_high, lo.entropy_coef) == ("ppo", 4, 4, 1e-4)
    assert not hasattr(lo, "kl_coef")  # the recipe has no KL term and no reference model
    assert (lo.aggregation, lo.aggregation_constant, lo.divide_advantage_by_std) == ("token-sum-constant", 1024, False)
    o = c.optim
    assert (o.lr, o.schedule, o.warmup_ratio, o.weight_decay, o.b1, o.b2, o.eps, o.clip_norm) == (
        1e-6, "constant", 0.0, 0.01, 0.9, 0.999, 1e-8, 0.3)
    assert c.train.steps == 150 and c.model.dtype == "bfloat16" and c.model.hidden_size == 2560
    g = c.grader
    assert (g.backend, g.model, g.api, g.reasoning_effort, g.temperature, g.max_tokens, g.timeout, g.retries) == (
        "openai", "openai/gpt-oss-20b", "responses", "medium", 1.0, 81920, 900.0, 3)
    assert c.rollout.backend == "sglang"


@pytest.mark.slow  # ~1 min of CPU for 2 steps of a 152k-vocabulary model, plus the CLI start
def test_rl_tiny_runs_through_the_cli_with_no_server(tmp_path):
    run = tmp_path / "rl-tiny"
    r = subprocess.run([sys.executable, "-m", "qednano_jax.train", str(ROOT / "configs" / "rl-tiny.yaml"),
                        "train.steps=2", f"train.run_dir={run}", "train.progress=false"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2]
    for m in rows:
        assert m["completions"] == 8 and 0.0 <= m["reward_mean"] <= 1.0
        assert m["grader_total_failures"] == 0 and m["entropy"] > 0
    assert (run / "checkpoints" / "2").is_dir() and (run / "tb").is_dir()
