"""RC state and cycles on token arrays: thinking/summary extraction, the transition (summary replaced, not
appended), prompt concatenation, the emitted states and the seeded choice of k of them, and the jitted native RC
loop against the host loop over the HTTP backend (`python -m qednano_jax.serve` on the same checkpoint)."""
import jax.numpy as jnp
import numpy as np
import pytest

from qednano_jax.data.tokenizer import load_tokenizer, prompt_ids
from qednano_jax.rc import cycle, prompts as rcp, state as rcs
from qednano_jax.rollout.base import SamplingParams

CLOSE, IM_END, SP = 9, 2, 7


def tpl(solve=((1,), (3,), (4, 5)), summarize=((1,), (3,), (4,), (6,))):
    arr = lambda ps: tuple(jnp.asarray(p, jnp.int32) for p in ps)
    return cycle.RCTemplates(solve=arr(solve), summarize=arr(summarize), drop_ids=jnp.asarray([IM_END, 3]),
                             space_ids=jnp.asarray([SP]), think_close=CLOSE)


def rows(*xs, width=8):
    out = np.zeros((len(xs), width), np.int32)
    for i, x in enumerate(xs):
        out[i, :len(x)] = x
    return jnp.asarray(out), jnp.asarray([len(x) for x in xs], jnp.int32)


def as_lists(tok, ln):
    return [np.asarray(tok[i, :ln[i]]).tolist() for i in range(len(ln))]


def test_thinking_with_and_without_close():
    out, n = rows([SP, 11, 12, CLOSE, SP, 13, IM_END],   # thinking closed: the part before </think>
                  [11, 3, 12, 13, SP],                    # truncated: all of it, chat tokens/edge spaces dropped
                  [11, CLOSE, 12, CLOSE, 14],              # the FIRST </think> ends the thinking
                  [CLOSE, 13])                             # empty thinking
    assert as_lists(*cycle.thinking(tpl(), out, n)) == [[11, 12], [11, 12, 13], [11], []]
    # tokens past the row's count are never read, even a </think>
    out2, _ = rows([11, 12, CLOSE, 13])
    assert as_lists(*cycle.thinking(tpl(), out2, jnp.asarray([2]))) == [[11, 12]]


def test_summary_of_takes_the_part_after_the_last_close_and_cuts_at_width():
    out, n = rows([11, CLOSE, SP, 21, 22, IM_END], [21, 22, 23, 24, 25], [11, CLOSE, 12, CLOSE, 23])
    assert as_lists(*cycle.summary_of(tpl(), out, n, width=4)) == [[21, 22], [21, 22, 23, 24], [23]]


def test_concat_and_prompts_are_the_pieces_in_order():
    problem, plen = rows([50, 51, 52], [60], width=4)
    summary, slen = rows([], [70, 71], width=3)
    tok, ln = cycle.reasoning_prompt(tpl(), problem, plen, summary, slen)
    assert tok.shape == (2, 1 + 4 + 1 + 3 + 2)
    assert as_lists(tok, ln) == [[1, 50, 51, 52, 3, 4, 5], [1, 60, 3, 70, 71, 4, 5]]
    think, tlen = rows([80], [81, 82], width=2)
    tok, ln = cycle.summary_prompt(tpl(), problem, plen, summary, slen, think, tlen)
    assert as_lists(tok, ln) == [[1, 50, 51, 52, 3, 4, 80, 6], [1, 60, 3, 70, 71, 4, 81, 82, 6]]


def test_transition_replaces_the_summary_and_records_the_turn():
    s = rcs.init_state([4, 9], [90, 91], turns=2, summary_width=3, reasoning_width=4)
    out, n = rows([11, 12, CLOSE, 13], [14], width=4)
    new, new_len = rows([21, 22], [23, 24, 25], width=3)
    s1 = rcs.transition(s, out, n, jnp.asarray([True, False]), new, new_len)
    assert as_lists(s1.summary, s1.summary_len) == [[21, 22], [23, 24, 25]]     # replaced, not [90, 91, 21, ...]
    assert np.asarray(s1.turn).tolist() == [1, 1] and not np.asarray(s1.done).any()
    assert np.asarray(s1.lengths).tolist() == [[4, 0], [1, 0]]
    assert np.asarray(s1.stopped).tolist() == [[True, False], [False, False]]
    assert np.asarray(s1.outputs[1, 0]).tolist() == [14, 0, 0, 0]
    new2, new2_len = rows([31], [32], width=3)
    s2 = rcs.transition(s1, out, n, jnp.asarray([True, True]), new2, new2_len)
    assert as_lists(s2.summary, s2.summary_len) == [[31], [32]]
    assert np.asarray(s2.done).all() and np.asarray(s2.turn).tolist() == [2, 2]
    # the T + 1 emitted states: the initial summary, then every summary in order
    assert rcs.emitted_states(s2, 0) == [[90, 91], [21, 22], [31]]
    assert rcs.emitted_states(s2, 1) == [[90, 91], [23, 24, 25], [32]]
    # a finished row is left alone
    s3 = rcs.transition(s2, out, n, jnp.asarray([True, True]), new, new_len)
    for a, b in zip(jax_leaves(s2), jax_leaves(s3)):
        np.testing.assert_array_equal(a, b)
    # a turn without a summary (the last test-time turn) keeps the summary
    s4 = rcs.transition(s, out, n, jnp.asarray([True, True]))
    assert as_lists(s4.summary, s4.summary_len) == [[90, 91], [90, 91]] and rcs.emitted_states(s4, 0)[1] == []


def jax_leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_sample_states_is_seeded_distinct_and_covers_all_states():
    picks = [rcs.sample_states(0, step, p, 4, 2) for step in range(50) for p in range(4)]
    assert all(len(set(x)) == 2 and x == sorted(x) and set(x) <= {0, 1, 2, 3} for x in picks)
    assert picks == [rcs.sample_states(0, step, p, 4, 2) for step in range(50) for p in range(4)]  # reproducible
    assert {i for x in picks for i in x} == {0, 1, 2, 3} and len({tuple(x) for x in picks}) == 6
    assert rcs.sample_states(1, 0, 0, 4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="rc.states_sampled"):
        rcs.sample_states(0, 0, 0, 4, 5)


def test_templates_match_the_text_prompts(tiny_hf_dir):
    tok = load_tokenizer(tiny_hf_dir)
    t = cycle.make_templates(tok, step_by_step=True)
    problem = "Generate a rigorous proof to the following question:\n\nShow that 1 < 2."
    pb, pl = cycle.tokenize_texts(tok, [problem])
    sb, sl = cycle.tokenize_texts(tok, [rcp.NO_SUMMARY])
    toks, n = cycle.reasoning_prompt(t, jnp.asarray(pb), jnp.asarray(pl), jnp.asarray(sb), jnp.asarray(sl))
    ids = np.asarray(toks[0, :n[0]]).tolist()
    assert tok.decode(ids) == tok.decode(prompt_ids(tok, rcp.solve_prompt(problem, rcp.NO_SUMMARY, True)))
    assert t.think_close == tok.convert_tokens_to_ids("</think>")


def test_jitted_native_loop_equals_host_loop_over_http(tiny_hf_dir, native_server):
    """Same greedy tiny model: the jitted loop in this process and the host loop against the HTTP server (the same
    native engine behind SGLang's API) produce identical states."""
    from qednano_jax.config import RolloutConfig
    from qednano_jax.model.hf import load_hf
    from qednano_jax.rollout import make_rollout

    tok = load_tokenizer(tiny_hf_dir)
    model_cfg, params = load_hf(tiny_hf_dir)
    engine = make_rollout(RolloutConfig(), model_cfg, params, tok)
    http = make_rollout(RolloutConfig(backend="sglang", urls=(native_server.url,), health_timeout=60), model_cfg)
    t = cycle.make_templates(tok, step_by_step=True)
    problems = [f"Generate a rigorous proof to the following question:\n\nLet n = {i}. Show that n + 1 is odd."
                for i in (2, 4, 6, 8)]
    pb, pl = cycle.tokenize_texts(tok, problems)
    s0 = rcs.init_state(np.arange(4), [], turns=3, summary_width=8, reasoning_width=16)
    policy_sp = SamplingParams(max_new_tokens=16, temperature=0.0, seed=1)
    summary_sp = SamplingParams(max_new_tokens=8, temperature=0.0, seed=2)
    a = cycle.run_native(engine, engine, t, pb, pl, s0, policy_sampling=policy_sp, summary_sampling=summary_sp)
    b = cycle.rc_loop_host(http, http, t, pb, pl, s0, policy_sampling=policy_sp, summary_sampling=summary_sp)
    for name in ("summary", "summary_len", "turn", "done", "lengths", "stopped", "outputs", "history",
                 "history_len"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), err_msg=name)
    assert np.asarray(a.done).all() and np.asarray(a.lengths).min() > 0
    assert (np.asarray(a.history_len)[:, 1:] > 0).any()          # real summaries flowed between turns
    # the summary each turn started from is the previous turn's summary (replacement) in both loops
    for r in range(4):
        states = rcs.emitted_states(a, r)
        assert len(states) == 4 and states[0] == []


@pytest.mark.parametrize("which", ["qwen3", "tiny"])
def test_summary_prompt_is_the_non_thinking_chat_format(which, tiny_hf_dir):
    """The summarizer's token prompt equals the tokenizer's own chat template with thinking disabled (the released RC
    actor prompts the non-thinking Instruct-2507 summarizer so), for the real Qwen3 tokenizer file and our tiny one;
    the reasoning prompt still opens <think>."""
    tok = load_tokenizer(which if which == "qwen3" else tiny_hf_dir)
    t = cycle.make_templates(tok)
    problem, old, thought = "Show that 1 < 2.", "I tried nothing yet.", "Since 2 - 1 = 1 > 0, the claim holds."
    enc = lambda s: cycle.tokenize_texts(tok, [s])
    (pb, pl), (sb, sl), (rb, rl) = enc(problem), enc(old), enc(thought)
    toks, n = cycle.summary_prompt(t, *(jnp.asarray(x) for x in (pb, pl, sb, sl, rb, rl)))
    got = tok.decode(np.asarray(toks[0, :n[0]]).tolist())
    messages = [{"role": "user", "content": rcp.summary_prompt(problem, old, thought)}]
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert got == want
    if which == "tiny":
        assert want.endswith("<|im_start|>assistant\n")
    else:  # the hybrid Qwen3 template closes an empty thinking block when thinking is off
        assert want.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    toks, n = cycle.reasoning_prompt(t, jnp.asarray(pb), jnp.asarray(pl), jnp.asarray(sb), jnp.asarray(sl))
    assert tok.decode(np.asarray(toks[0, :n[0]]).tolist()).endswith("<|im_start|>assistant\n<think>\n")


def test_prompt_files_are_checked_for_their_variables(tmp_path, tiny_hf_dir):
    from qednano_jax.config import ConfigError
    from qednano_jax.prompts import load
    bad = tmp_path / "solve.txt"
    bad.write_text("Solve {problem} from scratch.")
    with pytest.raises(ConfigError, match=r"^rc.solve_prompt_file: .*solve.txt lacks the template variable\(s\) "
                                          r"\{summary\}"):
        load(bad, "rc_solve.txt", rcp.SOLVE_FIELDS, "rc.solve_prompt_file")
    bad.write_text("Solve {problem} given {summary} and {hint}.")
    with pytest.raises(ConfigError, match=r"unknown template variable\(s\) \{hint\}"):
        load(bad, "rc_solve.txt", rcp.SOLVE_FIELDS, "rc.solve_prompt_file")
    with pytest.raises(ConfigError, match="rc.solve_prompt_file: cannot read .*missing.txt"):
        load(tmp_path / "missing.txt", "rc_solve.txt", rcp.SOLVE_FIELDS, "rc.solve_prompt_file")
    good = tmp_path / "released.txt"
    good.write_text("PROBLEM: {problem}\nSUMMARY: {summary}\nUse literal {{braces}}.")
    tok = load_tokenizer(tiny_hf_dir)
    t = cycle.make_templates(tok, solve_template=load(good, "rc_solve.txt", rcp.SOLVE_FIELDS, "rc.solve_prompt_file"))
    pb, pl = cycle.tokenize_texts(tok, ["P"])
    sb, sl = cycle.tokenize_texts(tok, ["S"])
    toks, n = cycle.reasoning_prompt(t, jnp.asarray(pb), jnp.asarray(pl), jnp.asarray(sb), jnp.asarray(sl))
    assert tok.decode(np.asarray(toks[0, :n[0]]).tolist()) == tok.decode(
        prompt_ids(tok, "PROBLEM: P\nSUMMARY: S\nUse literal {braces}."))
