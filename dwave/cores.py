"""How many cores a process may use, and its share when ranks share a node."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask (a rank bound to one core gets 1)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cores_per_rank(ranks_on_node: int) -> int:
    """A rank's share of its node's cores. A rank already bound to a subset (srun, mpirun
    --bind-to) keeps that subset; a rank that sees the whole node shares it with the others
    (horovodrun, mpirun --bind-to none)."""
    mine, node = usable_cores(), os.cpu_count() or 1
    if mine < node:
        return mine
    return max(1, mine // max(1, ranks_on_node))


def bf16_products_native() -> bool | None:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16); None where
    it cannot be told (no /proc/cpuinfo). Without it TensorFlow emulates bfloat16 products,
    slower than float32."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return None
