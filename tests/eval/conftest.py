"""Eval fixtures: a tiny model that closes its thinking early (so proofs exist and reach the grader), and a
stand-in grader endpoint used only to inject faults (HTTP 500, garbage bodies, timeouts, replies without a grade)."""
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest


@pytest.fixture(scope="session")
def proof_hf_dir(tiny_hf_dir, tmp_path_factory):
    """The session's tiny random Qwen3 (tiny_hf_dir), nudged so that `</think>` has roughly a 10% chance per token.

    A random model almost never closes its thinking, so every proof would be empty and no grader would ever be
    called. Here every embedding gets one large shared coordinate (a = 10 in the last dimension), which dominates
    the final hidden state, and `</think>`'s row gets a little more of it (0.3): its logit rises by ~2 over the rest.
    Everything else stays random; about 3 in 4 completions of 64 tokens then carry a non-empty proof. The context
    is raised to 4096 positions (a config field; RoPE has no table) so that grading prompts fit the native judge.
    """
    import dataclasses

    from qednano_jax.data.tokenizer import load_tokenizer
    from qednano_jax.model.hf import load_hf, save_hf

    cfg, params = load_hf(tiny_hf_dir)
    tc = load_tokenizer(tiny_hf_dir).convert_tokens_to_ids("</think>")
    embed = np.array(params["embed"])
    embed[:, -1] = 10.0
    embed[tc, -1] = 10.3
    params = {**params, "embed": embed}
    cfg = dataclasses.replace(cfg, max_position_embeddings=4096)
    return save_hf(cfg, params, tmp_path_factory.mktemp("proof_model") / "model", tokenizer_dir=tiny_hf_dir)


class StandInGrader:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 whose behaviour is chosen by a `FAULT:<kind>` marker
    in the grading prompt (the problem text carries it):

    ok7 / ok6 / ok0    a reply ending in <points>N out of 7</points>
    echo1              a reply that quotes a fake 7-point tag, then gives 1 (the last tag wins)
    flaky              HTTP 500 on the first request for a prompt, then 6 points
    down               HTTP 500 always
    garbage            HTTP 200 with a body that is not JSON
    slow               answers after `slow_s` seconds (past the client's timeout)
    noscore            a well-formed reply with no grade in it
    correct/incorrect  an AnswerBench verdict in \\boxed{}
    """

    def __init__(self, slow_s: float = 2.0):
        self.slow_s, self.requests, self.seen = slow_s, [], {}
        self._lock = threading.Lock()
        grader = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                m = re.search(r"FAULT:(\w+)", prompt)
                kind = m.group(1) if m else "ok0"
                with grader._lock:
                    grader.requests.append(kind)
                    n = grader.seen[prompt] = grader.seen.get(prompt, 0) + 1
                replies = {"ok7": "Complete. <points>7 out of 7</points>", "ok6": "Minor slip. <points>6 out of 7</points>",
                           "ok0": "No progress. <points>0 out of 7</points>",
                           "echo1": "The text says <points>7 out of 7</points> but it is wrong. <points>1 out of 7</points>",
                           "flaky": "Fine. <points>6 out of 7</points>", "noscore": "I am not sure what to give.",
                           "correct": "Same value. \\boxed{Correct}", "incorrect": "Different. \\boxed{Incorrect}"}
                if kind == "down" or (kind == "flaky" and n == 1):
                    return self._send(500, b'{"error": "overloaded"}')
                if kind == "garbage":
                    return self._send(200, b"<html>proxy error</html>")
                if kind == "slow":
                    time.sleep(grader.slow_s)
                reply = {"choices": [{"message": {"role": "assistant", "content": replies.get(kind, replies["ok0"])}}]}
                self._send(200, json.dumps(reply).encode())

            def _send(self, code, data):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in_grader():
    g = StandInGrader()
    yield g
    g.close()
