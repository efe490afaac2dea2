"""The ranks of a job: every Horovod and MPI call dwave makes is in this module.

A training job's ranks (`start_horovod() -> Ranks`): who this process is, its devices and cores,
and the collectives training uses: the gradients' average each step, a sum of validation
losses, rank 0's weights and decisions shared, every rank's weight digest gathered. A
generation job (`world() -> World`) needs only its place among the ranks and one gather.

Horovod is started with defaults that suit ranks sharing a node's cores.

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


# What each launcher tells its ranks of the job's size: Open MPI's mpirun, horovodrun's Gloo,
# MPICH/PMI-2 (srun --mpi=pmi2), and srun's own step.
_LAUNCHER_SIZES = ("OMPI_COMM_WORLD_SIZE", "HOROVOD_SIZE", "PMI_SIZE", "PMIX_SIZE",
                   "SLURM_STEP_NUM_TASKS")


def launched_size() -> int:
    """How many ranks a launcher started this process among (1 where none did)."""
    for name in _LAUNCHER_SIZES:
        try:
            return max(1, int(os.environ[name]))
        except (KeyError, ValueError):
            continue
    return 1


def start_horovod() -> "Ranks":
    """hvd.init() with dwave's defaults; this process's Ranks. A process started alone trains
    without Horovod where it is not installed (a job of one needs no collectives)."""
    defaults = dict(MPI_DEFAULTS)
    if os.environ.get("HOROVOD_CONTROLLER") == "gloo":  # set by horovodrun --gloo
        defaults.update(GLOO_DEFAULTS)
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    try:
        import horovod.tensorflow as hvd
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "horovod" or launched_size() > 1:
            raise
        return Ranks()

    hvd.init()
    return Ranks(hvd)


class Ranks:
    """A training job's ranks and its collectives. `Ranks()` is a job of one process, whose
    collectives change nothing (a single process needs no Horovod; tests replay a distributed
    step in one process that way); a job of several is `start_horovod()`'s."""

    def __init__(self, hvd=None):
        self.hvd = hvd
        self.rank, self.size = (hvd.rank(), hvd.size()) if hvd else (0, 1)
        self.local_rank, self.local_size = (hvd.local_rank(), hvd.local_size()) if hvd else (0, 1)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def average(self, tensors: list) -> list:
        """Each tensor averaged over the ranks, all in one grouped allreduce: Horovod negotiates
        each collective in a cycle of its own (HOROVOD_CYCLE_TIME), so one group a step costs
        one round. Sparse gradients (the embedding's) are sent dense: they are small."""
        if not self.distributed:
            return list(tensors)
        import tensorflow as tf

        return self.hvd.grouped_allreduce([tf.convert_to_tensor(t) for t in tensors],
                                          op=self.hvd.Average)

    def sum(self, tensor):
        """`tensor` summed over the ranks."""
        return self.hvd.allreduce(tensor, op=self.hvd.Sum) if self.distributed else tensor

    def shutdown(self) -> None:
        """End Horovod (and MPI under it) now; a job of one has nothing to end."""
        if self.hvd:
            self.hvd.shutdown()

    def gather(self, value) -> list:
        """Every rank's `value` (any picklable object), on every rank, in rank order."""
        return self.hvd.allgather_object(value) if self.distributed else [value]

    def from_rank0(self, value):
        """Rank 0's `value`, on every rank: a decision all ranks must share."""
        return self.hvd.broadcast_object(value, root_rank=0) if self.distributed else value

    def broadcast_variables(self, variables) -> None:
        """Rank 0's values into every rank's `variables` (TensorFlow variables)."""
        if self.distributed:
            self.hvd.broadcast_variables(variables, root_rank=0)

    def configure_devices(self, threads: int | None) -> int:
        """One GPU per local rank when GPUs exist; the node's cores shared between its ranks.
        Before any TensorFlow op runs. Returns the threads each rank computes with."""
        import tensorflow as tf

        from .cores import cores_per_rank

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            gpu = gpus[self.local_rank % len(gpus)]
            tf.config.set_visible_devices(gpu, "GPU")
            tf.config.experimental.set_memory_growth(gpu, True)
        threads = threads or cores_per_rank(self.local_size)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
        return threads


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
        ranks = start_horovod()
        return World(ranks.rank, ranks.size, ranks.local_size, ranks.gather)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    return World(comm.Get_rank(), comm.Get_size(), node.Get_size(), comm.allgather)
