"""What every benchmark prints before and after it runs: the CPU model, the core count, the load average, and how
much of the machine OTHER processes used while it ran, with a loud warning when the machine was busy. Figures taken
on a busy machine mislead: thread pools of torch, SGLang and XLA suffer differently under load. Run benchmarks on a
quiet machine.

    watch = machine.Watch()      # prints the "before" line
    ...                          # the benchmark
    watch.done()                 # prints the "after" line and the other processes' share; False when busy
"""

from __future__ import annotations

import os
import platform
import time


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _busy_s() -> float | None:
    """Seconds all CPUs spent busy since boot (/proc/stat), or None off Linux."""
    try:
        fields = [float(x) for x in open("/proc/stat").readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Watch:
    """Load before/after and the CPU share of other processes before and during the run (busy CPU time of the whole
    machine minus this process's own, over wall time x cores; before: a short idle sample, since the load average
    lags by minutes). Busy = other processes using more than a quarter of the machine before or during the run
    (without /proc/stat: a 1-minute load above half the cores)."""

    def __init__(self, sample_s: float = 2.0):
        self.cores = os.cpu_count() or 1
        load = os.getloadavg()
        t0, b0 = time.perf_counter(), _busy_s()
        time.sleep(sample_s)  # what the machine does while this process idles (the load average lags by minutes)
        before = None if b0 is None else (_busy_s() - b0) / ((time.perf_counter() - t0) * self.cores)
        self.quiet_before = load[0] <= self.cores / 2 if before is None else before <= 0.25
        share = "unknown" if before is None else f"{before:.0%}"
        print(f"machine (before): {cpu_model()}, {self.cores} cores, load average {load[0]:.2f} {load[1]:.2f} "
              f"{load[2]:.2f}; other processes used {share} of the cores over the last {sample_s:g} s")
        if not self.quiet_before:
            print("WARNING: the machine is busy before the run: these figures are not comparable; re-run on a "
                  "quiet machine")
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_s(), _own_s()

    def done(self) -> bool:
        load = os.getloadavg()
        wall = time.perf_counter() - self.t0
        busy1 = _busy_s()
        other = None
        if busy1 is not None and self.busy0 is not None and wall > 0:
            other = max(0.0, (busy1 - self.busy0) - (_own_s() - self.own0)) / (wall * self.cores)
        share = "unknown" if other is None else f"{other:.0%}"
        print(f"machine (after): load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (this benchmark's own work "
              f"included); other processes used {share} of the {self.cores} cores during the {wall:.0f} s run")
        quiet = self.quiet_before and (other is None or other <= 0.25)
        if not quiet:
            print("WARNING: the machine was busy during the run: these figures are not comparable; re-run on a "
                  "quiet machine")
        return quiet
