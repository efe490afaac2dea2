"""The container image (Dockerfile), built and run for real with podman: preprocess -> train
(2 ranks, mpirun inside the container) -> generate, on songs made here.

A tier of its own (`pytest -m container`, about 15 minutes the first time: a Debian base made
with debootstrap, TensorFlow, a Horovod build), not in the default suite. Needs podman, runc and
debootstrap (`apt-get install podman runc debootstrap`) and root.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.container, pytest.mark.slow]  # never in the fast tier either

IMAGE = "localhost/dwave:cpu-test"
BASE = "localhost/debian:bookworm-slim"
# This machine is a VM without CAP_SYS_RESOURCE and with hybrid cgroups: crun cannot start a
# container there, runc with cgroupfs can, and only with rlimits at or below the VM's own (podman
# asks for higher ones by default). On an ordinary host these flags change nothing that matters.
ENGINE = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
LIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]


def run(*args, timeout=3600, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([*args], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def image():
    """The image, built (the first time: a Debian base, TensorFlow, a Horovod build; later:
    podman's layer cache)."""
    missing = [tool for tool in ("podman", "runc", "debootstrap") if not shutil.which(tool)]
    assert not missing, f"the container tier needs {', '.join(missing)}: apt-get install " \
                        "podman runc debootstrap"
    run("bash", os.path.join(ROOT, "container", "base-image.sh"), BASE)
    # The build reaches the package registries (apt, PyPI) on the host's network, through the
    # host's TLS proxy where pip is told of one (PIP_CERT: its CA bundle, mounted for the build).
    cert = os.environ.get("PIP_CERT")
    proxy = ["-v", f"{os.path.dirname(cert)}:/host-certs:ro", "--build-arg",
             f"PIP_CERT=/host-certs/{os.path.basename(cert)}"] if cert else []
    run(*ENGINE, "build", *LIMITS, *proxy, "--network", "host", "--build-arg", f"BASE={BASE}",
        "-t", IMAGE, ROOT)
    return IMAGE


def in_container(image, work, *command, timeout=1800, read_only=False) -> str:
    # read_only: the image as an Apptainer SIF is, with only /work (and a /tmp) writable.
    proc = run(*ENGINE, "run", "--rm", *LIMITS, *(["--read-only"] if read_only else []),
               "--network", "none", "-v", f"{work}:/work", "-w", "/work", image, *command,
               timeout=timeout)
    return proc.stdout + proc.stderr


@pytest.mark.timeout(3600)  # the first build alone takes 10-15 minutes on 2 cores
def test_the_image_preprocesses_trains_on_two_ranks_and_generates(image, tmp_path):
    from dwave.store.synth import write_corpus

    write_corpus(str(tmp_path / "songs"), songs=6, seconds=6.0)
    said = in_container(image, tmp_path, "dwave", "--version")
    assert "dwave 0.1.0" in said and "tensorflow 2.15.1" in said and "horovod 0.28.1" in said
    said = in_container(image, tmp_path, "dwave", "preprocess", "songs", "--out", "store",
                        "--no-progress")
    assert "0 failed" in said
    said = in_container(image, tmp_path, "mpirun", "-np", "2", "--oversubscribe", "dwave",
                        "train", "store", "--run-dir", "run", "--steps", "20", "--window",
                        "512", "--val-every", "10", "--listen-seconds", "0", read_only=True)
    assert "weights identical on 2 ranks" in said and "done: step 20" in said, said[-3000:]
    # The fused kernels prebuilt into the image were found and used: in a read-only image
    # nothing could have been built at run time.
    assert "by dwave's fused CPU kernels" in said and "unavailable" not in said
    said = in_container(image, tmp_path, "dwave", "generate", "run", "--out", "songs-out",
                        "--num-songs", "2", "--seconds", "0.5")
    wavs = sorted(p.name for p in (tmp_path / "songs-out").glob("*.wav"))
    assert wavs == ["song-000.wav", "song-001.wav"], said[-2000:]
    import soundfile

    audio, rate = soundfile.read(tmp_path / "songs-out" / "song-000.wav")
    assert rate == 16000 and len(audio) == 8000
