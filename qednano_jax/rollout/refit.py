"""Weight refit over HTTP: export HF safetensors atomically, then `/update_weights_from_disk` (docs/design.md principle 3).

This is the only refit path open to a JAX/TPU trainer: SGLang's other weight-update routes (from tensors, or over an
NCCL group) need GPUs shared with the trainer. The export goes to `refit_dir/.tmp-<version>-<pid>` and is renamed to
`refit_dir/weights-<version>` when complete, so a server never reads a half-written checkpoint; only the newest
`keep_last` exports are kept.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import requests

from qednano_jax.config import ModelConfig
from qednano_jax.rollout.base import RolloutError

log = logging.getLogger(__name__)

PREFIX = "weights-"


def version_dir(refit_dir: str | os.PathLike, version: str) -> Path:
    """Directory of one exported version (unsafe characters in the version become `_`)."""
    return Path(refit_dir) / (PREFIX + re.sub(r"[^A-Za-z0-9._-]", "_", str(version)))


def export_version(cfg: ModelConfig, params: Any, refit_dir: str | os.PathLike, version: str,
                   keep_last: int = 2, dtype: str | None = None) -> tuple[Path, float]:
    """Write `params` as an HF checkpoint to refit_dir/weights-<version> atomically, in `dtype` (None: the params'
    own); keep the newest `keep_last` exports. Returns (directory, seconds). Multi-host: every process calls it
    (each host writes its own layers into the shared refit_dir, see save_hf); process 0 renames."""
    from qednano_jax.model.hf import save_hf

    import jax
    from qednano_jax.train.driver import multihost_barrier

    t0 = time.perf_counter()
    final = version_dir(refit_dir, version)
    tmp = final.parent / f".tmp-{final.name}"  # multi-host: every process writes its layers here (save_hf)
    if jax.process_index() != 0:
        multihost_barrier("qednano_refit_clean")
        save_hf(cfg, params, tmp, dtype=dtype)
        return final, time.perf_counter() - t0
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    multihost_barrier("qednano_refit_clean")
    save_hf(cfg, params, tmp, dtype=dtype)
    if final.exists():  # re-export of the same version: move the old one aside first, then drop it
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    os.utime(final)  # mtime = export time, which orders the kept directories
    prune(refit_dir, keep_last)
    return final, time.perf_counter() - t0


def prune(refit_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` weights-* directories; returns what was deleted."""
    dirs = sorted((d for d in Path(refit_dir).glob(PREFIX + "*") if d.is_dir()), key=lambda d: d.stat().st_mtime_ns)
    gone = dirs[:max(len(dirs) - keep_last, 0)]
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone


def update_from_disk(session: requests.Session, url: str, path: str | os.PathLike, version: str,
                     timeout: float) -> float:
    """POST /update_weights_from_disk on one server and check that /get_model_info reports `version`.
    Returns seconds; raises RolloutError naming the URL on any failure."""
    t0 = time.perf_counter()
    body = {"model_path": str(Path(path).resolve()), "weight_version": str(version), "flush_cache": True,
            "abort_all_requests": False}
    try:
        r = session.post(f"{url}/update_weights_from_disk", json=body, timeout=timeout)
    except requests.RequestException as e:
        raise RolloutError(f"{url}/update_weights_from_disk: {e}") from e
    reply = _json(r)
    if r.status_code != 200 or not reply.get("success", False):
        raise RolloutError(f"{url}/update_weights_from_disk ({path}): HTTP {r.status_code}: "
                           f"{reply.get('message', r.text[:500])}")
    try:
        info = _json(session.get(f"{url}/get_model_info", timeout=timeout))
    except requests.RequestException as e:
        raise RolloutError(f"{url}/get_model_info after refit: {e}") from e
    if str(info.get("weight_version")) != str(version):
        raise RolloutError(f"{url}: refit to {version!r} reported success but /get_model_info says weight_version "
                           f"{info.get('weight_version')!r}")
    return time.perf_counter() - t0


def _json(r: requests.Response) -> dict:
    try:
        out = r.json()
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}
