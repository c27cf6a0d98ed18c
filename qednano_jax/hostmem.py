"""Host memory of the XLA CPU runtime: huge pages for each run's scratch buffer, and the compiler's freed heap
handed back to the OS.

Every execution of a compiled program allocates its scratch ("temp") buffer afresh. Above glibc's mmap threshold
(32 MiB at most) that is a new anonymous mapping, so each train step first-touches it one 4 KiB page at a time:
the SFT step of configs/model/small.yaml (batch 2 x 256, a 592 MiB scratch buffer) took 151,655 minor page faults
and 0.29-0.34 s of system time per step. glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35) asks for
transparent huge pages on such mappings: 400 faults, 0.06-0.07 s, and the step 1.20 -> 1.03-1.06 s (quiet machine,
two runs each). glibc reads its tunables when the process starts, so `python -m qednano_jax.train` re-executes itself
once with the tunable added (`use_huge_pages`). Setting GLIBC_TUNABLES=glibc.malloc.hugetlb=0 keeps 4 KiB pages.
The rollout engine gained nothing measurable from it (32 x 128 tokens: 675 vs 693 tok/s), so only training sets it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

HUGE_PAGES = "glibc.malloc.hugetlb"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of this process's glibc; None off Linux or with another C library."""
    lib, version = platform.libc_ver()
    if sys.platform != "linux" or lib != "glibc":
        return None
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def huge_pages_env(env) -> dict | None:
    """`env` with glibc's huge-page tunable added, or None where it does not apply (not Linux with glibc >= 2.35)
    or GLIBC_TUNABLES already sets it either way."""
    if (glibc_version() or (0, 0)) < (2, 35):
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if HUGE_PAGES in tunables:
        return None
    return {**env, "GLIBC_TUNABLES": ":".join(t for t in (tunables, f"{HUGE_PAGES}=1") if t)}


def use_huge_pages() -> None:
    """Re-execute this process (same interpreter, same arguments) with huge pages for large allocations, unless
    huge_pages_env says it does not apply. For `python -m` entry points, first thing, before any output."""
    env = huge_pages_env(os.environ)
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def release_host_memory() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`; a no-op without it, e.g. on macOS).

    XLA's CPU compiler frees a few hundred MB of small heap blocks; glibc keeps them resident, and a program's
    scratch buffer (one large mapping of its own) cannot reuse them. SFT step of configs/model/small.yaml, batch 2 x
    256: peak RSS over the import baseline 1,471 -> 1,247-1,249 MiB (params + grads + AdamW: 634 MiB).
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
