"""RC training (docs/recipe.md §4): the emitted states become training prompts graded against the original problem text,
config checks, and the real CLI on the tiny checkpoint: 3 steps, checkpoints, SIGKILL, resume, and the resumed run
equal to an uninterrupted one (the RC state buffer comes back from the checkpoint)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from qednano_jax.config import ConfigError, load_config
from qednano_jax.data import rl as rl_data
from qednano_jax.data.tokenizer import load_tokenizer
from qednano_jax.rc import cycle, state as rcs, train as rc_train
from qednano_jax.reward.grader import GradeResult

ROOT = Path(__file__).resolve().parents[2]


def tiny_overrides(tiny_hf_dir, run_dir, steps=3):
    return [f"train.init={tiny_hf_dir}", f"data.tokenizer={tiny_hf_dir}", "data.seq_len=768",
            "rl.micro_batch_rows=8", "rl.group_size=2", f"train.run_dir={run_dir}", f"train.steps={steps}",
            "train.progress=false", "checkpoint.every=1", "checkpoint.async_save=false"]


class Version:
    weight_version = "7"


def test_states_become_prompts_graded_against_the_original_problem(tiny_hf_dir, tmp_path):
    cfg = load_config("configs/rc-tiny.yaml", tiny_overrides(tiny_hf_dir, tmp_path))
    tok = load_tokenizer(tiny_hf_dir)
    rows = [{"problem": "Show that 1 < 2.", "rubrics": "7 points: compare."},
            {"problem": "Let n = 3. Show that n + 1 is even.", "rubrics": "7 points: parity."}]
    prompts, _ = rl_data.build_prompts(rows, tok)
    seen = []

    def reward_fn(items):
        seen.extend(items)
        return [GradeResult(score=7, reward=1.0) for _ in items]

    actor = rc_train.RCActor(cfg, Version(), None, tok, None, prompts, reward_fn, use_jit=False, log=print)
    original = ["Generate a rigorous proof to the following question:\n\n" + r["problem"] for r in rows]
    assert actor.originals == original
    # a hand-made state after 3 summarized turns: summaries s1..s3 differ per problem
    s = rcs.init_state([1, 0], [], turns=3, summary_width=4, reasoning_width=3)
    for t in range(3):
        out = jnp.asarray([[40 + t, 41, 42], [50 + t, 51, 52]])
        summ = jnp.asarray([[60 + t, 61, 0, 0], [70 + t, 0, 0, 0]])
        s = rcs.transition(s, out, jnp.asarray([3, 2]), jnp.asarray([False, True]), summ, jnp.asarray([2, 1]))
    state_prompts, records = actor.state_prompts(s, step=5)
    assert len(state_prompts) == 4 and [r["problem"] for r in records] == [1, 0]
    # the reasoning prompt's {problem} is the raw problem (the released RC actor's), not the wrapped original
    pb, pl = cycle.tokenize_texts(tok, [rows[1]["problem"], rows[0]["problem"]], actor.width)
    for i, (pos, rec) in enumerate(zip([1, 0], records)):
        chosen = rcs.sample_states(cfg.rc.seed, 5, pos, 4, 2)
        assert rec["states"] == chosen
        for j, k in enumerate(chosen):
            p = state_prompts[2 * i + j]
            # graded against the ORIGINAL problem text and its rubric; sampled from the summary-conditioned prompt
            assert p.problem == original[pos] and p.rubric == rows[pos]["rubrics"] and p.index == pos
            summary = rcs.emitted_states(s, i)[k]
            ids, n = cycle.reasoning_prompt(actor.tpl, jnp.asarray(pb[i:i + 1]), jnp.asarray(pl[i:i + 1]),
                                            jnp.asarray([summary + [0] * (4 - len(summary))]),
                                            jnp.asarray([len(summary)]))
            assert list(p.ids) == np.asarray(ids[0, :n[0]]).tolist()
            text = tok.decode(list(p.ids))
            assert rows[pos]["problem"] in text and "Generate a rigorous proof" not in text
    assert rcs.emitted_states(s, 0) == [[], [60, 61], [61, 61], [62, 61]]
    assert rcs.emitted_states(s, 1) == [[], [70], [71], [72]]
    # every RC turn's own proof is graded against the original problem too (logging only)
    rewards = actor.grade_turns(s)
    assert rewards.shape == (2, 3) and (rewards == 1.0).all()
    assert [it[0].problem for it in seen] == [original[1]] * 3 + [original[0]] * 3
    assert seen[0][1].token_ids == [40, 41, 42] and seen[3][1].token_ids == [50, 51]


def test_config_checks(tiny_hf_dir, tmp_path):
    base = tiny_overrides(tiny_hf_dir, tmp_path)
    with pytest.raises(ConfigError, match="rl.prompts_per_step"):
        rc_train.check_config(load_config("configs/rc-tiny.yaml", base + ["rl.prompts_per_step=3"]))
    with pytest.raises(ConfigError, match="rc.states_sampled"):
        rc_train.check_config(load_config("configs/rc-tiny.yaml", base + ["rc.states_sampled=5",
                                                                        "rl.prompts_per_step=10"]))
    with pytest.raises(ConfigError, match="rl.max_lag"):
        rc_train.check_config(load_config("configs/rc-tiny.yaml", base + ["rl.max_lag=1"]))
    with pytest.raises(ConfigError, match="rc.loop"):
        rc_train.check_config(load_config("configs/rc-tiny.yaml", base + ["rc.loop=jit", "rc.summarizer=sglang",
                                                                        "rc.summarizer_urls=[http://x]"]))
    assert rc_train.check_config(load_config("configs/rc-tiny.yaml", base)) == 2
    paper = load_config("configs/rc.yaml")
    assert rc_train.check_config(paper) == 32 and paper.rl.group_size == 16 and paper.rc.cycles == 3


def _cli(args, log, **kw):
    return subprocess.Popen([sys.executable, "-m", "qednano_jax.train", "configs/rc-tiny.yaml", *args], cwd=ROOT,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True, **kw)


def _records(run_dir):
    out = {}
    for line in (Path(run_dir) / "rc_states.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[(r["step"], r["problem"])] = r      # a re-run step overwrites the killed run's record
    return out


def _metrics(run_dir):
    return {json.loads(x)["step"]: json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()}


@pytest.mark.slow
def test_cli_trains_checkpoints_and_resumes_after_sigkill(tiny_hf_dir, tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = _cli(tiny_overrides(tiny_hf_dir, ref_dir), tmp_path / "ref.log")
    run = _cli(tiny_overrides(tiny_hf_dir, run_dir), tmp_path / "run.log")
    ckpt = run_dir / "checkpoints"
    deadline = time.time() + 900
    while not (ckpt / "1").is_dir() and run.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    killed_at = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert killed_at < 3
    resumed = _cli(tiny_overrides(tiny_hf_dir, run_dir), tmp_path / "resume.log")
    assert resumed.wait(timeout=900) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert ref.wait(timeout=900) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert f"step {killed_at}" in (tmp_path / "resume.log").read_text().split("resumed from", 1)[1].splitlines()[0]
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())[-1] == 3

    # the resumed run equals the uninterrupted one: same RC states and choices, same rollouts' rewards and loss
    want, got = _records(ref_dir), _records(run_dir)
    assert want.keys() == got.keys() and len(want) == 3 * 2
    for key in want:
        assert got[key] == want[key], key
    mw, mg = _metrics(ref_dir), _metrics(run_dir)
    for step in (1, 2, 3):
        for k in ("loss", "reward_mean", "completion_len_mean", "rc_turn0_len_mean", "rc_summary_len_mean",
                  "grad_norm"):
            assert mg[step][k] == mw[step][k], (step, k)
    assert mw[3]["rc_turn2_len_mean"] > 0 and "rc_turn2_reward_mean" in mw[3]
    # the checkpoint holds the RC state buffer of the next step (none after the last step)
    extra = json.loads((ckpt / "2" / "extra" / "metadata").read_text())
    assert extra["rc_buffer"]["step"] == 2 and len(extra["rc_buffer"]["state"]["history"]) == 2
    # ... holding the problems step 3 trained on (every sample row is usable: positions = dataset indices)
    assert sorted(extra["rc_buffer"]["state"]["problem"]) == sorted(k[1] for k in want if k[0] == 3)
    final = json.loads((ckpt / "3" / "extra" / "metadata").read_text())
    assert final["rc_buffer"] is None and final["version"] == 3
    # same final weights
    import jax
    import orbax.checkpoint as ocp
    a = ocp.StandardCheckpointer().restore(ref_dir / "checkpoints" / "3" / "state")
    b = ocp.StandardCheckpointer().restore(ckpt / "3" / "state")
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_summarizer_choices(tiny_hf_dir, tmp_path):
    from qednano_jax.rollout.native import NativeRollout
    from qednano_jax.rollout.sglang import SGLangRollout

    base = tiny_overrides(tiny_hf_dir, tmp_path)
    tok = load_tokenizer(tiny_hf_dir)
    policy = object()
    cfg = load_config("configs/rc-tiny.yaml", base)
    assert rc_train.make_summarizer(cfg, policy, tok) == (policy, tok)          # default: the policy's own backend
    cfg = load_config("configs/rc-tiny.yaml", base + ["rc.summarizer=native", f"rc.summarizer_path={tiny_hf_dir}"])
    engine, stok = rc_train.make_summarizer(cfg, policy, tok)
    assert isinstance(engine, NativeRollout) and engine.weight_version == "frozen" and stok.get_vocab() == \
        tok.get_vocab()
    cfg = load_config("configs/rc-tiny.yaml", base + ["rc.summarizer=sglang",
                                                      "rc.summarizer_urls=[http://127.0.0.1:9]"])
    client, stok = rc_train.make_summarizer(cfg, policy, tok)
    assert isinstance(client, SGLangRollout) and client.cfg.urls == ("http://127.0.0.1:9",) and stok is tok
    with pytest.raises(ConfigError, match="rc.summarizer_path"):
        rc_train.check_config(load_config("configs/rc-tiny.yaml", base + ["rc.summarizer=native"]))


def test_rc_actor_jitted_and_host_loops_agree(tiny_hf_dir, tmp_path):
    """The training RC actor (T 0.8 / 0.7 sampling, seeded per step) makes the same states with rc.loop jit and
    host on the same native engine."""
    from qednano_jax.model.hf import load_hf
    from qednano_jax.rollout.native import NativeRollout

    cfg = load_config("configs/rc-tiny.yaml", tiny_overrides(tiny_hf_dir, tmp_path))
    tok = load_tokenizer(tiny_hf_dir)
    rows = [{"problem": f"Let n = {i}. Show that n + 1 is odd.", "rubrics": "7 points."} for i in (2, 4, 6)]
    prompts, _ = rl_data.build_prompts(rows, tok)
    model_cfg, params = load_hf(tiny_hf_dir)
    engine = NativeRollout(model_cfg, params, tok)
    grade = lambda items: [GradeResult(score=0, reward=0.0) for _ in items]
    states = [rc_train.RCActor(cfg, engine, engine, tok, tok, prompts, grade, use_jit=j, log=print).run([2, 0], 4)[0]
              for j in (True, False)]
    for name in ("outputs", "lengths", "history", "history_len", "summary_tokens", "rewards", "problem"):
        np.testing.assert_array_equal(np.asarray(getattr(states[0], name)), np.asarray(getattr(states[1], name)))
    assert np.asarray(states[0].problem).tolist() == [2, 0] and np.asarray(states[0].done).all()
    assert np.asarray(states[0].history_len)[:, 1:].sum() > 0     # summaries flowed between the turns


@pytest.mark.slow
def test_cli_sigterm_saves_that_step_exits_0_and_resumes_exactly(tiny_hf_dir, tmp_path):
    """SIGTERM to a running RC job: the step it is in finishes and is checkpointed (checkpoint.every is 100), exit 0
    naming how to resume; the same command resumes and ends with the uninterrupted run's metrics, each step once."""
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    args = lambda d: tiny_overrides(tiny_hf_dir, d) + ["checkpoint.every=100"]
    ref = _cli(args(ref_dir), tmp_path / "ref.log")
    run = _cli(args(run_dir), tmp_path / "run.log")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 900
    while not (metrics.exists() and metrics.read_text().strip()) and run.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert run.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-3000:]
    stopped = max(_metrics(run_dir))
    assert stopped < 3 and f"SIGTERM: stopped after step {stopped}" in (tmp_path / "run.log").read_text()
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [stopped]
    resumed = _cli(args(run_dir), tmp_path / "resume.log")
    assert resumed.wait(timeout=900) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    assert ref.wait(timeout=900) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3]
    mw, mg = _metrics(ref_dir), _metrics(run_dir)
    for step in (1, 2, 3):
        for k in ("loss", "reward_mean", "grad_norm", "rc_summary_len_mean"):
            assert mg[step][k] == mw[step][k], (step, k)
