"""grader.backend answer: the rule-based final-answer check (math-verify), in RL rows and in eval."""

import json

import pytest

from qednano_jax.config import ConfigError, GraderConfig, load_config
from qednano_jax.data import rl as rl_data
from qednano_jax.data.rows import DataError, read_jsonl
from qednano_jax.reward.grader import AnswerGrader, make_grader
from qednano_jax.rl.pipeline import grader_reward_fn
from qednano_jax.rollout.base import Completion


@pytest.mark.parametrize("proof, answer, ok", [
    ("$\\boxed{7}$", "7", True),
    ("3 + 4 = 7, so the answer is \\boxed{7}.", "7", True),
    ("3 + 4 = 7. \\boxed{8}", "7", False),          # the boxed answer counts, not an earlier number
    ("\\boxed{\\frac{1}{2}}", "0.5", True),          # symbolic equality
    ("\\boxed{\\frac{1}{2}}", "1/3", False),
    ("The answer is 12", "12", True),                # no box: the expression found in the text
    ("I do not know.", "7", False),
])
def test_matches(proof, answer, ok):
    assert AnswerGrader.matches(proof, answer) is ok


def test_grade_many_scores_7_or_0_and_counts_empty_proofs():
    g = make_grader(GraderConfig(backend="answer"))
    assert isinstance(g, AnswerGrader) and g.reference == "answer"
    out = g.grade_many([("What is 3 + 4?", "7", "\\boxed{7}"), ("What is 1 + 1?", "2", "\\boxed{3}"),
                        ("What is 2 + 2?", "4", "  ")])
    assert [(r.score, r.reward, r.skipped, r.failed) for r in out] == [(7, 1.0, False, False), (0, 0.0, False, False),
                                                                        (0, 0.0, True, False)]
    assert (g.stats.calls, g.stats.empty, g.stats.failures) == (2, 1, 0)


def test_rl_rows_with_answers_become_prompts_graded_against_them(tmp_path):
    from qednano_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer("qwen3")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"problem": "What is 3 + 4?", "answer": 7}) + "\n"
                    + json.dumps({"problem": "What is 1 + 1?", "answer": ""}) + "\n")
    rows = read_jsonl(path)
    with pytest.raises(DataError, match=r"rows.jsonl line 2: field 'answer' is empty"):
        rl_data.build_prompts(rows, tok, template="{problem}", reference="answer")
    with pytest.raises(DataError, match=r"line 1: field 'rubrics' is missing"):
        rl_data.build_prompts(rows, tok, template="{problem}")
    prompts, stats = rl_data.build_prompts(rows, tok, template="{problem}", reference="answer", on_malformed="skip")
    assert [(p.problem, p.answer) for p in prompts] == [("What is 3 + 4?", "7")] and stats.skipped_malformed == 1
    reward = grader_reward_fn(make_grader(GraderConfig(backend="answer")))
    done = Completion(token_ids=[], logprobs=[], finish_reason="stop", text="", weight_version="0", prompt_tokens=0)
    got = reward([(prompts[0], done, "<think>\n3 + 4 = 7</think>\n\n\\boxed{7}"),
                  (prompts[0], done, "<think>\n3 + 4 = 8</think>\n\n\\boxed{8}"),
                  (prompts[0], done, "<think>\n3 + 4 is \\boxed{7}")])            # thinking never closed: no proof
    assert [r.reward for r in got] == [1.0, 0.0, 0.0] and got[2].skipped


def test_prompt_templates_are_checked_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"data.prompt_template: .* uses \{\}, but only \{problem\} can be filled"):
        load_config(None, ["data.prompt_template={problem} in \\boxed{}"])
    with pytest.raises(ConfigError, match=r"data.prompt_template: .* has no \{problem\} field"):
        load_config(None, ["data.prompt_template=Solve it."])
    assert load_config(None, ["data.prompt_template={problem} in \\boxed{{}}"]).data.prompt_template.endswith("{{}}")


def test_eval_refuses_the_answer_check_on_a_proof_benchmark(tmp_path):
    from qednano_jax.eval.run import run_eval
    from qednano_jax.config import load_eval_config
    cfg = load_eval_config(None, ["grader.backend=answer", "eval.benchmark=imo_proofbench",
                                  f"eval.out_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"grader.backend: `answer` checks final answers, but eval.benchmark "
                                          r"imo_proofbench is graded as proofs"):
        run_eval(cfg, log=lambda s: None)
    assert not (tmp_path / "out").exists()
