"""Which rank this process is, and starting Horovod with defaults that suit ranks sharing a
node's cores.

Open MPI's blocking calls spin on a core while they wait. When the ranks of a node have about
one core each (the usual `-np <cores>`), a waiting rank's Horovod thread spins on the core its
own compute thread needs; yielding when idle gives the core back. Under Gloo (`horovodrun
--gloo`) the cost is Horovod's own cycle: every HOROVOD_CYCLE_TIME (1 ms by default) each
rank's background thread negotiates with the others, and a round with a rank whose core is
busy computing waits on the scheduler; a 20 ms cycle delays a gradient's allreduce by at most
that, small beside a CPU step. benchmarks/bench_train.py measures both against independent
processes (the README has the figures). A user's own setting of these variables wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

# Read by every rank's MPI_Init, whoever launched it (mpirun, horovodrun, srun).
MPI_DEFAULTS = {"OMPI_MCA_mpi_yield_when_idle": "1"}
GLOO_DEFAULTS = {"HOROVOD_CYCLE_TIME": "20"}  # milliseconds


def start_horovod():
    """hvd.init() with dwave's defaults; returns the horovod.tensorflow module."""
    defaults = dict(MPI_DEFAULTS)
    if os.environ.get("HOROVOD_CONTROLLER") == "gloo":  # set by horovodrun --gloo
        defaults.update(GLOO_DEFAULTS)
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    import horovod.tensorflow as hvd

    hvd.init()
    return hvd


@dataclass
class World:
    """This process's place among the ranks of a job that splits work without a training
    step's collectives (generation): rank, size, ranks on this node, and a gather."""

    rank: int
    size: int
    ranks_on_node: int
    allgather: Callable[[object], list]  # every rank's value, on every rank


def world() -> World:
    """From MPI (mpirun, srun; a process started alone is rank 0 of 1), or from Horovod where
    horovodrun started the ranks with Gloo and there is no MPI world to ask."""
    if os.environ.get("HOROVOD_CONTROLLER") == "gloo":
        hvd = start_horovod()
        return World(hvd.rank(), hvd.size(), hvd.local_size(), hvd.allgather_object)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    return World(comm.Get_rank(), comm.Get_size(), node.Get_size(), comm.allgather)
