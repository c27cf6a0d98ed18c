"""FineProofs-RL prompts (qednano_jax/data/rl.py): the RL prompt, filters, errors naming row and field, sampler."""
import json

import pytest

from qednano_jax.config import load_config
from qednano_jax.data import rl as rl_data
from qednano_jax.data.rows import DataError
from qednano_jax.data.tokenizer import load_tokenizer, prompt_ids


@pytest.fixture(scope="module")
def tok(tiny_hf_dir):
    return load_tokenizer(tiny_hf_dir)


def rows(n=6):
    return [{"problem": f"Prove that {i} + {i} is even.", "rubrics": f"1. (7 pts) {i}", "reward_mean": i / (n - 1),
             "source": "olympiads", "scores": [7], "rewards": [1.0], "num_rewards": 1, "reward_std": 0.0}
            for i in range(n)]


def test_prompt_is_spec_verbatim_in_the_chat_format(tok):
    assert rl_data.RL_PROMPT == "Generate a rigorous proof to the following question:\n\n{problem}"
    prompts, stats = rl_data.build_prompts(rows(2), tok)
    want = prompt_ids(tok, "Generate a rigorous proof to the following question:\n\nProve that 1 + 1 is even.")
    assert list(prompts[1].ids) == want
    assert tok.decode(want).endswith("<|im_start|>assistant\n<think>\n")
    assert (prompts[1].index, prompts[1].rubric, stats.used) == (1, "1. (7 pts) 1", 2)


def test_reward_mean_filter_and_overlong_are_counted(tok):
    prompts, stats = rl_data.build_prompts(rows(6), tok, min_reward_mean=0.2, max_reward_mean=0.8)
    assert [p.index for p in prompts] == [1, 2, 3, 4]
    assert stats.filtered_reward_mean == 2
    n = len(prompts[0].ids)
    prompts, stats = rl_data.build_prompts(rows(6), tok, max_prompt_tokens=n - 1)
    assert prompts == [] and stats.dropped_overlong == 6


@pytest.mark.parametrize("field,value,msg", [("problem", "  ", "row 4: field 'problem' is empty"),
                                             ("rubrics", None, "row 4: field 'rubrics' is missing"),
                                             ("reward_mean", "high", "row 4: field 'reward_mean' is str")])
def test_malformed_rows_name_row_and_field(tok, field, value, msg):
    bad = rows(5)
    bad[3][field] = value
    with pytest.raises(DataError, match=msg):
        rl_data.build_prompts(bad, tok, min_reward_mean=0.1)
    prompts, stats = rl_data.build_prompts(bad, tok, min_reward_mean=0.1, on_malformed="skip")
    assert stats.skipped_malformed == 1 and 3 not in [p.index for p in prompts]


def test_load_prompts_from_jsonl_and_the_bundled_sample(tmp_path, tok):
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(4)))
    cfg = load_config(None, ["stage=rl", f"data.path={path}", "data.seq_len=512", "rl.max_tokens=64",
                             "rl.min_reward_mean=0.3"])
    prompts, stats = rl_data.load_prompts(cfg.data, cfg.rl, tok, log=lambda s: None)
    assert [p.index for p in prompts] == [1, 2, 3] and stats.rows == 4
    cfg = load_config(None, ["stage=rl", "data.path=sample", "data.seq_len=4096", "rl.max_tokens=64"])
    prompts, stats = rl_data.load_prompts(cfg.data, cfg.rl, tok, log=lambda s: None)
    assert stats.rows >= 30 and stats.used == stats.rows
    with pytest.raises(DataError, match="data.seq_len 64 leaves no room"):
        rl_data.load_prompts(load_config(None, ["stage=rl", "data.seq_len=64", "rl.max_tokens=64"]).data,
                             load_config(None, ["stage=rl", "rl.max_tokens=64"]).rl, tok)


def test_sampler_is_a_seeded_permutation_per_epoch_and_resumes():
    a = rl_data.PromptSampler(5, seed=3)
    draws = [a.next(3) for _ in range(4)]  # 12 draws = 2 epochs + 2
    assert sorted(draws[0] + draws[1][:2]) == list(range(5))          # epoch 0: each prompt once
    assert sorted(draws[1][2:] + draws[2] + draws[3][:1]) == list(range(5))  # epoch 1, a new order
    assert draws[0] + draws[1][:2] != draws[1][2:] + draws[2] + draws[3][:1]
    b = rl_data.PromptSampler(5, seed=3)
    b.next(3)
    c = rl_data.PromptSampler(5, seed=3)
    c.set_state(json.loads(json.dumps(b.state())))
    assert [c.next(3) for _ in range(3)] == draws[1:]
    assert c.state() == a.state() and a.state()["batches"] == 4
    with pytest.raises(DataError, match="saved over 5 prompts with seed 3"):
        rl_data.PromptSampler(6, seed=3).set_state(a.state())
