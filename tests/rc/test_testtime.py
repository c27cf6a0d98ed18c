"""Test-time RC: thinking extraction, summary replacement (not append), the last turn unsummarized, on the real
native engine with a tiny random Qwen3 and a tiny BPE tokenizer (greedy, so every turn can be recomputed)."""
import jax
import pytest

from qednano_jax.config import ModelConfig
from qednano_jax.data.tokenizer import train_tiny_tokenizer
from qednano_jax.model import qwen3
from qednano_jax.rc import prompts as rcp, testtime as tt
from qednano_jax.rollout.base import SamplingParams
from qednano_jax.rollout.native import NativeRollout


def test_thinking_and_final_parts():
    out = "<think>\nI try induction.\n</think>\n\nProof. By induction.<|im_end|>"
    assert rcp.thinking_part(out) == "I try induction."
    assert rcp.final_part(out) == "Proof. By induction."
    cut = "I try induction and then"                      # truncated: no </think>
    assert rcp.thinking_part(cut) == cut and rcp.final_part(cut) == ""
    assert rcp.summary_text("thinking </think> I used induction.<|endoftext|>") == "I used induction."
    assert rcp.summary_text("I used induction.") == "I used induction."   # a non-thinking summarizer
    p = rcp.solve_prompt("Generate a rigorous proof to the following question:\n\nP", rcp.NO_SUMMARY)
    assert "### SUMMARY OF PREVIOUS ATTEMPT\n[No previous summary]\n" in p and p.index("### PROBLEM") < p.index(
        "### SUMMARY") < p.index("### INSTRUCTIONS")
    assert rcp.solve_prompt("P", "S", step_by_step=True).endswith("step by step.")
    s = rcp.summary_prompt("P", "OLD", "NEW THOUGHTS")
    assert s.index("### PROBLEM\nP") < s.index("### EXISTING SUMMARY\nOLD") < s.index(
        "### LATEST CANDIDATE SOLUTION\nNEW THOUGHTS")


class Recording:
    """The real engine, with every call's prompts kept (to check what each turn was conditioned on)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, sampling, n=1):
        self.calls.append(prompts)
        return self.engine.generate(prompts, sampling, n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = [rcp.SOLVE_PROMPT, rcp.SUMMARY_PROMPT, "Prove that the sum of two even numbers is even. </think> Proof."]
    tok = train_tiny_tokenizer(texts * 20, tmp_path_factory.mktemp("tok"), vocab_size=384)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tok))
    cfg = ModelConfig(vocab_size=len(tok), num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2,
                      num_kv_heads=1, head_dim=16, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    engine = NativeRollout(cfg, qwen3.init_params(cfg, jax.random.PRNGKey(3)), tok)
    return engine, tok


def test_rc_loop_replaces_the_summary_and_skips_the_last_summary(tiny):
    import jax.numpy as jnp
    import numpy as np
    from qednano_jax.rc import cycle

    engine, tok = tiny
    policy, summarizer = Recording(engine), Recording(engine)
    problems = ["Generate a rigorous proof to the following question:\n\nShow that 2 + 2 = 4.",
                "Generate a rigorous proof to the following question:\n\nShow that 1 < 2."]
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    summary_sp = SamplingParams(max_new_tokens=8, temperature=0.0)
    res = tt.run_rc(policy, tok, problems, greedy, iterations=3, summarizer=summarizer, summary_sampling=summary_sp)
    assert len(policy.calls) == 3 and len(summarizer.calls) == 2    # no summary after the last turn
    tpl = cycle.make_templates(tok)
    pb, pl = cycle.tokenize_texts(tok, problems)
    for i, (problem, r) in enumerate(zip(problems, res)):
        assert [t.summary is None for t in r.turns] == [False, False, True]
        summary = tok(rcp.NO_SUMMARY, add_special_tokens=False)["input_ids"]   # the marker's tokens
        for t, turn in enumerate(r.turns):
            # each turn is conditioned on the latest summary's tokens only (replacement, never accumulation)
            s = jnp.asarray([summary + [0] * (8 - len(summary))])
            ids, n = cycle.reasoning_prompt(tpl, pb[i:i + 1], pl[i:i + 1], s, jnp.asarray([len(summary)]))
            assert policy.calls[t][i] == np.asarray(ids[0, :n[0]]).tolist()
            assert turn.prompt == rcp.solve_prompt(problem, rcp.decode(tok, summary))
            (c,), = engine.generate([policy.calls[t][i]], greedy)
            assert turn.text == rcp.decode(tok, c.token_ids) and turn.tokens == len(c.token_ids) == 12
            if turn.summary is not None:
                think, tlen = cycle.thinking(tpl, jnp.asarray([c.token_ids]), jnp.asarray([len(c.token_ids)]))
                ask, an = cycle.summary_prompt(tpl, pb[i:i + 1], pl[i:i + 1], s, jnp.asarray([len(summary)]),
                                               think, tlen)
                assert summarizer.calls[t][i] == np.asarray(ask[0, :an[0]]).tolist()
                (sc,), = engine.generate([summarizer.calls[t][i]], summary_sp)
                new, nl = cycle.summary_of(tpl, jnp.asarray([sc.token_ids]), jnp.asarray([len(sc.token_ids)]),
                                           width=8)
                summary = np.asarray(new[0, :nl[0]]).tolist()
                assert turn.summary == rcp.decode(tok, summary).strip() and turn.summary_tokens == 8
        assert r.text == r.turns[-1].text and r.tokens == 36 and r.summary_tokens == 16
