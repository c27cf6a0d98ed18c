"""Weight refit over HTTP: export HF safetensors atomically, then `/update_weights_from_disk` (docs/design.md principle 3).

This is the only refit path open to a JAX/TPU trainer: SGLang's other weight-update routes (from tensors, or over an
NCCL group) need GPUs shared with the trainer. The export goes to `refit_dir/.tmp-weights-<version>` and is renamed to
`refit_dir/weights-<version>` when complete, so a server never reads a half-written checkpoint; only the newest
`keep_last` exports are kept. The oldest export that would be pruned becomes the next export's temp dir, whose
files the writer overwrites in place (model/hf.py `_ShardWriter`); other old ones are renamed out of the way at once
and deleted on a background thread: on a disk mounted with `discard` (TRIM on every delete), unlinking a 100 MB
export took 75-100 ms, mostly waiting on the disk, which the refit need not wait for (`wait_pruned` does).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import requests

from qednano_jax.config import ModelConfig
from qednano_jax.rollout.base import RolloutError

log = logging.getLogger(__name__)

PREFIX = "weights-"
TRASH = ".deleting-"  # a renamed export being deleted (one left by a process that died is deleted at the next prune)
_deleting: list[threading.Thread] = []


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
    _recycle(final.parent, keep_last, tmp)
    multihost_barrier("qednano_refit_clean")
    save_hf(cfg, params, tmp, dtype=dtype)
    if final.exists():  # re-export of the same version: move the old one aside first, then drop it
        old = final.parent / f"{TRASH}{final.name}-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(final, old)
        os.rename(tmp, final)
        _delete_later([old])
    else:
        os.rename(tmp, final)
    os.utime(final)  # mtime = export time, which orders the kept directories
    prune(refit_dir, keep_last)
    return final, time.perf_counter() - t0


def prune(refit_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` weights-* directories; returns what was deleted. Each is renamed at once
    (it is no longer a weights-* directory) and removed on a background thread, with any TRASH left by an earlier
    process; `wait_pruned` waits for that."""
    root = Path(refit_dir)
    dirs = _exports(root)
    gone = dirs[:max(len(dirs) - keep_last, 0)]
    trash = list(root.glob(TRASH + "*"))
    for d in gone:
        trash.append(root / f"{TRASH}{d.name}-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(d, trash[-1])
    _delete_later(trash)
    return gone


def _exports(root: Path) -> list[Path]:
    """The weights-* directories in `root`, oldest export first."""
    return sorted((d for d in root.glob(PREFIX + "*") if d.is_dir()), key=lambda d: d.stat().st_mtime_ns)


def _recycle(root: Path, keep_last: int, tmp: Path) -> None:
    """Rename to `tmp` the oldest export that the prune after the next one would delete, so that save_hf overwrites
    its files in place (same names and sizes), on blocks and page cache already held, instead of writing new files
    while an old one is deleted. Never the newest export: that is the one the servers serve until this refit."""
    dirs = _exports(root)
    if len(dirs) >= 2 and len(dirs) + 1 > keep_last:
        os.rename(dirs[0], tmp)


def _delete_later(dirs: list[Path]) -> None:
    if not dirs:
        return
    t = threading.Thread(target=lambda: [shutil.rmtree(d, ignore_errors=True) for d in dirs],
                         name="qednano-prune")  # not a daemon: the interpreter waits for it at exit
    t.start()
    _deleting[:] = [d for d in _deleting if d.is_alive()] + [t]  # a long run keeps only the ones still deleting


def wait_pruned() -> None:
    """Wait until the exports that `prune` (or a re-export) set aside are deleted."""
    while _deleting:
        _deleting.pop().join()


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
