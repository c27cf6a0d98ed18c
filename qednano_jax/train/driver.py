"""The run driver: what every stage's loop shares around its steps (docs/design.md principle 6). `Run` is the one
object each loop (SFT, RL, RC, and the other processes of a multi-host RL / RC job) runs inside: it holds the run-dir
lock and the resume check of the saved config, the metrics outputs (stdout, metrics.jsonl, TensorBoard, tqdm) with
one cadence rule, preemption (SIGTERM / SIGINT: finish the step, save, exit 0), and closes everything the loop
registers whatever happens. Beside it: the non-finite guard and atomic HF exports. The math stays in train/step.py.

    lock      run_dir/.lock holds {host, pid, heartbeat}: a second job on the same run dir is refused naming the
              holder; a lock whose process is gone (same host) or whose heartbeat is older than LOCK_STALE_S (a
              preempted VM) is stale and taken over. Process 0 holds it for a multi-host job.
    resume    a run dir with a checkpoint keeps the config it was started with: a re-run whose config differs is
              refused, listing the keys, before anything is written; `train.allow_resume_changes: true` lets the
              keys of RESUME_SAFE change (nothing else, ever).
    preempt   a SIGTERM (how a spot / preemptible TPU VM is stopped) or SIGINT sets a flag; the loop finishes its
              step, saves a checkpoint and returns `preempted`, and the CLI exits 0 with how to resume. All hosts
              agree on the flag each step (any host signalled stops them all). A second SIGINT interrupts at once.
    guard     the train step applies an update only when the loss and gradient norm are finite (train/step.py);
              `check_finite` raises `NonFinite` naming the step, before anything is refitted or saved, so the
              newest checkpoint is the last good one.
    export    HF exports go to a temporary sibling directory that is renamed into place once complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from qednano_jax import paths
from qednano_jax.config import Config, ConfigError, RunStopped, to_dict

LOCK_NAME = ".lock"
LOCK_HEARTBEAT_S = 30.0
LOCK_STALE_S = 300.0
# config keys a resumed run may change with train.allow_resume_changes: how long, how often and where to log,
# save and export, and where the services are; nothing that changes the model, data, optimizer or loss
RESUME_SAFE = ("train.steps", "train.log_every", "train.progress", "train.export_hf", "train.peak_flops",
               "train.allow_resume_changes", "checkpoint.every", "checkpoint.keep", "checkpoint.async_save",
               "checkpoint.export_hf_each", "rollout.urls", "rollout.concurrency", "rollout.request_timeout",
               "rollout.retries", "rollout.backoff", "rollout.health_timeout", "grader.base_url",
               "grader.concurrency", "grader.timeout", "grader.retries", "grader.backoff", "rc.summarizer_urls")


class NonFinite(RunStopped):
    """A step's loss or gradient norm was not finite; its update was not applied."""


# ----------------------------------------------------------------------------------------------- lock

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """run_dir/.lock for the lifetime of a run (module doc); `release` removes it."""

    def __init__(self, run_dir, enabled: bool = True):
        self.path = paths.resolve(run_dir) / LOCK_NAME
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}

    def _record(self) -> str:
        return json.dumps({**self.me, "heartbeat": time.time()})

    def holder(self) -> dict | None:
        """The live holder of the lock, or None when it is free or stale."""
        try:
            rec = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError, OSError):
            return None
        if rec.get("host") == self.me["host"]:
            return rec if rec.get("pid") != self.me["pid"] and _alive(int(rec.get("pid", -1))) else None
        return rec if time.time() - float(rec.get("heartbeat", 0)) < LOCK_STALE_S else None

    def acquire(self) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rec = self.holder()
        if rec is not None:
            raise ConfigError(f"train.run_dir: {self.path.parent} is in use by pid {rec.get('pid')} on host "
                              f"{rec.get('host')} (lock {self.path}); stop that job or choose another run_dir")
        if paths.is_url(self.path):
            self.path.write_text(self._record())
        else:  # replace a stale lock atomically, then check that ours is the one that stuck
            tmp = Path(f"{self.path}.{os.getpid()}")
            tmp.write_text(self._record())
            os.replace(tmp, self.path)
            if json.loads(self.path.read_text()).get("pid") != self.me["pid"]:
                raise ConfigError(f"train.run_dir: {self.path.parent} was taken by another job just now")
        self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                self.path.write_text(self._record())
            except OSError:
                pass

    def release(self) -> None:
        if not self.enabled or self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            if json.loads(self.path.read_text()).get("pid") == self.me["pid"]:
                self.path.unlink()
        except (FileNotFoundError, ValueError, OSError):
            pass


# ----------------------------------------------------------------------------------------------- config

def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        # mesh shapes and rules are tables: compare them whole
        out |= {key: v} if key in ("mesh.shape", "mesh.rules") else _flat(v, key)
    return out


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """Dotted keys whose value in `cfg` differs from the saved config dict."""
    a, b = _flat(saved), _flat(to_dict(cfg))
    norm = lambda v: json.dumps(v, sort_keys=True, default=str)
    return sorted(k for k in set(a) | set(b) if norm(a.get(k)) != norm(b.get(k)))


def has_checkpoint(run_dir) -> bool:
    """Whether run_dir/checkpoints holds a finished orbax step (a directory named by its step number)."""
    ckpt = paths.resolve(run_dir) / "checkpoints"
    return ckpt.exists() and any(p.name.isdigit() for p in ckpt.iterdir())


def open_run(cfg: Config, has_checkpoint: bool, *, is_main: bool = True) -> RunLock:
    """Lock the run dir, check a resumed run's config against the saved one, then write config.yaml.
    Raises ConfigError (nothing written but the lock, which is released) on a held lock or a refused change."""
    run_dir = paths.resolve(cfg.train.run_dir)
    lock = RunLock(run_dir, enabled=is_main)
    if not is_main:  # process 0 decides for the job (a refusal there ends every process's collectives)
        return lock
    lock.acquire()
    try:
        saved_path = run_dir / "config.yaml"
        if has_checkpoint and saved_path.exists():
            changed = config_changes(yaml.safe_load(saved_path.read_text()) or {}, cfg)
            unsafe = [k for k in changed if k not in RESUME_SAFE]
            if unsafe:
                raise ConfigError(f"train.run_dir: {run_dir} holds a run started with another config; changed: "
                                  f"{', '.join(unsafe)} (a resumed run keeps its config: use a new run_dir)")
            if changed and not cfg.train.allow_resume_changes:
                raise ConfigError(f"train.run_dir: resuming {run_dir} with changed {', '.join(changed)}; pass "
                                  "train.allow_resume_changes=true to accept these changes")
        saved_path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    except BaseException:
        lock.release()
        raise
    return lock


# ----------------------------------------------------------------------------------------------- the run

class Run:
    """One run of a stage, the same for SFT, RL and RC (and the other processes of a multi-host job):

        with driver.Run(cfg, "rl", log) as run:   # the lock and the resume check (open_run); nothing else written
            ...                                   # restore or initialise; run.closing(x) for what must be closed
            run.begin(start)                      # metrics (jsonl + TensorBoard), tqdm, SIGTERM / SIGINT handlers
            for s in range(start, steps):
                ...                               # the step
                stop = run.stop_requested()       # any host signalled? (a collective: every host, every step)
                if run.log_due(step, stop):
                    run.record(step, metrics, line)
                ...                               # save, force=stop
                run.progress(**postfix)
                if stop:
                    run.stopped(step)             # prints how to resume; run.preempted is True
                    break
            run.close()                           # before the final export
            ...                                   # final export unless run.preempted

    Leaving the block any way closes what is still open (handlers, bar, writer, every `closing` resource, last
    registered first) and releases the lock, so an exception never leaves an async checkpoint save unfinished or a
    stale lock. Only process 0 holds the lock, writes metrics and draws the bar.
    """

    def __init__(self, cfg: Config, desc: str, log: Callable[[str], None] = print):
        import jax
        self.cfg, self.desc, self._print = cfg, desc, log
        self.is_main = jax.process_index() == 0
        self.run_dir = paths.resolve(cfg.train.run_dir)
        self.preempted = False
        self.writer = self.bar = self._preemption = None
        self._open = contextlib.ExitStack()

    def __enter__(self) -> "Run":
        self.lock = open_run(self.cfg, has_checkpoint(self.run_dir), is_main=self.is_main)
        return self

    def __exit__(self, *exc) -> bool:
        try:
            self.close()
        finally:
            self.lock.release()
        return False

    def closing(self, resource: Any) -> Any:
        """Close `resource` (anything with .close) when the run closes; returns it."""
        if hasattr(resource, "close"):
            self._open.callback(resource.close)
        return resource

    def begin(self, start: int) -> None:
        """The steps after `start` follow: open the metrics (dropping lines of later steps), the bar, the handlers."""
        from qednano_jax.train.metrics import MetricsWriter
        self.writer = self.closing(MetricsWriter(self.run_dir, enabled=self.is_main, start_step=start))
        if self.is_main and self.cfg.train.progress:
            from tqdm import tqdm
            self.bar = self.closing(tqdm(total=self.cfg.train.steps, initial=start, desc=self.desc, unit="step",
                                         dynamic_ncols=True))
        self._preemption = self._open.enter_context(Preemption())

    def log(self, line: str) -> None:
        (self.bar.write if self.bar is not None else self._print)(line)

    def stop_requested(self) -> bool:
        return self._preemption.requested()

    def log_due(self, step: int, stopping: bool = False) -> bool:
        """The one cadence of metrics: every train.log_every steps, the last step and the step a run stops at."""
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps or stopping

    def record(self, step: int, metrics: dict, line: str) -> None:
        self.writer.write(step, metrics)
        self.log(line)

    def progress(self, **postfix: str) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(**postfix)
            self.bar.update(1)

    def stopped(self, step: int) -> None:
        self.preempted = True
        self.log(resume_message(step, self._preemption.signal))

    def close(self) -> None:
        self._open.close()
        self.bar = None


# ----------------------------------------------------------------------------------------------- preemption

class Preemption:
    """SIGTERM / SIGINT -> `requested` (module doc). Use as a context manager around the loop."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        return False

    def requested(self) -> bool:
        """Whether any host was signalled (a collective on multi-host runs: call it on every host, every step)."""
        import jax
        flag = self.signal is not None
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils
            flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
        return flag


def resume_message(step: int, signum: int | None) -> str:
    name = signal.Signals(signum).name if signum else "signal"
    return (f"{name}: stopped after step {step} with a checkpoint at step {step}; re-run the same command to "
            "resume")


# ----------------------------------------------------------------------------------------------- guard, export

def check_finite(step: int, metrics: dict, last_checkpoint: Callable[[], int | None]) -> None:
    """Raise NonFinite when the step's update was withheld by the train step's guard (metrics['finite'] == 0).
    `last_checkpoint` (e.g. Checkpointer.latest_step, a directory listing) is asked only then, not every step."""
    if metrics.get("finite", 1.0) >= 0.5:
        return
    last_checkpoint = last_checkpoint()
    raise NonFinite(f"step {step}: non-finite loss ({metrics.get('loss')}) or gradient norm "
                    f"({metrics.get('grad_norm')}); the update was not applied and the run stops here; the newest "
                    f"checkpoint ({'none' if last_checkpoint is None else f'step {last_checkpoint}'}) is the last "
                    "good one")


def multihost_barrier(name: str) -> None:
    """Every process waits here for the others (a no-op on one host)."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def atomic_export(path, write: Callable[[Any], None]) -> None:
    """write(tmp) into a temporary sibling of `path`, then swap it into place: a crash leaves the previous complete
    export (or none), never a partial one. On an object store (gs://) there is no rename: written in place. In a
    multi-host run every process calls this and writes into the same temporary directory (save_hf: each host its
    own layers; the run dir must be storage every host sees); process 0 renames once all have written."""
    import jax
    path = paths.resolve(path)
    if paths.is_url(path):
        write(path)
        return
    tmp = path.with_name(f".{path.name}.tmp-export")  # one name every host agrees on (the run dir is locked)
    if jax.process_index() != 0:
        multihost_barrier("qednano_export_clean")
        write(tmp)
        return
    for stale in [*path.parent.glob(f".{path.name}.tmp-*"), *path.parent.glob(f".{path.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed export
    multihost_barrier("qednano_export_clean")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    try:
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
