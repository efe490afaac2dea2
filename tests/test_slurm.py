"""The sbatch scripts in slurm/, submitted to a real one-machine SLURM (started by
scripts/slurm-up.sh): a Dask cluster inside a preprocess job, Dask worker jobs from
`--cluster slurm`, a train job that checkpoints on SIGTERM and resumes when requeued, and a
generate job whose songs, split over 2 ranks, equal a single process's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from conftest import MPI_ENV, ROOT, run_dwave

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


# Pending reasons that no amount of waiting resolves: the job asks for more than the partition has.
NEVER_STARTS = {"PartitionConfig", "PartitionNodeLimit", "BadConstraints", "ReqNodeNotAvail"}


def partition_summary() -> str:
    out = subprocess.run(["scontrol", "show", "partition", "-o"], capture_output=True, text=True,
                         timeout=60).stdout
    return " ".join(f"{k}={v}" for k, v in re.findall(r"(\w+)=(\S*)", out)
                    if k in ("PartitionName", "TotalCPUs", "State"))


@pytest.fixture(scope="module", autouse=True)
def slurm():
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm-up.sh")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def sbatch(script: str, *args, output, options=(), env=None) -> str:
    """Submit slurm/SCRIPT as a user would from the checkout; returns the job id. `env`: more
    variables for the job (sbatch passes the submitting environment on)."""
    env = {**os.environ, "DWAVE_HOME": ROOT, "DWAVE_VENV": sys.prefix, **(env or {})}
    proc = subprocess.run(["sbatch", "--parsable", f"--output={output}", *options,
                           os.path.join(ROOT, "slurm", script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_fields(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True,
                         text=True, timeout=60).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for(job_id: str, log, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        fields = job_fields(job_id)
        if fields.get("JobState") in FINAL_STATES:
            return fields
        if fields.get("Reason") in NEVER_STARTS:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} can never start here: {fields['Reason']} "
                        f"(`scontrol show partition`: {partition_summary()})")
        time.sleep(1)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} still {fields.get('JobState')} after {timeout} s:\n"
                + output_tail(log))


def output_tail(log) -> str:
    return open(log).read()[-3000:] if os.path.exists(log) else "(no output yet)"


def describe(store) -> dict:
    from dwave.store.info import describe_store

    return describe_store(str(store))


@pytest.mark.slow
def test_preprocess_job_runs_a_dask_cluster_inside_the_allocation(tmp_path, corpus):
    songs, genres = corpus
    log = tmp_path / "job.out"
    job = sbatch("preprocess.sbatch", tmp_path / "store", songs, "--metadata", genres,
                 output=log, options=["--ntasks=2"])
    fields = wait_for(job, log)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]
    assert "Dask workers joined: 2" in text and "6 written, 0 already done, 0 failed" in text
    description = describe(tmp_path / "store")
    assert description["num_tracks"] == 6
    assert description["genres"] == {"tonal": 2, "chiptune": 2, "percussive": 2}


def strangers_are_refused(address: str, job_security) -> None:
    """Nobody without the job's key gets in: plain TCP and TLS with a stranger's own
    certificate (a key pair not signed by the job's) both fail; the job's credentials get in (so the
    refusals are the credentials', not an unreachable address)."""
    from distributed import Client
    from distributed.security import Security

    assert address.startswith("tls://"), address
    strangers = {"plain tcp": (address.replace("tls://", "tcp://"), Security()),
                 "a stranger's certificate": (address, Security.temporary())}
    for who, (where, security) in strangers.items():
        with pytest.raises((OSError, TimeoutError, ValueError)):
            Client(where, security=security, timeout=5).close()
            pytest.fail(f"{who} got in")
    with Client(address, security=job_security, timeout=20) as client:
        assert client.run_on_scheduler(lambda: 42) == 42


def job_credentials(tls_dir):
    from distributed.security import Security

    files = {name: str(tls_dir / f"{name}.pem") for name in ("ca", "cert", "key")}
    return Security(tls_ca_file=files["ca"], tls_client_cert=files["cert"],
                    tls_client_key=files["key"], require_encryption=True)


@pytest.mark.slow
def test_the_preprocess_jobs_scheduler_speaks_tls_with_a_key_only_the_job_has(tmp_path,
                                                                               corpus):
    songs, _ = corpus
    log = tmp_path / "job.out"
    # --wait-workers 3 with 2 tasks: the job waits, its scheduler up, until it is cancelled.
    job = sbatch("preprocess.sbatch", tmp_path / "store", songs, "--wait-workers", "3",
                 output=log, options=["--ntasks=2"], env={"DWAVE_SCRATCH": str(tmp_path)})
    scheduler_file = tmp_path / f".dwave-dask-{job}.json"
    tls_dir = tmp_path / f".dwave-dask-{job}.tls"
    try:
        deadline = time.time() + 120
        while not (scheduler_file.exists() and scheduler_file.stat().st_size) \
                and time.time() < deadline:
            time.sleep(0.5)
        assert scheduler_file.exists(), output_tail(log)
        import json
        import stat

        assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((tls_dir / "key.pem").stat().st_mode) == 0o600
        address = json.loads(scheduler_file.read_text())["address"]
        strangers_are_refused(address, job_credentials(tls_dir))
        # The dashboard: on the node's loopback only.
        from distributed import Client

        with Client(address, security=job_credentials(tls_dir), timeout=20) as client:
            bound = client.run_on_scheduler(lambda dask_scheduler: [
                sock.getsockname()[0] for sock in dask_scheduler.http_server._sockets.values()])
        assert bound and set(bound) <= {"127.0.0.1"}, bound
    finally:
        subprocess.run(["scancel", job])
        wait_for(job, log)
    assert not tls_dir.exists() and not scheduler_file.exists()  # the job's key goes with it


@pytest.mark.slow
def test_cluster_slurm_scheduler_speaks_tls_and_keeps_its_dashboard_local(tmp_path):
    from dwave.store.cluster import ClusterConfig, dask_client

    logs = tmp_path / "logs"
    options = ClusterConfig(kind="slurm", workers=1, log_directory=str(logs))
    with dask_client(options, log=lambda *_: None) as client:
        address = client.scheduler.address
        assert address.startswith("tls://"), address
        (private,) = [p for p in logs.iterdir() if p.name.startswith(".dwave-tls-")]
        assert oct(private.stat().st_mode & 0o777) == "0o700"
        from distributed import Client
        from distributed.security import Security

        with pytest.raises((OSError, TimeoutError, ValueError)):
            Client(address, security=Security.temporary(), timeout=5).close()
        with pytest.raises((OSError, TimeoutError, ValueError)):
            Client(address.replace("tls://", "tcp://"), timeout=5).close()
        assert client.run_on_scheduler(lambda: 42) == 42  # the run's own client gets in
        bound = client.run_on_scheduler(lambda dask_scheduler: [
            sock.getsockname()[0] for sock in dask_scheduler.http_server._sockets.values()])
        assert bound and set(bound) <= {"127.0.0.1"}, bound
    assert not any(p.name.startswith(".dwave-tls-") for p in logs.iterdir())


@pytest.mark.slow
def test_cluster_slurm_submits_dask_worker_jobs(tmp_path, corpus):
    songs, _ = corpus
    proc = run_dwave("preprocess", songs, "--out", tmp_path / "store", "--cluster", "slurm",
                     "--jobs", "2", "--worker-logs", tmp_path / "logs", "--no-progress",
                     cwd=tmp_path, check=0, timeout=600)
    assert "2 worker jobs submitted" in proc.stderr
    assert describe(tmp_path / "store")["num_tracks"] == 6
    # The worker jobs were real SLURM jobs: their logs are named by job id, and SLURM knows them.
    job_ids = sorted({m.group(1) for f in os.listdir(tmp_path / "logs")
                      if (m := re.fullmatch(r"dwave-dask-worker-(\d+)\.err", f))})
    assert len(job_ids) == 2
    for job_id in job_ids:
        fields = job_fields(job_id)
        assert fields["JobName"] == "dwave-dask-worker"
        assert fields["JobState"] in {"CANCELLED", "COMPLETED", "COMPLETING"}  # stopped at the end


@pytest.mark.slow
def test_cluster_slurm_submits_jobs_of_the_shape_the_sites_jobqueue_yaml_says(tmp_path, corpus):
    songs, _ = corpus
    site = tmp_path / "dask"
    site.mkdir()
    (site / "jobqueue.yaml").write_text(
        "jobqueue:\n  slurm:\n    cores: 4\n    processes: 2\n    memory: 2GiB\n"
        "    job-script-prologue: ['echo site-prologue-ran']\n")
    proc = run_dwave("preprocess", songs, "--out", tmp_path / "store", "--cluster", "slurm",
                     "--jobs", "1", "--worker-logs", tmp_path / "logs", "--no-progress",
                     cwd=tmp_path, env={"DASK_CONFIG": str(site)}, check=0, timeout=600)
    assert "1 worker jobs submitted, each 4 cores, 2 worker processes, 2GiB" in proc.stderr
    assert describe(tmp_path / "store")["num_tracks"] == 6
    (err,) = [f for f in os.listdir(tmp_path / "logs") if f.endswith(".err")]
    fields = job_fields(re.fullmatch(r"dwave-dask-worker-(\d+)\.err", err).group(1))
    assert fields["NumCPUs"] == "4" and fields["MinMemoryNode"] == "2G", fields
    log = (tmp_path / "logs" / err).read_text()
    assert log.count("Start worker at") == 2, log  # two worker processes in the one job
    assert log.count("Threads:                          2") == 2, log
    assert "site-prologue-ran" in (tmp_path / "logs" / err.replace(".err", ".out")).read_text()


@pytest.mark.slow
def test_cluster_slurm_without_a_controller_is_a_one_line_error(tmp_path, corpus):
    songs, _ = corpus
    nowhere = tmp_path / "slurm.conf"  # a cluster whose controller is not running
    nowhere.write_text("ClusterName=nowhere\nSlurmctldHost=localhost\nSlurmctldPort=9\n"
                       "AuthType=auth/munge\nNodeName=localhost CPUs=1\n"
                       "PartitionName=debug Nodes=localhost Default=YES\n")
    proc = run_dwave("preprocess", songs, "--out", tmp_path / "store", "--cluster", "slurm",
                     env={"SLURM_CONF": str(nowhere)}, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("dwave: error: --cluster slurm:")


@pytest.mark.slow
@pytest.mark.parametrize("whom", [
    "steps",  # `scancel --signal=TERM`: the ranks themselves
    "batch",  # the batch shell only, as SLURM's --signal=B:TERM@300 before the time limit
    "batch-mpirun",  # the same with DWAVE_LAUNCHER=mpirun: the script forwards SIGUSR1
])
def test_train_job_checkpoints_on_sigterm_and_the_requeued_job_resumes(tmp_path, tone_store,
                                                                       whom):
    run, log = tmp_path / "run", tmp_path / "train.out"
    launcher = {"DWAVE_LAUNCHER": "mpirun", **MPI_ENV} if whom.endswith("mpirun") else {}
    # Enough steps that the job cannot finish before the signal lands: this machine trains the
    # tiny model at ~30 steps/s, so 300 steps were over in 10 s and a checkpoint the test waited
    # for by name was rotated away (keep 3) before it looked.
    steps = 1000
    job = sbatch("train.sbatch", tone_store, run, "--steps", str(steps), "--window", "256",
                 "--batch-size", "2", "--ckpt-every", "20", "--val-every", "100000",
                 output=log, options=["--ntasks=2"], env=launcher)
    deadline = time.time() + 240
    while not [f for f in (run / "checkpoints").glob("ckpt-*.index")
               if int(f.name[len("ckpt-"):-len(".index")]) >= 40]:
        fields = job_fields(job)
        assert time.time() < deadline, output_tail(log)
        assert fields.get("JobState") not in FINAL_STATES, (
            f"the job ended before it was signalled:\n{output_tail(log)}")
        assert fields.get("Reason") not in NEVER_STARTS, (
            f"{fields['Reason']}: {partition_summary()}")
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=TERM",
                    *(["--batch"] if whom.startswith("batch") else []), job], check=True)

    fields = wait_for(job, log, timeout=400)
    text = log.read_text()
    state = (fields["JobState"], fields["ExitCode"], fields["Restarts"])
    assert state == ("COMPLETED", "0:0", "1"), text[-3000:]
    signal_name = "SIGUSR1" if whom.endswith("mpirun") else "SIGTERM"
    stopped = re.search(rf"stopped by {signal_name} at step (\d+)", text)
    assert stopped, text[-3000:]
    step = int(stopped.group(1))
    assert 40 <= step < steps
    assert "requeueing job" in text
    assert re.search(rf"resuming from .*ckpt-{step} at step {step}", text)
    assert "weights identical on 2 ranks" in text and "training complete" in text
    assert (run / "checkpoints" / f"ckpt-{steps}.index").exists()


@pytest.mark.slow
def test_generate_job_splits_songs_over_ranks_and_matches_one_process(tmp_path, trained_run):
    log = tmp_path / "generate.out"
    flags = ["--num-songs", "3", "--seconds", "0.25", "--genre", "tone", "--seed", "5"]
    job = sbatch("generate.sbatch", trained_run, tmp_path / "job", *flags, output=log,
                 options=["--ntasks=2", "--cpus-per-task=1"])
    run_dwave("generate", trained_run, "--out", tmp_path / "local", *flags, check=0)
    fields = wait_for(job, log)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()[-3000:]
    assert "2 rank(s)" in log.read_text()
    for i in range(3):
        wav = f"song-00{i}.wav"
        assert (tmp_path / "job" / wav).read_bytes() == (tmp_path / "local" / wav).read_bytes()
        assert (tmp_path / "job" / f"song-00{i}.png").stat().st_size > 0


@pytest.mark.slow
def test_generate_job_saves_its_songs_on_sigterm_and_the_requeued_job_finishes_them(
        tmp_path, trained_run):
    """SLURM's warning before the time limit (SIGTERM to the batch shell): the ranks save their
    songs in progress, the job requeues itself, the requeued job skips what was finished and
    resumes the rest; the songs are byte for byte a single uninterrupted process's."""
    log, out = tmp_path / "generate.out", tmp_path / "job"
    flags = ["--num-songs", "3", "--seconds", "20", "--genre", "tone", "--seed", "5",
             "--batch-size", "1"]
    job = sbatch("generate.sbatch", trained_run, out, *flags, output=log,
                 options=["--ntasks=2", "--cpus-per-task=1"])
    codes = out / ".dwave-generate" / "song-000.codes"
    deadline = time.time() + 240
    while not (codes.exists() and codes.stat().st_size > 40_000):
        fields = job_fields(job)
        assert time.time() < deadline, output_tail(log)
        assert fields.get("JobState") not in FINAL_STATES, (
            f"the job ended before it was signalled:\n{output_tail(log)}")
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True)
    run_dwave("generate", trained_run, "--out", tmp_path / "local", *flags, check=0)

    fields = wait_for(job, log, timeout=400)
    text = log.read_text()
    state = (fields["JobState"], fields["ExitCode"], fields["Restarts"])
    assert state == ("COMPLETED", "0:0", "1"), text[-3000:]
    assert "stopped by SIGTERM" in text and "their state saved in" in text
    assert "songs left: requeueing job" in text
    assert re.search(r"continuing the job in .*: \d song\(s\) finished, [1-9]\d* resumed", text)
    assert "generation complete" in text
    for i in range(3):
        for name in (f"song-00{i}.wav", f"song-00{i}.png"):
            assert (out / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


@pytest.mark.slow
def test_scripts_copied_by_dwave_slurm_scripts_run_from_anywhere_with_the_venv_on_path(
        tmp_path, trained_run):
    """As after `pip install`: no checkout to submit from, no DWAVE_HOME/DWAVE_VENV; the job
    finds env.sh beside the script and dwave on the PATH sbatch passes on. It reserves what
    generation uses: one task of 4 cores, no GPU."""
    scripts, elsewhere = tmp_path / "my-scripts", tmp_path / "work"
    elsewhere.mkdir()
    run_dwave("slurm-scripts", scripts, check=0)
    env = {k: v for k, v in os.environ.items() if k not in ("DWAVE_HOME", "DWAVE_VENV")}
    env["PATH"] = os.path.join(sys.prefix, "bin") + os.pathsep + env["PATH"]
    log = tmp_path / "generate.out"
    proc = subprocess.run(["sbatch", "--parsable", f"--output={log}",
                           str(scripts / "generate.sbatch"), str(trained_run),
                           str(tmp_path / "songs"), "--num-songs", "2", "--seconds", "0.25",
                           "--genre", "tone"],
                          capture_output=True, text=True, cwd=elsewhere, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    fields = wait_for(job, log)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()[-3000:]
    assert (fields["NumTasks"], fields["NumCPUs"]) == ("1", "4"), fields
    assert "gres/gpu" not in fields.get("TRES", "")
    assert f"dwave from {sys.prefix}" in log.read_text()
    assert sorted(p.name for p in (tmp_path / "songs").glob("*.wav")) == [
        "song-000.wav", "song-001.wav"]

