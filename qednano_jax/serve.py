"""`python -m qednano_jax.serve --model-path DIR [--port N] [--host 127.0.0.1]`: the native engine behind SGLang's HTTP API.

So that TPU hosts without SGLang can serve rollouts to a trainer elsewhere, and one client (rollout/sglang.py) serves
both. Routes and fields follow SGLang's native HTTP API (0.5.x): `/generate` (input_ids or text, sampling_params, return_logprob;
meta_info with output_token_logprobs, completion_tokens, finish_reason {type}, weight_version),
`/update_weights_from_disk` (loads an HF dir with model/hf.py load_hf), `/health`, `/health_generate`,
`/get_model_info`, `/flush_cache`; and the OpenAI-compatible `/v1/chat/completions` (the model dir's chat template,
`chat_template_kwargs.enable_thinking`, the reply split into `reasoning_content` and `content` at `</think>` as
SGLang's qwen3 reasoning parser splits it), so that one local process can be the data-generation teacher, scheme
writer, policy and grader of the tiny demos. Requests that arrive together are batched into one engine call (different
sampling parameters can share a batch). Sampling features the engine lacks (penalties, min_p, stop strings,
ignore_eos) are rejected with HTTP 400 naming the field, never silently ignored.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import queue
import threading
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from qednano_jax.rollout.base import Completion, SamplingParams

log = logging.getLogger("qednano_jax.serve")

# sglang sampling fields we accept only at their neutral value (anything else is a 400)
_NEUTRAL = {"min_p": 0.0, "min_new_tokens": 0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
            "repetition_penalty": 1.0, "ignore_eos": False, "no_stop_trim": False, "skip_special_tokens": True,
            "stop": None, "n": 1, "json_schema": None, "regex": None, "ebnf": None, "custom_params": None,
            "spaces_between_special_tokens": True, "stop_regex": None, "logit_bias": None}
_SGLANG_DEFAULT_MAX_NEW = 128


class BadRequest(ValueError):
    pass


def parse_sampling(d: dict | None) -> SamplingParams:
    """SGLang `sampling_params` dict -> SamplingParams (SGLang's own defaults for absent fields)."""
    d = dict(d or {})
    for k, neutral in _NEUTRAL.items():
        v = d.pop(k, neutral)
        if v != neutral and not (k == "stop" and v in ([], "", None)):
            raise BadRequest(f"sampling_params.{k}={v!r} is not supported by qednano_jax.serve (only {neutral!r})")
    seed = d.pop("sampling_seed", None)
    try:
        sp = SamplingParams(max_new_tokens=int(d.pop("max_new_tokens", _SGLANG_DEFAULT_MAX_NEW)),
                            temperature=float(d.pop("temperature", 1.0)), top_p=float(d.pop("top_p", 1.0)),
                            top_k=int(d.pop("top_k", -1)), stop_token_ids=tuple(d.pop("stop_token_ids", None) or ()),
                            seed=None if seed is None else int(seed))
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None
    if d:
        raise BadRequest(f"sampling_params.{sorted(d)[0]}: unknown or unsupported field")
    return sp


def reply_of(c: Completion, prompt_len: int, return_logprob: bool, latency: float) -> dict:
    """SGLang-shaped non-streaming reply of one completion."""
    finish = ({"type": "stop", "matched": c.token_ids[-1]} if c.finish_reason == "stop"
              else {"type": c.finish_reason, "length": len(c.token_ids)})
    meta = {"id": uuid.uuid4().hex, "finish_reason": finish, "prompt_tokens": prompt_len,
            "completion_tokens": len(c.token_ids), "cached_tokens": 0, "weight_version": c.weight_version,
            "e2e_latency": latency}
    if return_logprob:
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(c.logprobs, c.token_ids)]
    return {"text": c.text, "output_ids": list(c.token_ids), "meta_info": meta}


class Batcher:
    """Collects concurrent requests' rows and runs them as one engine call (one worker thread): after the first
    request it waits for more until none arrives for `wait_s`, at most `max_wait_s`."""

    def __init__(self, engine, wait_s: float = 0.01, max_wait_s: float = 0.1):
        self.engine, self.wait_s, self.max_wait_s = engine, wait_s, max_wait_s
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True, name="serve-batcher").start()

    def submit(self, rows) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((rows, fut))
        return fut

    def _loop(self):
        while True:
            items = [self._q.get()]
            deadline = time.monotonic() + self.max_wait_s
            while time.monotonic() < deadline:  # keep gathering while requests keep arriving
                try:
                    items.append(self._q.get(timeout=self.wait_s))
                except queue.Empty:
                    break
            rows = [r for rs, _ in items for r in rs]
            try:
                out = self.engine.generate_rows(rows)
            except Exception as e:  # every waiting request learns about it
                for _, fut in items:
                    fut.set_exception(e)
                continue
            i = 0
            for rs, fut in items:
                fut.set_result(out[i:i + len(rs)])
                i += len(rs)


class Server:
    """The state behind the routes: the engine, its batcher, the model path."""

    def __init__(self, model_path: str, *, max_batch: int = 64, version: str = "default", mesh=None, rules=None):
        from qednano_jax.data.tokenizer import load_tokenizer
        from qednano_jax.model.hf import load_hf
        from qednano_jax.rollout.native import NativeRollout

        self.model_path = str(model_path)
        self.mesh, self.rules = mesh, rules
        cfg, params = load_hf(model_path, mesh=mesh, rules=rules)
        tok = load_tokenizer(model_path) if (Path(model_path) / "tokenizer_config.json").is_file() else None
        self.tokenizer = tok
        self.engine = NativeRollout(cfg, params, tok, max_batch=max_batch, mesh=mesh, rules=rules, version=version)
        self.batcher = Batcher(self.engine)
        self._refit_lock = threading.Lock()

    def generate(self, body: dict) -> Any:
        ids = body.get("input_ids")
        if ids is None and body.get("text") is not None:
            if self.tokenizer is None:
                raise BadRequest("text: this model dir has no tokenizer; send input_ids")
            texts = body["text"]
            ids = ([self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
                   if isinstance(texts, list) else self.tokenizer(texts, add_special_tokens=False)["input_ids"])
        if not ids:
            raise BadRequest("input_ids: required (a list of token ids, or a list of such lists)")
        single = not isinstance(ids[0], list)
        prompts = [ids] if single else ids
        sps = body.get("sampling_params") or {}
        sps = sps if isinstance(sps, list) else [sps] * len(prompts)
        if len(sps) != len(prompts):
            raise BadRequest(f"sampling_params: {len(sps)} entries for {len(prompts)} prompts")
        parsed = [parse_sampling(s) for s in sps]
        for i, p in enumerate(prompts):
            if not p or not all(isinstance(t, int) and 0 <= t < self.engine.cfg.vocab_size for t in p):
                raise BadRequest(f"input_ids[{i}]: empty or outside [0, {self.engine.cfg.vocab_size})")
        fresh = self.engine.seed_for_call()
        rows = [(p, sp, fresh if sp.seed is None else sp.seed, 0 if sp.seed is not None else i)
                for i, (p, sp) in enumerate(zip(prompts, parsed))]
        t0 = time.perf_counter()
        comps = self.batcher.submit(rows).result()
        lat = time.perf_counter() - t0
        out = [reply_of(c, len(p), bool(body.get("return_logprob")), lat) for c, p in zip(comps, prompts)]
        return out[0] if single else out

    def chat(self, body: dict) -> dict:
        """One OpenAI chat completion (n = 1) of `body["messages"]`; see the module doc."""
        from qednano_jax.data.tokenizer import THINK_CLOSE, THINK_OPEN

        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest("messages: this model dir has no tokenizer with a chat template")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise BadRequest("messages: required, a list of {role, content} objects")
        for k, neutral in (("n", 1), ("stop", None), ("stream", False), ("tools", None), ("logit_bias", None)):
            if body.get(k, neutral) not in (neutral, [] if k == "stop" else neutral):
                raise BadRequest(f"{k}: {body[k]!r} is not supported by this server")
        thinking = bool((body.get("chat_template_kwargs") or {}).get("enable_thinking", True))
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=thinking)
        if thinking and not text.rstrip("\n").endswith(THINK_OPEN):
            text += THINK_OPEN + "\n"  # a hybrid template leaves <think> to the model: the policy's format
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        sampling = {"max_new_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or
                    _SGLANG_DEFAULT_MAX_NEW, "temperature": body.get("temperature", 1.0),
                    "top_p": body.get("top_p", 1.0), "top_k": body.get("top_k", -1)}
        if body.get("seed") is not None:
            sampling["sampling_seed"] = body["seed"]
        sp = parse_sampling(sampling)
        room = self.engine.cfg.max_position_embeddings - len(ids)
        if room < 1:
            raise BadRequest(f"messages: {len(ids)} prompt tokens leave no room in the model's "
                             f"{self.engine.cfg.max_position_embeddings}-token context")
        if sp.max_new_tokens > room:
            sp = dataclasses.replace(sp, max_new_tokens=room)
        fresh = self.engine.seed_for_call()
        (c,) = self.batcher.submit([(ids, sp, fresh if sp.seed is None else sp.seed, 0)]).result()
        out = self.tokenizer.decode(c.token_ids, skip_special_tokens=False)
        for tok in ("<|im_end|>", "<|endoftext|>"):
            out = out.replace(tok, "")
        if THINK_CLOSE in out:
            reasoning, content = out.split(THINK_CLOSE, 1)
        elif thinking:
            reasoning, content = out, ""  # the thinking never closed: all of it is reasoning
        else:
            reasoning, content = "", out
        reasoning = reasoning.replace(THINK_OPEN, "").strip("\n")
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model") or self.model_path,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content.strip(),
                                                     "reasoning_content": reasoning if thinking else None},
                             "finish_reason": "stop" if c.finish_reason == "stop" else "length"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(c.token_ids),
                          "total_tokens": len(ids) + len(c.token_ids)}}

    def update_weights(self, body: dict) -> tuple[int, dict]:
        from qednano_jax.model.hf import load_hf

        path = body.get("model_path")
        if not path:
            return 400, {"success": False, "message": "model_path: required"}
        with self._refit_lock:
            try:
                cfg, params = load_hf(path, dtype=self.engine.cfg.param_dtype, mesh=self.mesh, rules=self.rules)
            except Exception as e:
                return 400, {"success": False, "message": f"{path}: {type(e).__name__}: {e}"}
            mine = self.engine.cfg
            if (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                    cfg.intermediate_size, cfg.tie_word_embeddings) != (
                    mine.vocab_size, mine.hidden_size, mine.num_layers, mine.num_heads, mine.num_kv_heads,
                    mine.head_dim, mine.intermediate_size, mine.tie_word_embeddings):
                return 400, {"success": False, "message": f"{path}: architecture differs from the served model"}
            version = body.get("weight_version") or self.engine.weight_version
            self.engine.refit(params, str(version))
            self.model_path = str(path)
        return 200, {"success": True, "message": f"loaded {path} as weight_version {version}",
                     "num_paused_requests": 0}

    def model_info(self) -> dict:
        return {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": self.engine.weight_version}


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # a trainer opens many connections at once; the default backlog of 5 resets them


def make_handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, code: int, obj: Any):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            if not n:
                return {}
            try:
                obj = json.loads(self.rfile.read(n))
            except json.JSONDecodeError as e:
                raise BadRequest(f"body is not JSON: {e}") from None
            if not isinstance(obj, dict):
                raise BadRequest("body must be a JSON object")
            return obj

        def _route(self, method: str):
            path = self.path.split("?")[0]
            try:
                if path in ("/health", "/flush_cache"):
                    self._body()
                    return self._send(200, {})
                if path == "/health_generate":
                    probe = [([0], SamplingParams(max_new_tokens=1, temperature=0), 0, 0)]
                    server.batcher.submit(probe).result(timeout=60)
                    return self._send(200, {})
                if path == "/get_model_info":
                    return self._send(200, server.model_info())
                if path == "/get_weight_version":
                    return self._send(200, {"weight_version": server.engine.weight_version})
                if path == "/generate" and method in ("POST", "PUT"):
                    return self._send(200, server.generate(self._body()))
                if path == "/v1/chat/completions" and method == "POST":
                    return self._send(200, server.chat(self._body()))
                if path == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": server.model_path,
                                                                        "object": "model"}]})
                if path == "/update_weights_from_disk" and method == "POST":
                    return self._send(*server.update_weights(self._body()))
                return self._send(404, {"error": f"no route {method} {path}"})
            except BadRequest as e:
                return self._send(400, {"error": {"message": str(e)}})
            except Exception as e:  # noqa: BLE001 - the client sees a 500 naming the error
                log.exception("%s %s failed", method, path)
                return self._send(500, {"error": {"message": f"{type(e).__name__}: {e}"}})

        def do_GET(self):
            self._route("GET")

        def do_POST(self):
            self._route("POST")

        def do_PUT(self):
            self._route("PUT")

    return Handler


def main(argv: list[str] | None = None) -> int:
    from qednano_jax import cli
    return cli.run(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    from qednano_jax import cli
    ap = cli.ArgumentParser(prog="python -m qednano_jax.serve", description=__doc__.split("\n\n")[1])
    ap.add_argument("--model-path", required=True, help="HF Qwen3 checkpoint dir (config.json + safetensors)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--max-batch", type=int, default=64, help="rows decoded together")
    ap.add_argument("--weight-version", default="default", help="version reported before the first refit")
    ap.add_argument("--mesh", default="", choices=("", "dp", "fsdp", "tp", "fsdp_tp"),
                    help="shard the model over local devices with this rule set (default: one device)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mesh = rules = None
    if args.mesh:
        from qednano_jax.sharding import MESH_SHAPES, RULE_SETS, make_mesh
        mesh, rules = make_mesh(MESH_SHAPES[args.mesh]), RULE_SETS[args.mesh]
    server = Server(args.model_path, max_batch=args.max_batch, version=args.weight_version, mesh=mesh, rules=rules)
    httpd = _HTTPServer((args.host, args.port), make_handler(server))
    log.info("serving %s on http://%s:%d", args.model_path, args.host, args.port)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
