"""The RL loop (qednano_jax/rl/loop.py): packing alignment on a hand-made example, max_lag discards, a toy task with
a programmatic reward learnt through the full loop on the native engine, exact resume, grader faults."""
import http.server
import json
import re
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from qednano_jax.config import load_config
from qednano_jax.data.rl import RL_PROMPT
from qednano_jax.data.tokenizer import load_tokenizer
from qednano_jax.model import qwen3
from qednano_jax.model.hf import load_hf
from qednano_jax.reward.grader import GradeResult, GraderError, OpenAIGrader
from qednano_jax.rl import batch, loop
from qednano_jax.rl.trainer import RLTrainer
from qednano_jax.rollout.base import Completion
from qednano_jax.train import checkpoint as ckpt_lib


def comp(ids, lps, version="0", reason="stop"):
    return Completion(token_ids=list(ids), logprobs=list(lps), finish_reason=reason, text="", weight_version=version,
                      prompt_tokens=0)


# ----------------------------------------------------------------------------------------------- pure pieces

def test_pack_groups_aligns_logprobs_advantages_and_mask():
    g1 = batch.Group(prompt_ids=[1, 2, 3], completions=[comp([10, 11], [-0.1, -0.2]), comp([12], [-0.3])],
                    rewards=[1.0, 0.0])
    g2 = batch.Group(prompt_ids=[4, 5], completions=[comp([20, 21, 22], [-1.0, -2.0, -3.0]), comp([23], [-4.0])],
                    rewards=[0.25, 0.75])
    cfg = load_config(None, ["stage=rl"]).rl.loss
    adv = batch.group_advantages([g1, g2], cfg)
    np.testing.assert_allclose(np.concatenate(adv), [0.5, -0.5, -0.25, 0.25])
    p = batch.pack_groups([g1, g2], adv, seq_len=8, rows_multiple=2)
    # lengths (prompt + completion - 1): 4, 3, 4, 2 -> first fit decreasing: row 0 = [g1c0 (4), g2c0 (4)],
    # row 1 = [g1c1 (3), g2c1 (2)], padded to 2 rows
    np.testing.assert_array_equal(p["tokens"], [[1, 2, 3, 10, 4, 5, 20, 21], [1, 2, 3, 4, 5, 0, 0, 0]])
    np.testing.assert_array_equal(p["targets"], [[2, 3, 10, 11, 5, 20, 21, 22], [2, 3, 12, 5, 23, 0, 0, 0]])
    np.testing.assert_array_equal(p["positions"], [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(p["segment_ids"], [[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 2, 2, 0, 0, 0]])
    np.testing.assert_array_equal(p["loss_mask"], [[0, 0, 1, 1, 0, 1, 1, 1], [0, 0, 1, 0, 1, 0, 0, 0]])
    np.testing.assert_allclose(p["old_logprobs"], [[0, 0, -0.1, -0.2, 0, -1, -2, -3], [0, 0, -0.3, 0, -4, 0, 0, 0]])
    np.testing.assert_allclose(p["advantages"], [[0, 0, .5, .5, 0, -.25, -.25, -.25], [0, 0, -.5, 0, .25, 0, 0, 0]])
    b, stats = batch.build_train_batch([g1, g2], cfg, seq_len=8, micro_batch_rows=1, samples_per_step=1024)
    # padded to the fixed count of 1024 samples / 1 row: the 2 packed micro-batches are the valid ones
    assert b["tokens"].shape == (1024, 1, 8) and float(b["denominator"]) == 1024.0
    np.testing.assert_array_equal(b["valid"], [1, 1] + [0] * 1022)
    np.testing.assert_array_equal(b["tokens"][:2, 0], p["tokens"])
    assert not b["tokens"][2:].any() and not b["weights"][2:].any()
    assert stats["completion_tokens"] == 7 and stats["tokens"] == 13
    with pytest.raises(ValueError, match="group 0 completion 0: prompt 3 \\+ completion 2 tokens do not fit"):
        batch.pack_groups([g1, g2], adv, seq_len=3)


def test_pack_groups_keeps_each_row_within_its_loss_token_cap():
    g1 = batch.Group(prompt_ids=[1, 2, 3], completions=[comp([10, 11], [-0.1, -0.2]), comp([12], [-0.3])],
                    rewards=[1.0, 0.0])
    g2 = batch.Group(prompt_ids=[4, 5], completions=[comp([20, 21, 22], [-1.0, -2.0, -3.0]), comp([23], [-4.0])],
                    rewards=[0.25, 0.75])
    adv = batch.group_advantages([g1, g2], load_config(None, ["stage=rl"]).rl.loss)
    # (length, completion tokens) 4,2 / 4,3 / 3,1 / 2,1 in first-fit order with at most 3 completion tokens a row:
    # g1c0 -> row 0; g2c0 needs 3 (row 0 has 1 left) -> row 1; g1c1 -> row 0; g2c1 fits neither -> row 2
    p = batch.pack_groups([g1, g2], adv, seq_len=8, loss_tokens_per_row=3)
    np.testing.assert_array_equal(p["tokens"], [[1, 2, 3, 10, 1, 2, 3, 0], [4, 5, 20, 21, 0, 0, 0, 0],
                                                [4, 5, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(p["loss_mask"].sum(axis=1), [3, 3, 1])
    with pytest.raises(ValueError, match="group 1 completion 0: 3 completion tokens exceed rl.loss_tokens_per_row 2"):
        batch.pack_groups([g1, g2], adv, seq_len=8, loss_tokens_per_row=2)
    with pytest.raises(Exception, match="rl.loss_tokens_per_row: 8 is below rl.max_tokens 16"):
        load_config(None, ["stage=rl", "rl.max_tokens=16", "rl.loss_tokens_per_row=8"])


def test_filter_stale_counts_groups_beyond_max_lag():
    groups = [batch.Group([1], [comp([2], [0.0], v)], [0.0]) for v in ("5", "4", "3", "default")]
    kept, gone = batch.filter_stale(groups, trainer_version=5, max_lag=1)
    assert [g.completions[0].weight_version for g in kept] == ["5", "4"] and gone == 2
    assert batch.filter_stale(groups, 5, 0)[1] == 3


# ----------------------------------------------------------------------------------------------- full loop

def write_rows(path, n=4):
    rows = [{"problem": f"Show {i} < {i + 1}.", "rubrics": "7 pts: a proof.", "reward_mean": 0.5} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def toy_config(tmp_path, tiny_hf_dir, run="run", *extra):
    return load_config(None, [
        "stage=rl", f"train.init={tiny_hf_dir}", f"data.tokenizer={tiny_hf_dir}",
        f"data.path={write_rows(tmp_path / 'rows.jsonl')}",
        f"data.prompt_template={json.dumps(RL_PROMPT)}",
        "data.seq_len=64", "rollout.max_batch=32", "rl.prompts_per_step=2", "rl.group_size=8", "rl.max_tokens=2",
        "rl.temperature=1.0", "rl.micro_batch_rows=8", "rl.loss.entropy_coef=0.0", "optim.lr=0.03",
        "optim.schedule=constant", "optim.warmup_ratio=0.0", "optim.clip_norm=1.0", "train.progress=false",
        "train.export_hf=false", f"train.run_dir={tmp_path / run}", "checkpoint.every=1", "checkpoint.async_save=false",
        *extra])


def first_token_reward(x):
    def reward_fn(items):
        return [GradeResult(score=7 if c.token_ids[0] == x else 0, reward=float(c.token_ids[0] == x))
                for _, c, _ in items]
    return reward_fn


def pick_target(tiny_hf_dir, cfg):
    """A token the random policy says first with probability ~5-15%: reward starts near 0 but the groups see it."""
    from qednano_jax.data import rl as rl_data
    tok = load_tokenizer(tiny_hf_dir)
    prompts, _ = rl_data.load_prompts(cfg.data, cfg.rl, tok, log=lambda s: None)
    model_cfg, params = load_hf(tiny_hf_dir)
    probs = np.mean([jax.nn.softmax(qwen3.forward(model_cfg, params, np.asarray([p.ids]))[0, -1]) for p in prompts],
                    axis=0)
    return int(np.argmin(np.abs(probs - 0.1))), float(probs[np.argmin(np.abs(probs - 0.1))])


def test_toy_task_reward_rises_through_the_full_loop(tmp_path, tiny_hf_dir):
    cfg = toy_config(tmp_path, tiny_hf_dir, "toy", "train.steps=10", "checkpoint.every=100")
    x, p0 = pick_target(tiny_hf_dir, cfg)
    assert p0 < 0.2
    out = loop.run(cfg, log=lambda s: None, reward_fn=first_token_reward(x))
    r = [out["metrics"][s]["reward_mean"] for s in range(1, 11)]
    assert r[0] < 0.3, r
    assert np.mean(r[-2:]) > 0.8, r
    m = out["metrics"][1]
    assert m["logprob_gap"] < 1e-3  # on-policy: the trainer's logprobs (logits / T) match the sampler's
    assert m["completions"] == 16 and m["stale_groups"] == 0 and m["weight_lag_mean"] == 0


def test_sequence_parallel_run_matches_fsdp(tmp_path, tiny_hf_dir):
    """The same 2 RL steps on fsdp (8 row shards) and on fsdp_sp with 4-way sequence parallelism (2 row shards x 4
    length shards, rows in load-balanced order): the same rollouts, losses, grad norms and params."""
    reward = first_token_reward(pick_target(tiny_hf_dir, toy_config(tmp_path, tiny_hf_dir))[0])
    runs = {name: loop.run(toy_config(tmp_path, tiny_hf_dir, name, "train.steps=2", "checkpoint.every=100", *extra),
                           log=lambda s: None, reward_fn=reward)
            for name, extra in [("fsdp", ()), ("sp", ("mesh=mesh/fsdp_sp.yaml",
                                                      "mesh.shape={data: 1, fsdp: 2, tensor: 1, sequence: 4}"))]}
    for step in (1, 2):
        a, b = runs["fsdp"]["metrics"][step], runs["sp"]["metrics"][step]
        assert a["reward_mean"] == b["reward_mean"] and a["completion_tokens"] == b["completion_tokens"]
        for key in ("loss", "grad_norm", "entropy", "logprob_gap"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (step, key, a[key], b[key])
    spec = runs["sp"]["state"].params["layers"]["gate_proj"].sharding.spec
    assert tuple(spec)[:2] == (None, ("fsdp", "sequence"))
    for x, y in zip(jax.tree.leaves(runs["fsdp"]["state"].params), jax.tree.leaves(runs["sp"]["state"].params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_resume_with_lag_continues_exactly(tmp_path, tiny_hf_dir):
    """max_lag 1: the rollouts of the next step (already generated and graded) are in the checkpoint."""
    reward = first_token_reward(pick_target(tiny_hf_dir, toy_config(tmp_path, tiny_hf_dir))[0])
    full = loop.run(toy_config(tmp_path, tiny_hf_dir, "full", "train.steps=3", "rl.max_lag=1"), log=lambda s: None,
                    reward_fn=reward)
    loop.run(toy_config(tmp_path, tiny_hf_dir, "cut", "train.steps=2", "rl.max_lag=1"), log=lambda s: None,
             reward_fn=reward)
    ck = ckpt_lib.Checkpointer(tmp_path / "cut" / "checkpoints", every=1, keep=3)
    assert ck.latest_step() == 2
    extra = ck.manager.restore(2, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra
    ck.close()
    assert len(extra["buffer"]) == 1 and extra["buffer"][0]["index"] == 2
    assert {c["weight_version"] for g in extra["buffer"][0]["groups"] for c in g["completions"]} == {"1"}
    resumed = loop.run(toy_config(tmp_path, tiny_hf_dir, "cut", "train.steps=3", "rl.max_lag=1",
                                  "train.allow_resume_changes=true"),
                       log=lambda s: None, reward_fn=reward)
    assert resumed["start_step"] == 2 and resumed["sampler"] == full["sampler"]
    assert resumed["metrics"][3]["reward_mean"] == full["metrics"][3]["reward_mean"]
    assert resumed["metrics"][3]["loss"] == full["metrics"][3]["loss"]
    assert full["metrics"][3]["weight_lag_mean"] == 1.0
    for a, b in zip(jax.tree.leaves(full["state"].params), jax.tree.leaves(resumed["state"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Always500(http.server.BaseHTTPRequestHandler):
    calls = 0
    lock = threading.Lock()  # the threaded server runs handlers concurrently: count without lost updates

    def do_POST(self):
        with type(self).lock:
            type(self).calls += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(500)
        self.end_headers()
        self.wfile.write(b"injected fault")

    def log_message(self, *a):
        pass


class _DeepBacklogServer(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 can reset some of 16 concurrent connects before any handler runs


def test_grader_faults_within_the_limit_are_counted_and_never_stop_the_run(tmp_path, tiny_hf_dir):
    """With grader.max_failure_frac at 1 (no limit), every fault scores 0 and is counted, retries included."""
    _Always500.calls = 0  # the handler is shared with the stop test below
    srv = _DeepBacklogServer(("127.0.0.1", 0), _Always500)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        cfg = toy_config(tmp_path, tiny_hf_dir, "faults", "train.steps=2", "checkpoint.every=100",
                         f"grader.base_url=http://127.0.0.1:{srv.server_port}/v1", "grader.api=chat",
                         "grader.retries=1", "grader.backoff=[0.01]", "grader.timeout=5", "grader.max_failure_frac=1")
        grader = OpenAIGrader(cfg.grader)
        # every completion is sent as a proof (a 2-token completion rarely closes its thinking)
        out = loop.run(cfg, log=lambda s: None, reward_fn=lambda items: grader.grade_many(
            [(p.problem, p.rubric, "proof: " + text) for p, _, text in items]))
    finally:
        srv.shutdown()
    for s in (1, 2):
        m = out["metrics"][s]
        assert m["grader_failed"] == 16 and m["reward_mean"] == 0.0 and m["score7_frac"] == 0.0
    assert grader.stats.failures == 32 and grader.stats.retries == 32 and _Always500.calls == 64


def test_native_random_judge_grades_closed_proofs(tmp_path, tiny_hf_dir):
    """The tiny demo's grader (grader.backend native, judge_path random) inside the loop: completions that close
    their thinking are sent to the in-process judge, whose replies are parsed like an endpoint's."""
    short = tmp_path / "grader.txt"  # the bundled prompt exceeds the tiny model's 2,048-token context
    short.write_text("Grade 0-7.\nProblem: {problem}\nScheme: {marking_scheme}\nProof: {solution}\n<score>N</score>")
    cfg = toy_config(tmp_path, tiny_hf_dir, "judge", "train.steps=1", "rl.max_tokens=24", "data.seq_len=128", "grader.backend=native",
                     "grader.judge_path=random", "grader.max_tokens=8", "grader.concurrency=16",
                     f"grader.prompt_file={short}")
    m = loop.run(cfg, log=lambda s: None)["metrics"][1]
    assert m["grader_total_calls"] > 0, m  # some of the 16 completions close their thinking (1 of 512 tokens)
    assert m["grader_total_calls"] + m["grader_total_empty"] == 16
    assert m["grader_total_failures"] == 0
    assert m["grader_no_score"] + m["grader_empty_proof"] + m["score7_frac"] * 16 <= 16


# ----------------------------------------------------------------------------------------------- run driver

def test_sigterm_mid_run_saves_that_step_and_resumes_like_an_uninterrupted_run(tmp_path, tiny_hf_dir):
    """A SIGTERM arriving during step 2 (while the rollouts of step 3 are graded: rl.max_lag 1): step 2 finishes, is
    checkpointed (checkpoint.every is 100), the run returns `preempted`; the same config then resumes at step 2 and
    ends where an uninterrupted run does, each step in metrics.jsonl once."""
    import os
    import signal
    reward = first_token_reward(pick_target(tiny_hf_dir, toy_config(tmp_path, tiny_hf_dir))[0])
    calls = []

    def signalled(items):
        calls.append(1)
        if len(calls) == 3:  # the grading of step 3's rollouts, which runs while step 2 trains
            os.kill(os.getpid(), signal.SIGTERM)
        return reward(items)

    args = ("train.steps=4", "checkpoint.every=100", "rl.max_lag=1")
    full = loop.run(toy_config(tmp_path, tiny_hf_dir, "full", *args), log=lambda s: None, reward_fn=reward)
    cut = loop.run(toy_config(tmp_path, tiny_hf_dir, "cut", *args), log=lambda s: None, reward_fn=signalled)
    assert cut["preempted"] and sorted(cut["metrics"]) == [1, 2]
    ck = ckpt_lib.Checkpointer(tmp_path / "cut" / "checkpoints", every=1, keep=3)
    assert list(ck.manager.all_steps()) == [2]
    ck.close()
    assert not (tmp_path / "cut" / "hf").exists()  # no final export of an unfinished run
    resumed = loop.run(toy_config(tmp_path, tiny_hf_dir, "cut", *args), log=lambda s: None, reward_fn=reward)
    assert resumed["start_step"] == 2 and not resumed["preempted"]
    for s in (3, 4):
        assert resumed["metrics"][s]["loss"] == full["metrics"][s]["loss"]
    for a, b in zip(jax.tree.leaves(full["state"].params), jax.tree.leaves(resumed["state"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_non_finite_loss_stops_the_run_before_the_update_is_saved(tmp_path, tiny_hf_dir):
    """A NaN reward at step 3 makes the loss NaN: the run stops naming step 3; the update is not applied or saved,
    so the newest checkpoint is step 2's."""
    from qednano_jax.train.driver import NonFinite
    reward = first_token_reward(pick_target(tiny_hf_dir, toy_config(tmp_path, tiny_hf_dir))[0])
    calls = []

    def poisoned(items):
        calls.append(1)
        out = reward(items)
        if len(calls) == 3:
            out[0] = GradeResult(score=7, reward=float("nan"))
        return out

    with pytest.raises(NonFinite, match=r"step 3: non-finite loss .* checkpoint \(step 2\) is the last good one"):
        loop.run(toy_config(tmp_path, tiny_hf_dir, "nan", "train.steps=4"), log=lambda s: None, reward_fn=poisoned)
    ck = ckpt_lib.Checkpointer(tmp_path / "nan" / "checkpoints", every=1, keep=3)
    assert ck.latest_step() == 2
    ck.close()
    assert not (tmp_path / "nan" / ".lock").exists()


def test_train_step_compiles_once_whatever_the_packing(tmp_path, tiny_hf_dir):
    """Steps whose completions pack into 1, 3 and 2 micro-batches run one compiled program (fixed micro-batch
    count, the unused ones skipped) and train on what they hold."""
    cfg = toy_config(tmp_path, tiny_hf_dir, "compile", "rl.micro_batch_rows=1", "data.seq_len=40", "rl.max_tokens=36")
    trainer = RLTrainer(cfg, log=lambda s: None)
    trainer.init_or_restore()
    prompt = [3, 4, 5, 6]  # a sequence of n completion tokens fills 3 + n of a row's 40

    def groups(lengths):
        return [batch.Group(prompt_ids=prompt, completions=[comp(range(30 + i, 30 + i + n), [-1.0] * n)
                                                           for i, n in enumerate(lengths)],
                           rewards=[float(i % 2) for i in range(len(lengths))])]

    seen = []
    for lengths in ([2] * 8, [36, 36] + [2] * 6, [19, 19] + [2] * 6):  # 1, 3 and 2 rows
        m = trainer.train_on_groups(groups(lengths))
        seen.append((m["micro_batches"], m["train_compiles"]))
        assert m["finite"] == 1.0 and m["grad_norm"] > 0
    trainer.close()
    assert [s[0] for s in seen] == [1, 3, 2] and all(s[1] == 1 for s in seen), seen


def test_a_grader_failing_most_calls_stops_the_run_naming_its_url(tmp_path, tiny_hf_dir, monkeypatch):
    """An OpenAI-compatible grader answering HTTP 500 to every call (a fault a real judge cannot be made to give on
    demand: a stand-in server) stops the RL run at step 1 with the URL, instead of training on rewards of 0."""
    # the random tiny policy never closes its thinking, so every proof would be empty and no call made: grade the
    # whole completion instead
    monkeypatch.setattr(OpenAIGrader, "proof_of", lambda self, text: text + " proof")
    server = _DeepBacklogServer(("127.0.0.1", 0), _Always500)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        cfg = toy_config(tmp_path, tiny_hf_dir, "down", "train.steps=2", "grader.backend=openai",
                         f"grader.base_url={url}", "grader.api=chat", "grader.retries=0", "grader.timeout=5")
        with pytest.raises(GraderError, match=re.escape(f"{url}/chat/completions: HTTP 500")):
            loop.run(cfg, log=lambda s: None)
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "down" / "checkpoints").exists() or not any((tmp_path / "down" / "checkpoints").iterdir())
