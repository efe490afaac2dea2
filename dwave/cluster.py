"""The one place that makes a Dask client: a LocalCluster by default, or an existing scheduler."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None, log=print) -> Iterator:
    """Yield a connected `distributed.Client`; tear down what this call started.

    - `scheduler`: address of a running scheduler (``tcp://host:8786``, or a scheduler file
      path ending in .json, as dask-mpi and `dask scheduler --scheduler-file` write).
    - otherwise a LocalCluster of `workers` single-threaded processes (default: one per core).
      Processes, not threads: decoding holds the GIL in places, and one process per core is
      also what a cluster node runs, so laptop and cluster behave alike.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        if scheduler.endswith(".json"):
            client = Client(scheduler_file=scheduler)
        else:
            client = Client(scheduler)
        log(f"connected to Dask scheduler {client.scheduler.address} "
            f"({len(client.scheduler_info()['workers'])} workers), "
            f"dashboard {client.dashboard_link}")
        try:
            yield client
        finally:
            client.close()
        return

    n_workers = workers or os.cpu_count() or 1
    with LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":8787"
    ) as cluster, Client(cluster) as client:
        log(f"Dask LocalCluster: {n_workers} worker processes, dashboard {client.dashboard_link}")
        yield client
