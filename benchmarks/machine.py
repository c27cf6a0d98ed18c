"""What every benchmark prints before and after it runs: the CPU model, the core count and the load average, with a
loud warning when the machine was busy (load above half the cores). Figures taken on a busy machine mislead:
thread pools of torch, SGLang and XLA suffer differently under load. Run benchmarks on a quiet machine."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(when: str) -> bool:
    """Print the machine line; returns True when it was quiet (1-minute load <= half the cores)."""
    load = os.getloadavg()
    cores = os.cpu_count() or 1
    quiet = load[0] <= cores / 2
    print(f"machine ({when}): {cpu_model()}, {cores} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if not quiet:
        print(f"WARNING: the machine is busy (load {load[0]:.2f} > {cores / 2:g}): these figures are not comparable; "
              "re-run on a quiet machine")
    return quiet
