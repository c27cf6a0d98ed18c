"""HTTP client of SGLang's native `/generate` API (real SGLang servers, or `python -m qednano_jax.serve`).

Follows SGLang's native HTTP API (0.5.x): `input_ids` in, every sampling parameter sent explicitly (the server would otherwise
take its defaults from the model's generation_config.json), `return_logprob`; token ids and behaviour logprobs come
from `meta_info.output_token_logprobs` and are checked against `completion_tokens`. One request per completion
(n > 1 repeats the prompt; SGLang's radix cache shares the prefix), many in flight under a concurrency limit, each
sent to the server with the fewest requests in flight. Before use, and whenever a request fails, the client waits
for `/health_generate`; a request is retried with backoff a bounded number of times, and a call either returns
every completion or raises RolloutError naming the server(s).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Any

import requests

from qednano_jax import transport
from qednano_jax.config import ModelConfig, RolloutConfig
from qednano_jax.rollout import refit as refit_lib
from qednano_jax.rollout.base import Completion, RefitResult, RolloutError, SamplingParams, check_prompts

log = logging.getLogger(__name__)

_PROBE_TIMEOUT = 10.0  # seconds for one /health_generate probe


def sampling_payload(sp: SamplingParams, row: int = 0) -> dict:
    """SGLang `sampling_params` with every field we rely on set explicitly. A seeded call gives each row its own
    seed (n > 1 repeats the prompt, and equal seeds would give equal samples)."""
    out = {
        "max_new_tokens": sp.max_new_tokens, "temperature": float(sp.temperature), "top_p": float(sp.top_p),
        "top_k": int(sp.top_k), "min_p": 0.0, "min_new_tokens": 0, "stop": [],
        "stop_token_ids": list(sp.stop_token_ids), "ignore_eos": False, "skip_special_tokens": True,
        "no_stop_trim": False, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
    }
    if sp.seed is not None:
        out["sampling_seed"] = (int(sp.seed) * 1_000_003 + row) % (2**63 - 1)
    return out


def parse_generate_reply(reply: dict, url: str, default_version: str) -> Completion:
    """One `/generate` reply -> Completion; a malformed or inconsistent reply raises RolloutError naming the URL."""
    try:
        meta = reply["meta_info"]
        pairs = meta["output_token_logprobs"]
        ids = [int(p[1]) for p in pairs]
        lps = [float(p[0]) for p in pairs]
        n = int(meta["completion_tokens"])
        finish = meta.get("finish_reason") or {}
        reason = finish.get("type") if isinstance(finish, dict) else str(finish)
        prompt_tokens = int(meta["prompt_tokens"])
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise RolloutError(f"{url}/generate: malformed reply ({type(e).__name__}: {e}): {str(reply)[:300]}") from e
    if len(ids) != n:
        raise RolloutError(f"{url}/generate: {len(ids)} output_token_logprobs but completion_tokens = {n}")
    if "output_ids" in reply and list(reply["output_ids"]) != ids:
        raise RolloutError(f"{url}/generate: output_ids disagree with output_token_logprobs")
    if reason not in ("stop", "length", "abort"):
        raise RolloutError(f"{url}/generate: unknown finish_reason {finish!r}")
    version = meta.get("weight_version")
    return Completion(token_ids=ids, logprobs=lps, finish_reason=reason, text=reply.get("text", ""),
                      weight_version=str(version if version is not None else default_version),
                      prompt_tokens=prompt_tokens)


class SGLangRollout:
    """`Rollout` backend over HTTP (see module doc). `model_cfg` is needed only for `refit` (the export)."""

    def __init__(self, cfg: RolloutConfig, model_cfg: ModelConfig | None = None):
        if not cfg.urls:
            raise ValueError("rollout.urls: at least one server URL is needed for backend sglang")
        self.cfg, self.model_cfg = cfg, model_cfg
        self.urls = [u.rstrip("/") for u in cfg.urls]
        self._inflight = {u: 0 for u in self.urls}
        self._down: dict[str, str] = {}  # url -> last error, for servers that failed since their last health check
        self._lock = threading.Lock()
        self._health_lock = threading.Lock()
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="sglang-rollout")
        self._version: str | None = None
        self._gated = False
        self._failed: tuple[float, str] | None = None  # (when, error) of the last health wait that gave up

    # -- Rollout protocol
    @property
    def weight_version(self) -> str:
        if self._version is None:
            self.wait_healthy()
        return self._version or ""

    def health(self) -> bool:
        return any(self._probe(u) is None for u in self.urls)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int = 1) -> list[list[Completion]]:
        check_prompts(prompts, n, self.model_cfg.vocab_size if self.model_cfg else None)
        if not self._gated:
            self.wait_healthy()
        jobs = [(i, j, [int(t) for t in p]) for i, p in enumerate(prompts) for j in range(n)]
        futures = [self._pool.submit(self._one, p, sampling, i * n + j) for i, j, p in jobs]
        out: list[list[Completion]] = [[None] * n for _ in prompts]  # type: ignore[list-item]
        try:
            for (i, j, _), f in zip(jobs, futures):
                out[i][j] = f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        return out

    def refit(self, params: Any, version: str) -> RefitResult:
        """Export `params` to refit_dir/weights-<version>, load it on every server, verify the version."""
        if self.model_cfg is None:
            raise ValueError("SGLangRollout.refit needs model_cfg (pass it to the constructor / make_rollout)")
        dtype = None if self.cfg.export_dtype == "params" else self.cfg.export_dtype
        path, export_s = refit_lib.export_version(self.model_cfg, params, self.cfg.refit_dir, version,
                                                  self.cfg.keep_last, dtype=dtype)
        t0 = time.perf_counter()
        if not self._gated:  # first use: wait for the servers as generate does
            self.wait_healthy()
        # No /health_generate probe per refit: SGLang answers it after a 1-token forward and a 1 s poll, so it cost
        # 1-2 s a refit. A server that fails the update is waited for like a failed request, then updated once more.
        errors = self._update_all(self.urls, path, version)
        if errors:
            self.wait_healthy()
            errors = self._update_all(list(errors), path, version)
        if errors:
            raise RolloutError("refit failed on " + "; ".join(errors.values()))
        self._version = str(version)
        update_s = time.perf_counter() - t0
        log.info("refit %s: export %.2fs, update %.2fs (%s)", version, export_s, update_s, path)
        return RefitResult(weight_version=str(version), export_s=export_s, update_s=update_s, path=str(path))

    def _update_all(self, urls: list[str], path, version: str) -> dict[str, str]:
        """update_from_disk on `urls` at once; returns {url: error} of those that failed."""
        errors = {}
        with concurrent.futures.ThreadPoolExecutor(len(urls)) as ex:
            futs = {u: ex.submit(refit_lib.update_from_disk, self._session(), u, path, version,
                                 self.cfg.request_timeout) for u in urls}
            for u, f in futs.items():
                try:
                    f.result()
                except RolloutError as e:
                    errors[u] = str(e)
        return errors

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- health
    def wait_healthy(self, timeout: float | None = None) -> list[str]:
        """Block until at least one server answers /health_generate (returns the healthy URLs), or raise
        RolloutError naming every URL and its last error after `timeout` (default rollout.health_timeout)."""
        timeout = self.cfg.health_timeout if timeout is None else timeout
        start = time.monotonic()
        deadline = start + timeout
        with self._health_lock:
            if self._failed is not None and self._failed[0] >= start:  # another thread just gave up: so do we
                raise RolloutError(self._failed[1])
            while True:
                errors = {u: self._probe(u, min(_PROBE_TIMEOUT, max(deadline - time.monotonic(), 0.1)))
                          for u in self.urls}
                healthy = [u for u, e in errors.items() if e is None]
                with self._lock:
                    self._down = {u: e for u, e in errors.items() if e is not None}
                if healthy:
                    if self._version is None:
                        self._version = self._server_version(healthy[0])
                    self._gated = True
                    return healthy
                if time.monotonic() >= deadline:
                    msg = (f"no rollout server became healthy within {timeout:.0f}s (rollout.health_timeout): "
                           + "; ".join(f"{u}/health_generate: {e}" for u, e in errors.items()))
                    self._failed = (time.monotonic(), msg)
                    raise RolloutError(msg)
                time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))

    def _probe(self, url: str, timeout: float = _PROBE_TIMEOUT) -> str | None:
        """None when `url` answers /health_generate with 200, else the error."""
        try:
            r = self._session().get(f"{url}/health_generate", timeout=timeout)
        except requests.RequestException as e:
            return f"{type(e).__name__}: {e}"
        return None if r.status_code == 200 else f"HTTP {r.status_code}"

    def _server_version(self, url: str) -> str | None:
        try:
            info = self._session().get(f"{url}/get_model_info", timeout=_PROBE_TIMEOUT).json()
            return str(info.get("weight_version")) if info.get("weight_version") is not None else None
        except (requests.RequestException, ValueError):
            return None

    # -- requests
    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def _acquire(self) -> str:
        while True:
            with self._lock:
                live = [u for u in self.urls if u not in self._down]
                if live:
                    url = min(live, key=lambda u: self._inflight[u])
                    self._inflight[url] += 1
                    return url
            self.wait_healthy()

    def _release(self, url: str, error: str | None) -> None:
        with self._lock:
            self._inflight[url] -= 1
            if error is not None:
                self._down[url] = error

    def _one(self, prompt: list[int], sp: SamplingParams, row: int) -> Completion:
        payload = {"input_ids": prompt, "sampling_params": sampling_payload(sp, row), "return_logprob": True,
                   "logprob_start_len": -1, "stream": False}
        attempts = self.cfg.retries + 1
        last = ""
        for attempt in range(attempts):
            url = self._acquire()
            error = None
            try:
                return transport.post_json(self._session(), f"{url}/generate", payload, self.cfg.request_timeout,
                                           lambda reply: parse_generate_reply(reply, url, self._version or ""))
            except transport.Retryable as e:
                error = last = f"{url}/generate: {e}"
            except transport.Fatal as e:
                raise RolloutError(f"{url}/generate: {e}") from None
            finally:
                self._release(url, error)
            if attempt + 1 < attempts:
                backoff = transport.wait(self.cfg.backoff, attempt + 1)
                log.warning("rollout request failed (attempt %d/%d); retrying in %.1fs: %s", attempt + 1, attempts,
                            backoff, last)
                time.sleep(backoff)
        raise RolloutError(f"/generate failed {attempts} times (rollout.retries = {self.cfg.retries}); last error: "
                           f"{last}")
