"""The one place that makes a Dask client: a LocalCluster by default, an existing scheduler,
worker jobs on SLURM (dask-jobqueue), or EC2 instances (dask-cloudprovider).

Which cluster and its size come from `ClusterConfig` (the `dwave preprocess` flags); anything
left unset falls back to Dask's own configuration, so a site can keep its defaults in
~/.config/dask/jobqueue.yaml / cloudprovider.yaml or in environment variables such as
DASK_JOBQUEUE__SLURM__QUEUE and DASK_CLOUDPROVIDER__EC2__REGION.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from typing import Iterator

from ..errors import DwaveError, describe

CLUSTER_KINDS = ("local", "slurm", "ec2")

# Dask's nanny starts each worker with MALLOC_TRIM_THRESHOLD_=65536 so that its RSS drops after
# large frees. Setting it switches off glibc's dynamic mmap threshold: every decode buffer is
# then a fresh mmap faulted in page by page, a fifth of a 30-s clip's cost (bench_preprocess,
# row c). dwave's workers reuse bounded buffers, so they run without it; a value the user
# exports is kept. The environment variable reaches SLURM worker jobs (sbatch exports the
# submitter's environment); slurm/preprocess.sbatch exports it for its own workers.
NO_MALLOC_TRIM = "DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_"


@dataclasses.dataclass
class ClusterConfig:
    kind: str = "local"
    workers: int | None = None         # local: worker processes; slurm: jobs; ec2: instances
    scheduler: str | None = None       # address or scheduler JSON file of a running cluster
    wait_workers: int = 0              # start only once this many workers have joined
    wait_timeout: float = 900.0        # seconds to wait for them
    connect_timeout: float = 30.0      # seconds to reach --scheduler (or its file to appear)
    # Where the local cluster's dashboard listens: this machine only, unless asked otherwise.
    dashboard_address: str = "127.0.0.1:8787"
    # SLURM (dask-jobqueue): each unset value is the site's jobqueue.yaml (jobqueue.slurm.*),
    # else the default in slurm_cluster_kwargs
    partition: str | None = None
    walltime: str | None = None
    worker_memory: str | None = None      # per job
    worker_cores: int | None = None       # per job, shared by its worker processes
    worker_processes: int | None = None   # Dask worker processes per job
    account: str | None = None
    log_directory: str | None = None
    # EC2 (dask-cloudprovider)
    region: str | None = None
    instance_type: str | None = None
    ami: str | None = None
    docker_image: str | None = None

    def __post_init__(self):
        if self.kind not in CLUSTER_KINDS:
            raise DwaveError(f"unknown cluster {self.kind!r}: choose one of "
                             f"{', '.join(CLUSTER_KINDS)}")
        if self.scheduler and self.kind != "local":
            raise DwaveError("--scheduler connects to a running cluster: do not combine it "
                             f"with --cluster {self.kind}")


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored while local worker processes start. Ctrl-C in a terminal reaches the
    whole process group: workers that took it would each die with a KeyboardInterrupt
    traceback while the driver shuts them down anyway. An ignored signal stays ignored in
    children (across exec too), and Python then installs no handler of its own."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _quiet_logs(client) -> None:
    import logging

    def quiet():
        for name in ("distributed", "tornado"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    quiet()
    try:
        client.run(quiet, wait=True)
    except Exception:  # noqa: BLE001 - best effort while shutting down
        pass


def _connect(options: ClusterConfig):
    """A client of a running scheduler, within connect_timeout or a one-line error (Dask
    itself waits for a missing scheduler file forever, and an unreachable address ends in a
    traceback)."""
    import time

    from distributed import Client

    target = options.scheduler
    kwargs = {"timeout": options.connect_timeout}
    if target.endswith(".json"):
        deadline = time.monotonic() + options.connect_timeout
        while not os.path.exists(target):  # a starting job may not have written it yet
            if time.monotonic() > deadline:
                raise DwaveError(
                    f"--scheduler {target}: no such scheduler file after "
                    f"{options.connect_timeout:.0f} s: start the scheduler (`dask scheduler "
                    f"--scheduler-file {target}`, or the job that runs it) or fix the path")
            time.sleep(0.5)
        kwargs["scheduler_file"] = target
    else:
        kwargs["address"] = target
    _check_tls_credentials(target)
    try:
        return Client(**kwargs)
    except (OSError, TimeoutError, ValueError) as exc:
        raise DwaveError(f"--scheduler {target}: cannot reach the Dask scheduler within "
                         f"{options.connect_timeout:.0f} s ({describe(exc)}): is it running, "
                         "and is the address right?") from None


def _check_tls_credentials(target: str) -> None:
    """A TLS scheduler (slurm/preprocess.sbatch starts one) needs the job's key on this side:
    say so instead of Dask's traceback."""
    import dask

    address = target
    if target.endswith(".json"):
        try:
            with open(target) as f:
                address = json.load(f).get("address", "")
        except (OSError, ValueError):
            return  # Dask's own error follows
    if address.startswith("tls://") and not dask.config.get("distributed.comm.tls.ca-file"):
        raise DwaveError(
            f"--scheduler {target}: the scheduler speaks TLS and this process has no "
            "credentials: run `eval \"$(python -m dwave.store.tls DIR)\"` with the job's DIR first "
            "(slurm/preprocess.sbatch does), or connect from inside the job")


@contextlib.contextmanager
def _private_directory(parent: str) -> Iterator[str]:
    """A directory only this user can read (for a job's TLS key), removed at the end."""
    import shutil
    import tempfile

    os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=".dwave-tls-", dir=parent)  # mode 0700
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # made above: only the job's key files


@contextlib.contextmanager
def _without_malloc_trim() -> Iterator[None]:
    import dask

    if NO_MALLOC_TRIM in os.environ:
        yield
        return
    os.environ[NO_MALLOC_TRIM] = "None"
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            yield
    finally:
        os.environ.pop(NO_MALLOC_TRIM, None)


def slurm_cluster_kwargs(options: ClusterConfig) -> dict:
    """dask_jobqueue.SLURMCluster arguments: a flag wins, then the site's jobqueue.yaml
    (dask-jobqueue reads it for everything not passed here: interface, job-script-prologue,
    job-extra-directives, ...), then dwave's defaults: one single-threaded worker process per
    job of 4 GiB, running this same Python (a shared file system, as on every SLURM cluster)."""
    import dask

    def site(key: str, default):
        value = dask.config.get(f"jobqueue.slurm.{key}", None)
        return default if value is None else value

    kwargs = {
        "cores": options.worker_cores or site("cores", 1),
        "processes": options.worker_processes or site("processes", 1),
        "memory": options.worker_memory or site("memory", "4GiB"),
        "python": site("python", sys.executable), "job_name": "dwave-dask-worker",
        "log_directory": options.log_directory or site("log-directory", "dask-worker-logs"),
        # The site's scheduler options, with the dashboard where --dashboard-address says
        # (dask-jobqueue's default is every interface, and the dashboard has no login).
        "scheduler_options": {**site("scheduler-options", {}),
                              "dashboard_address": options.dashboard_address},
    }
    if kwargs["processes"] > kwargs["cores"]:
        raise DwaveError(f"--cluster slurm: {kwargs['processes']} worker processes per job need "
                         f"at least as many cores, got {kwargs['cores']} (--worker-cores, "
                         "--worker-processes or jobqueue.yaml's slurm: cores/processes)")
    for key, value in (("queue", options.partition), ("walltime", options.walltime),
                       ("account", options.account)):
        if value:
            kwargs[key] = value
    return kwargs


def ec2_cluster_kwargs(options: ClusterConfig) -> dict:
    """dask_cloudprovider.aws.EC2Cluster arguments: `workers` instances, each running one Dask
    worker per core from the Docker image (the image must hold dwave and its dependencies)."""
    # security=True: TLS with certificates dask-cloudprovider makes for this cluster (its
    # default, stated here so that a site's cloudprovider.yaml cannot turn it off unnoticed):
    # the scheduler's instance has a public address.
    kwargs = {"n_workers": options.workers or 2, "security": True}
    for key, value in (("region", options.region), ("instance_type", options.instance_type),
                       ("ami", options.ami), ("docker_image", options.docker_image)):
        if value:
            kwargs[key] = value
    return kwargs


def cluster_class(kind: str):
    """The Dask cluster class for `kind` (imported only when that kind is used)."""
    if kind == "slurm":
        from dask_jobqueue import SLURMCluster

        return SLURMCluster
    if kind == "ec2":
        from dask_cloudprovider.aws import EC2Cluster

        return EC2Cluster
    from distributed import LocalCluster

    return LocalCluster


@contextlib.contextmanager
def dask_client(options: ClusterConfig | None = None, log=print) -> Iterator:
    """Yield a connected `distributed.Client`; tear down whatever this call started.

    - `scheduler`: connect to a running scheduler (``tcp://host:8786``, or a scheduler file
      ending in .json, as `dask scheduler --scheduler-file` and dask-mpi write; slurm/
      preprocess.sbatch does this).
    - kind "local": a LocalCluster of `workers` single-threaded processes (default: one per
      core). Processes, not threads: decoding holds the GIL in places, and one process per core
      is also what a cluster node runs, so laptop and cluster behave alike.
    - kind "slurm": `workers` SLURM jobs submitted with sbatch, each of the shape that
      slurm_cluster_kwargs resolves (flags, the site's jobqueue.yaml, dwave's defaults).
    - kind "ec2": `workers` EC2 instances (needs AWS credentials; billed while it runs).
    """
    from distributed import Client

    options = options or ClusterConfig()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_without_malloc_trim())
        if options.scheduler:
            client = stack.enter_context(_connect(options))
            what = f"Dask scheduler {client.scheduler.address}"
        elif options.kind == "local":
            n_workers = options.workers or os.cpu_count() or 1
            with _sigint_ignored():  # the workers inherit it: Ctrl-C is the driver's to handle
                cluster = stack.enter_context(cluster_class("local")(
                    n_workers=n_workers, threads_per_worker=1, processes=True,
                    dashboard_address=options.dashboard_address))
            client = stack.enter_context(Client(cluster))
            what = f"Dask LocalCluster of {n_workers} worker processes"
        elif options.kind == "slurm":
            _check_slurm_answers()
            from .tls import security, write_credentials

            kwargs = slurm_cluster_kwargs(options)
            # The scheduler listens on this host's network for the worker jobs: TLS with a key
            # made for this run (dwave/store/tls.py says why), in a private directory beside the
            # worker logs (a shared file system: the worker jobs read it there).
            credentials = write_credentials(stack.enter_context(
                _private_directory(kwargs["log_directory"])))
            kwargs.update(security=security(credentials), protocol="tls://")
            cluster = stack.enter_context(_started("slurm", kwargs))
            jobs = options.workers or 2
            cluster.scale(jobs=jobs)
            client = stack.enter_context(Client(cluster))
            what = (f"Dask on SLURM: {jobs} worker jobs submitted, each {kwargs['cores']} "
                    f"cores, {kwargs['processes']} worker processes, {kwargs['memory']} "
                    f"(`squeue -n {kwargs['job_name']}`; their logs in "
                    f"{kwargs['log_directory']}/)")
        else:
            _check_aws_credentials()
            kwargs = ec2_cluster_kwargs(options)
            log(f"starting an EC2 cluster: {kwargs} (a few minutes)")
            cluster = stack.enter_context(_started("ec2", kwargs))
            client = stack.enter_context(Client(cluster))
            what = f"Dask on EC2: {kwargs['n_workers']} worker instances"
        log(f"{what}, dashboard {client.dashboard_link}")
        _wait_for_workers(client, options, log)
        try:
            yield client
        except KeyboardInterrupt:
            # Ctrl-C: the tasks in flight are cancelled as the cluster closes, and every worker
            # would log each cancellation. Finished tracks are in the store; say so, once.
            _quiet_logs(client)
            raise


def _started(kind: str, kwargs: dict):
    """The cluster of `kind`, started; a failure to start is one line naming the cause."""
    try:
        return cluster_class(kind)(**kwargs)
    except Exception as exc:  # noqa: BLE001 - boto, asyncio and sbatch errors alike end here
        raise DwaveError(f"--cluster {kind}: could not start the cluster: "
                         f"{describe(exc)}") from None


def _check_aws_credentials() -> None:
    """EC2Cluster without credentials fails deep inside boto after a long retry: fail first."""
    import botocore.exceptions
    import botocore.session

    try:
        credentials = botocore.session.get_session().get_credentials()
    except botocore.exceptions.BotoCoreError as exc:  # e.g. AWS_PROFILE names no profile
        raise DwaveError(f"--cluster ec2: {exc}") from None
    if credentials is None:
        raise DwaveError("--cluster ec2: no AWS credentials (set AWS_PROFILE, or "
                         "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run on an instance "
                         "with an IAM role)")


def _check_slurm_answers() -> None:
    """dask-jobqueue reports a failed sbatch only as a log traceback and then waits for workers
    that never come: ask the controller first, and fail in one line if it does not answer."""
    import shutil
    import subprocess

    if not shutil.which("sbatch"):
        raise DwaveError("--cluster slurm: no sbatch on this machine's PATH (run it on a SLURM "
                         "login node)")
    try:
        subprocess.run(["sinfo", "-h", "-o", "%P"], check=True, capture_output=True, text=True,
                       timeout=60)
    except subprocess.CalledProcessError as exc:
        reason = (exc.stderr or exc.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise DwaveError("--cluster slurm: the SLURM controller does not answer: "
                         f"{reason[0]}") from None
    except subprocess.TimeoutExpired:
        raise DwaveError("--cluster slurm: the SLURM controller did not answer `sinfo` within "
                         "60 s") from None


def _wait_for_workers(client, options: ClusterConfig, log) -> None:
    wanted = options.wait_workers or (1 if options.kind != "local" or options.scheduler else 0)
    if not wanted or len(client.scheduler_info()["workers"]) >= wanted:
        return
    log(f"waiting for {wanted} Dask worker{'s' if wanted > 1 else ''} to join "
        f"(up to {options.wait_timeout:.0f} s)")
    try:
        client.wait_for_workers(wanted, timeout=options.wait_timeout)
    except TimeoutError:
        joined = len(client.scheduler_info()["workers"])
        raise DwaveError(f"only {joined} of {wanted} Dask workers joined within "
                         f"{options.wait_timeout:.0f} s: check the queue or the worker "
                         "logs") from None
    log(f"Dask workers joined: {len(client.scheduler_info()['workers'])}")
