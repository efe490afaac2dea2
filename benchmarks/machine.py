"""The machine a benchmark ran on, printed with every figure (machines here differ from session
to session: compare figures only within one run)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe() -> str:
    """e.g. "AMD EPYC, 2 cores (host vm)"."""
    return f"{cpu_model()}, {os.cpu_count()} cores (host {platform.node()})"
