"""configs/rl.yaml is docs/recipe.md §3 number for number (configs/rl-tiny.yaml runs through the real CLI in
tests/test_readme.py, as the README's demo)."""
from pathlib import Path

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


def test_keys_a_stage_does_not_read_are_refused_by_name(tmp_path):
    import pytest
    import yaml

    from qednano_jax.config import ConfigError, to_dict
    for path, override, key, stages in [
            ("rl-tiny.yaml", "train.batch_size=8", "train.batch_size", "sft"),
            ("rc-tiny.yaml", "checkpoint.export_hf_each=true", "checkpoint.export_hf_each", "sft"),
            ("rl-tiny.yaml", "rc.cycles=5", "rc.cycles", "rc"),
            ("sft-tiny.yaml", "grader.model=judge", "grader.model", "rl, rc")]:
        with pytest.raises(ConfigError, match=rf"^{key}: stage \w+ does not read this key .*its stages: {stages}\)$"):
            load_config(ROOT / "configs" / path, [override])
    # a run's saved config.yaml lists every key (the foreign ones at their defaults): it loads back unchanged
    cfg = load_config(ROOT / "configs" / "rc-tiny.yaml")
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(to_dict(cfg)))
    assert to_dict(load_config(saved)) == to_dict(cfg)
