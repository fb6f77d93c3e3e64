"""Benchmark scripts: each prints timings of ours against a baseline measured in the same run,
naming the hardware. Run from the repository root: python -m bench.ops | bench.model | bench.gpu."""
import os
import platform


def cpu_name():
    """The CPU's model name (/proc/cpuinfo), or what platform knows of it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average():
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())
