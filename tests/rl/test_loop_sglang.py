"""The RL loop against the real SGLang server (rollouts + a refit every step) with the server's own
/v1/chat/completions as the grader endpoint, on the tiny model: 3 steps, then the real CLI SIGKILLed mid-run and
resumed reaches the same state as the uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import requests
import yaml

from qednano_jax.config import load_config
from qednano_jax.data.rl import RL_PROMPT, PromptSampler
from qednano_jax.rl import loop
from qednano_jax.rl.trainer import RLTrainer
from qednano_jax.rollout.refit import update_from_disk
from qednano_jax.train import checkpoint as ckpt_lib

STEPS = 3


def rl_yaml(tmp_path, tiny_hf_dir, server, run: str) -> str:
    model = requests.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["id"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"problem": f"Show that {i} + 1 > {i}.", "rubrics": "7 pts: any proof.",
                                        "reward_mean": 0.5}) + "\n" for i in range(5)))
    short = tmp_path / "grader.txt"  # the bundled prompt exceeds the tiny model's 2,048-token context
    short.write_text("Grade the proof from 0 to 7.\nProblem: {problem}\nScheme: {marking_scheme}\nProof: {solution}\n"
                     "Answer as <score>N</score>.")
    cfg = {"stage": "rl",
           "data": {"path": str(rows), "tokenizer": str(tiny_hf_dir), "prompt_template": RL_PROMPT, "seq_len": 128},
           "rollout": {"backend": "sglang", "urls": [server.url], "refit_dir": str(tmp_path / run / "refit"),
                       "request_timeout": 120, "health_timeout": 120},
           "grader": {"backend": "openai", "base_url": f"{server.url}/v1", "model": model, "api": "chat",
                      "reasoning_effort": "", "temperature": 0.0, "max_tokens": 8, "timeout": 120, "retries": 1,
                      "backoff": [1.0], "api_key_env": "", "prompt_file": str(short), "concurrency": 8},
           "rl": {"prompts_per_step": 2, "group_size": 4, "max_tokens": 24, "temperature": 1.0, "max_lag": 1,
                  "micro_batch_rows": 8, "loss": {"entropy_coef": 0.0, "aggregation": "token-mean"}},
           "optim": {"lr": 0.01, "schedule": "constant", "warmup_ratio": 0.0, "clip_norm": 1.0},
           "train": {"steps": STEPS, "init": str(tiny_hf_dir), "run_dir": str(tmp_path / run), "progress": False,
                     "export_hf": False},
           "checkpoint": {"every": 1, "keep": 5, "async_save": False}}
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def final_params(run_dir, cfg):
    trainer = RLTrainer(cfg)
    try:
        trainer.init_or_restore()
        return jax.tree.map(np.asarray, trainer.state.params), trainer.version
    finally:
        trainer.close()


@pytest.mark.slow  # ~6 min on 2 busy cores: server start, 3 + 3 steps with a refit each, two CLI starts
def test_rl_loop_on_sglang_resumes_after_sigkill(request, tmp_path, tiny_hf_dir):
    if not os.environ.get("QEDNANO_SGLANG_VENV"):
        pytest.skip("QEDNANO_SGLANG_VENV is unset: no real SGLang server to test against (see .ci/run)")
    server = request.getfixturevalue("sglang_server")
    try:
        # uninterrupted, in-process
        cfg_a = load_config(rl_yaml(tmp_path, tiny_hf_dir, server, "a"))
        out = loop.run(cfg_a, log=lambda s: None)
        info = requests.get(f"{server.url}/get_model_info", timeout=30).json()
        assert str(info["weight_version"]) == str(STEPS)  # refitted after every step
        for s in range(1, STEPS + 1):
            m = out["metrics"][s]
            assert m["completions"] == 8 and m["refit_s"] > 0 and m["weight_lag_mean"] <= 1
            assert m["grader_total_calls"] + m["grader_total_empty"] == 8 * (s + 1)  # + the batch generated ahead
            assert m["grader_total_failures"] == 0
        # the real CLI, SIGKILLed once checkpoint 1 is complete, then run again to the end
        path_b = rl_yaml(tmp_path, tiny_hf_dir, server, "b")
        ckpts = tmp_path / "b" / "checkpoints"
        log = open(tmp_path / "b.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "qednano_jax.train", path_b], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while not (ckpts / "1").is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "b.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
        assert killed_at < STEPS
        r = subprocess.run([sys.executable, "-m", "qednano_jax.train", path_b], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"step {killed_at}" in r.stdout + r.stderr  # "resumed from ... step k"
        cfg_b = load_config(path_b)
        params_b, version_b = final_params(tmp_path / "b", cfg_b)
        params_a, version_a = final_params(tmp_path / "a", cfg_a)
        assert version_a == version_b == STEPS
        for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        ck = ckpt_lib.Checkpointer(ckpts, every=1, keep=5)
        sampler_state = ck.manager.restore(STEPS, args=ocp.args.Composite(data=ckpt_lib.HostJsonRestore())).data
        ck.close()
        want = PromptSampler(5, 0)
        for _ in range(STEPS + 1):  # every step's batch, plus the one generated ahead (max_lag 1)
            want.next(2)
        assert sampler_state == want.state() == out["sampler"]
    finally:  # the session server serves the fixture weights again
        update_from_disk(requests.Session(), server.url, tiny_hf_dir, "restored", timeout=120)
