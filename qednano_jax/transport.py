"""The one HTTP transport of every JSON endpoint the project calls: the rubric grader, the eval judges, the
distillation teacher, the marking-scheme writer (`Endpoint`) and the SGLang rollout client (`post_json`, `wait`).

Failure classes, the same everywhere:
- retried: transport errors (refused, dropped, timed out), HTTP 408, 429 and 5xx, and a reply body that is not the
  JSON the caller's `parse` expects (ValueError, KeyError, IndexError, TypeError, AttributeError);
- not retried: any other HTTP status (a bad request stays bad);
- anything else (a bug in the code that builds the request or in `parse`) is not a transport failure: it raises.
The API key is read from the environment variable the config names, sent only in the Authorization header and
scrubbed from every error message. Log lines name the endpoint's role ("grader", "teacher", ...) and its URL.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Sequence

import requests

log = logging.getLogger("qednano_jax.transport")

MALFORMED = (ValueError, KeyError, IndexError, TypeError, AttributeError)


class Retryable(Exception):
    """A failed request worth repeating."""


class Fatal(Exception):
    """A failed request that repeating cannot fix."""


def post_json(session: requests.Session, url: str, body: dict, timeout: float, parse: Callable[[Any], Any],
              headers: dict | None = None) -> Any:
    """POST `body` to `url` and return parse(reply JSON); Retryable / Fatal as the module doc classifies."""
    try:
        resp = session.post(url, json=body, headers=headers or {}, timeout=timeout)
    except requests.RequestException as e:
        raise Retryable(f"{type(e).__name__}: {e}") from None
    if resp.status_code != 200:
        msg = f"HTTP {resp.status_code}: {resp.text[:300]}"
        if resp.status_code in (408, 429) or resp.status_code >= 500:
            raise Retryable(msg)
        raise Fatal(msg)
    try:
        data = resp.json()
    except ValueError as e:
        raise Retryable(f"malformed reply (not JSON): {e}: {resp.text[:300]}") from None
    try:
        return parse(data)
    except MALFORMED as e:
        raise Retryable(f"malformed reply: {type(e).__name__}: {e}: {resp.text[:300]}") from None


def wait(backoff: Sequence[float], attempt: int) -> float:
    """Seconds to wait before retry `attempt` (1-based): backoff[attempt - 1], the last value repeating."""
    return float(backoff[min(attempt - 1, len(backoff) - 1)]) if backoff else 0.0


class Endpoint:
    """One JSON endpoint with a timeout, bounded retries with backoff and an optional API key (thread-safe: one
    requests.Session per thread)."""

    def __init__(self, url: str, *, role: str, timeout: float, retries: int, backoff: Sequence[float],
                 api_key_env: str = ""):
        self.url, self.role, self.timeout, self.retries, self.backoff = url, role, timeout, retries, tuple(backoff)
        self.api_key_env = api_key_env
        self._local = threading.local()

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
        return s

    def request(self, body: dict, parse: Callable[[Any], Any] | None = None) -> tuple[Any | None, str, int]:
        """(parse(reply JSON), "", attempts), or (None, error naming the URL, attempts) when every attempt failed."""
        parse = parse or (lambda data: data)
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        scrub = (lambda s: s.replace(key, "***")) if key else (lambda s: s)
        error = ""
        for attempt in range(1, self.retries + 2):
            try:
                return post_json(self._session(), self.url, body, self.timeout, parse, headers), "", attempt
            except Retryable as e:
                error = scrub(f"{self.url}: {e}")
            except Fatal as e:
                error = scrub(f"{self.url}: {e} (not retried)")
                log.warning("%s request failed: %s", self.role, error)
                return None, error, attempt
            if attempt <= self.retries:
                pause = wait(self.backoff, attempt)
                log.warning("%s request failed (attempt %d of %d), retrying in %.3g s: %s", self.role, attempt,
                            self.retries + 1, pause, error)
                time.sleep(pause)
        log.warning("%s call failed after %d attempts: %s", self.role, self.retries + 1, error)
        return None, error, self.retries + 1
