"""Shared fixtures: synthetic audio files, a corpus, a real S3 endpoint (moto) on loopback, and
a helper that runs the `dwave` command line as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CUDA engine's kernels run in Numba's simulator: this machine has no GPU. Read when numba
# is first imported, so set before any test imports dwave; the CPU engine does not use it, and
# dwave never picks the CUDA engine by itself under the simulator (dwave.generate.engines).
os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
ASC_MUSIC = "/usr/share/games/asc/music"

# Open MPI as root (CI runs as root) and with more ranks than this machine's cores.
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}

FORMATS = {  # extension -> (libsndfile format, subtype)
    "mp3": ("MP3", "MPEG_LAYER_III"),
    "ogg": ("OGG", "VORBIS"),
    "opus": ("OGG", "OPUS"),
    "flac": ("FLAC", "PCM_16"),
    "wav": ("WAV", "PCM_16"),
}


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 1000.0,
         amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    mono = amplitude * np.sin(2 * np.pi * freq * t)
    return np.stack([mono * (1.0 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)


def write_audio(path, audio: np.ndarray, rate: int) -> str:
    import soundfile as sf

    ext = str(path).rsplit(".", 1)[-1]
    fmt, subtype = FORMATS[ext]
    sf.write(str(path), audio, rate, format=fmt, subtype=subtype)
    return str(path)


def write_tone(path, seconds=2.0, rate=44100, channels=2, freq=1000.0) -> str:
    return write_audio(path, tone(seconds, rate, channels, freq), rate)


def run_dwave(*args, env=None, timeout=300, check=None, cwd=None) -> subprocess.CompletedProcess:
    """Run `dwave ARGS` in a subprocess, exactly as a user would from the shell. `env` adds
    variables; a value of None removes one."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    proc = subprocess.run(
        [sys.executable, "-m", "dwave.cli", *map(str, args)],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd or ROOT,
        errors="backslashreplace",  # a file name that is not UTF-8 is printed as its bytes
    )
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def dwave_here(*args, check=None) -> subprocess.CompletedProcess:
    """`dwave ARGS` called in this process (dwave.cli.main), its output captured: for commands
    where a process of their own would prove nothing more (no signals, no environment of their
    own, no exit-time behaviour), at none of the seconds a Python start costs."""
    import contextlib
    import io

    from dwave.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[str, str]:
    """Six synthetic 8-second MP3 songs with FMA-style names, and their genre CSV."""
    from dwave.store.synth import write_corpus

    directory = str(tmp_path_factory.mktemp("corpus"))
    csv_path = write_corpus(directory, songs=6, seconds=8)
    return directory, csv_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto_server(log_path: str | None = None,
                      check_credentials: bool = False) -> tuple[subprocess.Popen, str]:
    """A moto S3 server on a free loopback port, once it accepts connections: (process, URL).
    `log_path`: where its request log (one line a request) goes; default nowhere.
    `check_credentials`: refuse (403) keys its IAM does not know, as real S3 does."""
    port = _free_port()
    server = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
         "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=open(log_path, "w") if log_path else subprocess.DEVNULL,
        env={**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if check_credentials
                              else {})},
    )
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint (moto's server) on 127.0.0.1, with dummy credentials exported
    the way a user would export real ones (so subprocesses and Dask workers see them too)."""
    server, endpoint = start_moto_server()
    saved = {k: os.environ.get(k) for k in
             ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.terminate()
    server.wait(10)


@pytest.fixture
def s3_bucket(s3_endpoint, request) -> str:
    import boto3

    name = "dwave-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


def synthetic_codes(seconds: float, rate: int = 16000, kind: str = "tone", seed: int = 0,
                    quantization_channels: int = 256):
    """mu-law codes of a tone or a chirp: structure a WaveNet can learn in a few steps."""
    from dwave.store.audio import mu_law_encode

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    if kind == "tone":
        audio = 0.6 * np.sin(2 * np.pi * rng.uniform(200, 600) * t)
    else:  # chirp: frequency sweeping up and down
        f0, f1 = 150.0, 900.0
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1]))
        audio = 0.6 * np.sin(phase)
    return mu_law_encode(audio.astype(np.float32), quantization_channels)


def make_store(url: str, tracks: dict, rate: int = 16000, storage_options=None,
               quantization_channels: int = 256, tracks_per_part: int = 2) -> str:
    """A store written directly (no decoding): `tracks` maps id -> (codes, genre), written
    `tracks_per_part` to a part, as preprocessing batches them."""
    from dwave.store.track_store import TrackStore

    store = TrackStore(url, storage_options)
    store.prepare(rate, quantization_channels, overwrite=True)
    items = list(tracks.items())
    for first in range(0, len(items), tracks_per_part):
        batch = items[first:first + tracks_per_part]
        store.write_part(f"p{first:06d}", [
            {"id": track_id, "sample_rate": rate, "duration": len(codes) / rate,
             "source": f"synthetic:{track_id}", "genre": genre} for track_id, (codes, genre) in batch],
            [codes for _, (codes, _) in batch])
    store.write_index([])
    return url


@pytest.fixture(scope="session")
def tone_store(tmp_path_factory) -> str:
    """Six tracks of tones and chirps (2.5 s each, two 'genres') at 16 kHz."""
    path = str(tmp_path_factory.mktemp("stores") / "tones")
    tracks = {str(i): (synthetic_codes(2.5, kind="tone" if i % 2 else "chirp", seed=i),
                       "tone" if i % 2 else "chirp") for i in range(1, 7)}
    return make_store(path, tracks)


@pytest.fixture
def small_disk(tmp_path):
    """A real 1.2 MB file system (tmpfs, mounted as root as CI runs): disk-full, for real."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture(scope="session")
def music_store(tmp_path_factory) -> str:
    """asc-music's three real songs (game music, 5-7 minutes each) preprocessed at 16 kHz."""
    path = str(tmp_path_factory.mktemp("stores") / "asc-music")
    run_dwave("preprocess", ASC_MUSIC, "--out", path, "--no-progress", check=0)
    return path


@pytest.fixture(scope="session")
def trained_run(tone_store, tmp_path_factory):
    """A tiny genre-conditioned model trained 30 steps on the tone store (for generation)."""
    run = tmp_path_factory.mktemp("runs") / "tones"
    run_dwave("train", tone_store, "--run-dir", run, "--steps", "30", "--window", "256",
              "--warmup-steps", "0", "--lr", "1e-2", "--genre-conditioning", check=0)
    return run
