"""Fault injection for the HTTP rollout client with stand-in servers (retries, bad replies, load balancing, a dead
server among several) and the refit export (atomic, versioned, pruned). The real servers are in test_client.py."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import requests

from qednano_jax.config import ModelConfig, RolloutConfig
from qednano_jax.model import qwen3
from qednano_jax.model.hf import SINGLE_FILE, load_hf
from qednano_jax.rollout import RolloutError, SamplingParams, make_rollout
from qednano_jax.rollout.refit import PREFIX, TRASH, export_version, update_from_disk, wait_pruned


def good_reply(body, version="w0"):
    """A well-formed SGLang reply whose tokens encode the prompt: [first id, last id, len]."""
    p = body["input_ids"]
    ids = [p[0], p[-1], len(p)]
    meta = {"finish_reason": {"type": "length", "length": 3}, "prompt_tokens": len(p), "completion_tokens": 3,
            "weight_version": version, "output_token_logprobs": [[-0.5, t, None] for t in ids]}
    return 200, {"text": "x", "output_ids": ids, "meta_info": meta}


class StandIn:
    """A loopback HTTP server whose /generate answers come from `behaviour(call_index, body) -> (code, obj)`."""

    def __init__(self, behaviour, delay=0.0):
        self.behaviour, self.delay, self.bodies, self.lock = behaviour, delay, [], threading.Lock()
        me = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/get_model_info":
                    return self._send(200, {"weight_version": "w0"})
                self._send(200, {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with me.lock:
                    i = len(me.bodies)
                    me.bodies.append(body)
                time.sleep(me.delay)
                self._send(*me.behaviour(i, body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def standin():
    made = []

    def make(behaviour=lambda i, b: good_reply(b), delay=0.0):
        made.append(StandIn(behaviour, delay))
        return made[-1]
    yield make
    for s in made:
        s.close()


def client(*urls, **kw):
    cfg = dict(backend="sglang", urls=urls, concurrency=4, request_timeout=10, retries=2, backoff=(0.01,),
               health_timeout=2.0)
    cfg.update(kw)
    return make_rollout(RolloutConfig(**cfg), ModelConfig(vocab_size=512))


def dead_url():
    s = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{s.server_address[1]}"
    s.server_close()
    return url


PROMPTS = [[i + 1, 7, i + 2] for i in range(8)]


def test_every_sampling_field_is_sent_explicitly(standin):
    srv = standin()
    sp = SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=(3,), seed=4)
    out = client(srv.url).generate(PROMPTS[:2], sp, n=2)
    assert [[c.token_ids for c in g] for g in out] == [[[1, 2, 3]] * 2, [[2, 3, 3]] * 2]
    assert out[0][0].logprobs == [-0.5] * 3 and out[0][0].weight_version == "w0"
    body = srv.bodies[0]
    assert body["return_logprob"] is True and body["input_ids"] in PROMPTS[:2]
    s = body["sampling_params"]
    assert s["temperature"] == 0 and s["top_p"] == 1 and s["top_k"] == -1 and s["max_new_tokens"] == 5
    assert s["stop_token_ids"] == [3] and s["ignore_eos"] is False and s["min_p"] == 0
    assert len({b["sampling_params"]["sampling_seed"] for b in srv.bodies}) == 4  # n repeats get their own seeds


def test_transient_errors_are_retried(standin):
    srv = standin(lambda i, b: (500, {"error": "busy"}) if i < 2 else good_reply(b))
    out = client(srv.url, concurrency=1).generate(PROMPTS[:1], SamplingParams())
    assert out[0][0].token_ids == [1, 2, 3] and len(srv.bodies) == 3


def test_persistent_errors_fail_the_call_naming_the_server(standin):
    srv = standin(lambda i, b: (503, {"error": "down"}))
    with pytest.raises(RolloutError, match=f"failed 3 times.*{srv.url}/generate.*503"):
        client(srv.url, concurrency=1).generate(PROMPTS[:1], SamplingParams())


@pytest.mark.parametrize("bad,match", [
    (lambda b: {"meta_info": {**good_reply(b)[1]["meta_info"], "completion_tokens": 4}}, "completion_tokens = 4"),
    (lambda b: {"text": "x"}, "malformed reply"),
    (lambda b: {"meta_info": {**good_reply(b)[1]["meta_info"], "finish_reason": {"type": "weird"}}}, "weird"),
])
def test_inconsistent_replies_are_errors(standin, bad, match):
    srv = standin(lambda i, b: (200, bad(b)))
    with pytest.raises(RolloutError, match=match):
        client(srv.url).generate(PROMPTS[:1], SamplingParams())


def test_client_errors_are_not_retried(standin):
    srv = standin(lambda i, b: (400, {"error": "max_new_tokens too large"}))
    with pytest.raises(RolloutError, match=f"{srv.url}/generate: HTTP 400.*too large"):
        client(srv.url).generate(PROMPTS[:1], SamplingParams())
    assert len(srv.bodies) == 1


def test_load_is_balanced_and_a_dead_server_is_skipped(standin):
    a, b = standin(delay=0.05), standin(delay=0.05)
    out = client(a.url, b.url, dead_url()).generate(PROMPTS, SamplingParams(), n=2)
    assert [g[0].token_ids for g in out] == [[p[0], p[-1], 3] for p in PROMPTS]
    assert len(a.bodies) + len(b.bodies) == 16 and min(len(a.bodies), len(b.bodies)) >= 5


def test_no_healthy_server_fails_within_the_health_timeout():
    url = dead_url()
    t0 = time.monotonic()
    with pytest.raises(RolloutError, match=f"within 2s.*{url}/health_generate"):
        client(url).generate(PROMPTS, SamplingParams())
    assert time.monotonic() - t0 < 2.0 + 3.0


# ----------------------------------------------------------------------------------------------- refit export

CFG = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                  head_dim=8)


def test_export_is_versioned_atomic_and_pruned(tmp_path):
    params = qwen3.init_params(CFG, jax.random.key(0))
    for v in ["1", "2", "step/3"]:
        path, secs = export_version(CFG, params, tmp_path, v, keep_last=2)
        assert secs > 0 and path.name == PREFIX + v.replace("/", "_")
    kept = [f"{PREFIX}2", f"{PREFIX}step_3"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(TRASH)) == kept  # at once
    wait_pruned()
    assert sorted(p.name for p in tmp_path.iterdir()) == kept  # no temp dirs, the pruned one deleted
    (tmp_path / f"{TRASH}weights-0-1-2").mkdir()  # left by a process that died while deleting it
    path, _ = export_version(CFG, jax.tree.map(lambda x: x * 2, params), tmp_path, "2", keep_last=2)  # same version
    _, loaded = load_hf(path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), 2 * np.asarray(b)), loaded, params)
    wait_pruned()
    assert sorted(p.name for p in tmp_path.iterdir()) == kept


def test_export_overwrites_the_oldest_export_in_place(tmp_path):
    """With keep_last = 2 the third export reuses the first one's files (same inode: written in place), never the
    newest one's (the servers' until the refit), and holds exactly its own params; a dtype change (another size)
    rewrites the file from empty."""
    params = [qwen3.init_params(CFG, jax.random.key(k)) for k in range(4)]
    inode = lambda d: (d / SINGLE_FILE).stat().st_ino
    p1, _ = export_version(CFG, params[0], tmp_path, "1", keep_last=2)
    first = inode(p1)
    p2, _ = export_version(CFG, params[1], tmp_path, "2", keep_last=2)
    assert inode(p2) != first
    p3, _ = export_version(CFG, params[2], tmp_path, "3", keep_last=2)
    assert inode(p3) == first and sorted(p.name for p in tmp_path.iterdir()) == [f"{PREFIX}2", f"{PREFIX}3"]
    for path, want in [(p2, params[1]), (p3, params[2])]:
        _, loaded = load_hf(path)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, want)
    p4, _ = export_version(CFG, params[3], tmp_path, "4", keep_last=2, dtype="bfloat16")  # reuses 2: half the size
    _, loaded = load_hf(p4)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16))),
                 loaded, params[3])
    wait_pruned()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{PREFIX}3", f"{PREFIX}4"]
    one = tmp_path / "keep1"  # keep_last = 1: the only export is the newest (served), so it is never overwritten
    served = inode(export_version(CFG, params[0], one, "a", keep_last=1)[0])
    assert inode(export_version(CFG, params[1], one, "b", keep_last=1)[0]) != served


def test_update_that_does_not_take_is_an_error(standin, tmp_path):
    srv = standin(lambda i, b: (200, {"success": True, "message": ""}))  # model info keeps saying "w0"
    with pytest.raises(RolloutError, match=f"{srv.url}: refit to 'v9'.*'w0'"):
        update_from_disk(requests.Session(), srv.url, tmp_path, "v9", timeout=5)
    failing = standin(lambda i, b: (400, {"success": False, "message": "bad shapes"}))
    with pytest.raises(RolloutError, match="update_weights_from_disk.*HTTP 400: bad shapes"):
        update_from_disk(requests.Session(), failing.url, tmp_path, "v9", timeout=5)


def test_bf16_export_writes_half_the_bytes_and_rounds_like_jax(tmp_path):
    """rollout.export_dtype bfloat16 (the 4B configs): the weight files are half the fp32 export and hold the
    params rounded to bf16."""
    params = qwen3.init_params(CFG, jax.random.key(1))
    p32, _ = export_version(CFG, params, tmp_path / "a", "1")
    p16, _ = export_version(CFG, params, tmp_path / "b", "1", dtype="bfloat16")
    def size(d):  # tensor bytes: the file less its 8-byte length and JSON header
        return sum(f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") for f in d.glob("*.safetensors"))
    assert size(p16) * 2 == size(p32)
    cfg16, loaded = load_hf(p16)
    assert cfg16.param_dtype == "bfloat16"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32),
                                                            np.asarray(b.astype(jax.numpy.bfloat16), np.float32)),
                 loaded, params)
