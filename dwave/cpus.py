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
