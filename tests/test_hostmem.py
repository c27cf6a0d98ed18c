"""Host memory: the huge-page tunable the train entry point re-executes with, and malloc_trim of freed heap."""
import ctypes
import os
import subprocess
import sys

import pytest

from qednano_jax import hostmem

GLIBC = (hostmem.glibc_version() or (0, 0)) >= (2, 35)


@pytest.mark.skipif(not GLIBC, reason="needs Linux with glibc >= 2.35")
def test_huge_pages_env_adds_the_tunable_once_and_keeps_the_users():
    assert hostmem.huge_pages_env({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert hostmem.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hostmem.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's opt-out


@pytest.mark.skipif(not GLIBC, reason="needs Linux with glibc >= 2.35")
def test_use_huge_pages_reexecutes_with_the_same_arguments():
    """A process calling use_huge_pages runs again, once, with its own arguments and the tunable in its env."""
    code = ("import os, sys; from qednano_jax import hostmem; print('start', flush=True); hostmem.use_huge_pages(); "
            "print(sys.argv[1:], os.environ['GLIBC_TUNABLES'])")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", code, "a", "b=1"], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["start", "start", "['a', 'b=1'] glibc.malloc.hugetlb=1"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(hostmem.glibc_version() is None, reason="needs Linux with glibc")
def test_release_host_memory_returns_freed_heap_blocks():
    """Freed small heap blocks below a live one stay resident until release_host_memory hands them back."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, n = 64 << 10, 3200  # 200 MiB in blocks below glibc's mmap threshold: they come from the heap
    blocks = [libc.malloc(size) for _ in range(n)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    for b in blocks[:-1]:  # the last block stays: the freed ones sit below it, where free() cannot trim
        libc.free(b)
    before = _rss_bytes()
    hostmem.release_host_memory()
    after = _rss_bytes()
    libc.free(blocks[-1])
    assert before - after > 100 << 20, (before, after)
