"""A rank's share of the cores: bound ranks keep their set, unbound ranks split the node."""

from __future__ import annotations

import os

import pytest

from dwave import cores


@pytest.mark.parametrize("visible, node, ranks, expected", [
    (16, 16, 4, 4),  # horovodrun / --bind-to none: all see the node, each takes a quarter
    (16, 16, 32, 1),  # more ranks than cores: one each, never zero
    (4, 16, 4, 4),  # srun / mpirun --bind-to: already given 4 cores, keeps them
    (1, 2, 2, 1),  # bound to one core
    (2, 2, 1, 2),  # one process on a laptop
])
def test_cores_per_rank(monkeypatch, visible, node, ranks, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(visible)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: node)
    assert cores.usable_cores() == visible
    assert cores.cores_per_rank(ranks) == expected
