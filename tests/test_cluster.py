"""Cluster construction: EC2 through dask-cloudprovider (against a stand-in: EC2 cannot be
reached from here) and the option checks. SLURM is tested for real in test_slurm.py."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from conftest import run_dwave
from dwave.errors import DwaveError


def ec2_parameters() -> set[str]:
    """The arguments the real EC2Cluster (and the VMCluster it passes **kwargs to) accepts."""
    from dask_cloudprovider.aws import EC2Cluster
    from dask_cloudprovider.generic.vmcluster import VMCluster

    return {name for cls in (EC2Cluster, VMCluster)
            for name in inspect.signature(cls.__init__).parameters} - {"self", "kwargs"}


@pytest.mark.slow
def test_preprocess_on_ec2_builds_the_cluster_dask_cloudprovider_expects(tmp_path, corpus,
                                                                          monkeypatch):
    """MOCK: a stand-in for dask_cloudprovider.aws.EC2Cluster, which would start (and bill) EC2
    instances this machine cannot reach. It accepts only the real class's arguments, records
    them, and runs the workers locally, so everything after the cluster's construction is real."""
    from distributed import LocalCluster

    import dwave.store.cluster
    from dwave.store.cluster import ClusterConfig
    from dwave.store.info import describe_store
    from dwave.store.preprocess import run_preprocess

    received = []

    class StandInEC2Cluster(LocalCluster):
        def __init__(self, **kwargs):
            unknown = set(kwargs) - ec2_parameters()
            assert not unknown, f"EC2Cluster does not take {unknown}"
            received.append(kwargs)
            super().__init__(n_workers=kwargs["n_workers"], threads_per_worker=1,
                             processes=True, dashboard_address=None)

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # what a real EC2Cluster needs
        monkeypatch.setenv(name, "stand-in")
    real_cluster_class = dwave.store.cluster.cluster_class
    monkeypatch.setattr(dwave.store.cluster, "cluster_class",
                        lambda kind: StandInEC2Cluster if kind == "ec2"
                        else real_cluster_class(kind))
    songs, _ = corpus
    lines = []
    options = ClusterConfig(kind="ec2", workers=2, region="eu-west-1",
                             instance_type="c6i.large", docker_image="ghcr.io/example/dwave:0.1")
    summary = run_preprocess([songs], str(tmp_path / "store"), cluster=options, progress=False,
                             log=lines.append)
    assert received == [{"n_workers": 2, "security": True, "region": "eu-west-1",
                         "instance_type": "c6i.large", "docker_image": "ghcr.io/example/dwave:0.1"}]
    assert len(summary.written) == 6 and not summary.failures
    assert describe_store(str(tmp_path / "store"))["num_tracks"] == 6
    assert any("Dask on EC2: 2 worker instances" in line for line in lines)


def test_unset_ec2_values_are_left_to_dask_config():
    from dwave.store.cluster import ClusterConfig, ec2_cluster_kwargs

    assert ec2_cluster_kwargs(ClusterConfig(kind="ec2")) == {"n_workers": 2, "security": True}


def test_slurm_job_script_runs_one_single_threaded_worker_of_this_python(tmp_path):
    import sys

    from dask_jobqueue import SLURMCluster

    from dwave.store.cluster import ClusterConfig, slurm_cluster_kwargs

    kwargs = slurm_cluster_kwargs(ClusterConfig(kind="slurm", partition="gpu", walltime="01:00:00",
                                                 worker_memory="2GiB", account="music",
                                                 log_directory=str(tmp_path)))
    with SLURMCluster(**kwargs) as cluster:  # a real one; nothing is submitted until scale()
        script = cluster.job_script()
    for line in ("#SBATCH -p gpu", "#SBATCH -A music", "#SBATCH -t 01:00:00",
                 "#SBATCH -J dwave-dask-worker", "--nthreads 1", sys.executable):
        assert line in script, script


def test_slurm_job_shape_comes_from_the_sites_jobqueue_yaml_unless_a_flag_overrides(tmp_path):
    import dask
    from dask_jobqueue import SLURMCluster

    from dwave.store.cluster import ClusterConfig, slurm_cluster_kwargs

    site = {"jobqueue.slurm.cores": 4, "jobqueue.slurm.processes": 2,
            "jobqueue.slurm.memory": "8GiB", "jobqueue.slurm.interface": "lo",
            "jobqueue.slurm.job-script-prologue": ["module load openmpi/4.1"]}
    with dask.config.set(site):
        kwargs = slurm_cluster_kwargs(ClusterConfig(kind="slurm", log_directory=str(tmp_path)))
        assert (kwargs["cores"], kwargs["processes"], kwargs["memory"]) == (4, 2, "8GiB")
        with SLURMCluster(**kwargs) as cluster:  # dask-jobqueue reads the rest of the yaml
            script = cluster.job_script()
        for line in ("#SBATCH --cpus-per-task=4", "--nworkers 2", "--nthreads 2",
                     "module load openmpi/4.1", "--interface lo"):
            assert line in script, script
        flags = ClusterConfig(kind="slurm", worker_cores=2, worker_processes=1,
                              worker_memory="3GiB", log_directory=str(tmp_path))
        kwargs = slurm_cluster_kwargs(flags)
        assert (kwargs["cores"], kwargs["processes"], kwargs["memory"]) == (2, 1, "3GiB")
        with pytest.raises(DwaveError, match="2 worker processes per job need at least"):
            slurm_cluster_kwargs(dataclasses.replace(flags, worker_cores=1, worker_processes=2))


def test_scheduler_and_cluster_kind_do_not_combine():
    from dwave.store.cluster import ClusterConfig

    with pytest.raises(DwaveError, match="do not combine"):
        ClusterConfig(kind="ec2", scheduler="tcp://127.0.0.1:8786")


def test_unknown_cluster_kind_is_a_one_line_error(tmp_path):
    proc = run_dwave("preprocess", tmp_path, "--out", tmp_path / "s", "--cluster", "k8s")
    assert proc.returncode == 2 and "invalid choice: 'k8s'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ec2_without_aws_credentials_is_a_one_line_error(tmp_path, corpus):
    songs, _ = corpus
    no_credentials = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                      "AWS_PROFILE": None,
                      "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                      "AWS_CONFIG_FILE": str(tmp_path / "none"),
                      "AWS_EC2_METADATA_DISABLED": "true"}
    proc = run_dwave("preprocess", songs, "--out", tmp_path / "store", "--cluster", "ec2",
                     env=no_credentials)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "dwave: error: --cluster ec2: no AWS credentials")
    proc = run_dwave("preprocess", songs, "--out", tmp_path / "store", "--cluster", "ec2",
                     env={**no_credentials, "AWS_PROFILE": "nobody"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "dwave: error: --cluster ec2: The config profile (nobody) could not be found")


@pytest.mark.slow
def test_a_missing_scheduler_file_or_dead_address_is_a_bounded_one_line_error(tmp_path):
    import socket
    import time

    from dwave.store.cluster import ClusterConfig, dask_client
    from dwave.errors import DwaveError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    for target, message in [(str(tmp_path / "missing.json"), "no such scheduler file after 2 s"),
                            (dead, "cannot reach the Dask scheduler within 2 s")]:
        started = time.monotonic()
        with pytest.raises(DwaveError, match=message) as caught:
            with dask_client(ClusterConfig(scheduler=target, connect_timeout=2), log=print):
                pass
        assert time.monotonic() - started < 20
        assert "\n" not in str(caught.value) and target in str(caught.value)


def test_the_local_dashboard_listens_on_loopback_only():
    from dwave.store.cluster import ClusterConfig, dask_client

    with dask_client(ClusterConfig(workers=1), log=print) as client:
        # The addresses the scheduler's HTTP server (the dashboard) really bound.
        bound = client.run_on_scheduler(lambda dask_scheduler: [
            sock.getsockname()[0] for sock in dask_scheduler.http_server._sockets.values()])
        assert bound and set(bound) <= {"127.0.0.1"}, bound


def test_local_workers_run_without_dasks_malloc_trimming_unless_the_user_sets_it(monkeypatch):
    import os

    from dwave.store.cluster import NO_MALLOC_TRIM, ClusterConfig, dask_client

    def worker_trim(client):
        (value,) = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_")).values()
        return value

    monkeypatch.delenv(NO_MALLOC_TRIM, raising=False)
    with dask_client(ClusterConfig(workers=1), log=lambda *_: None) as client:
        assert worker_trim(client) is None
        # Also in the driver's environment while the cluster runs: sbatch passes it on to
        # SLURM worker jobs.
        assert os.environ[NO_MALLOC_TRIM] == "None"
    assert NO_MALLOC_TRIM not in os.environ  # put back as it was

    # A user's export: Dask reads it into its configuration when it is imported.
    monkeypatch.setenv(NO_MALLOC_TRIM, "131072")
    import dask

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 131072}):
        with dask_client(ClusterConfig(workers=1), log=lambda *_: None) as client:
            assert worker_trim(client) == "131072"
