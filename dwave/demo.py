"""`dwave demo`: the whole job end to end on a corpus it synthesises (or a directory you give).

synthesise -> preprocess (Dask) -> train the tiny preset with Horovod ranks -> generate songs,
each stage through the same code as the `preprocess`, `train` and `generate` commands; training
runs exactly as a user would start it, `horovodrun -np N dwave train ...`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

from .errors import DwaveError


@dataclass
class DemoConfig:
    out: str = "demo-output"  # the corpus, store, run dir and songs go here
    source: str | None = None  # songs to use instead of synthesising a corpus
    songs: int = 6  # songs to synthesise
    seconds: int = 20  # length of each
    workers: int | None = None  # Dask worker processes; None: one per core
    steps: int = 600  # training steps of the tiny model
    ranks: int = 2  # Horovod ranks, started by horovodrun
    generate_seconds: float = 2.0  # length of each generated song


def run_demo(config: DemoConfig, log=print) -> int:
    out, source, songs, seconds = config.out, config.source, config.songs, config.seconds
    steps, ranks, generate_seconds = config.steps, config.ranks, config.generate_seconds
    from .store.cluster import ClusterConfig
    from .store.info import describe_store, format_description
    from .store.preprocess import run_preprocess
    from .store.synth import write_corpus

    os.makedirs(out, exist_ok=True)
    metadata = None
    if source is None:
        source = os.path.join(out, "corpus")
        log(f"[1/4] synthesising {songs} songs of {seconds:.0f} s as MP3 in {source}")
        metadata = write_corpus(source, songs=songs, seconds=seconds)
    else:
        log(f"[1/4] using the songs in {source}")
    store = os.path.join(out, "store")
    log(f"[2/4] preprocessing {source} -> {store}")
    summary = run_preprocess([source], store, cluster=ClusterConfig(workers=config.workers),
                             metadata=metadata, log=log)
    for line in summary.lines():
        log(line)
    if not summary.store_tracks:
        return 1
    log("")
    log(format_description(describe_store(store)))

    run_dir = os.path.join(out, "run")
    command = train_command(store, run_dir, steps, ranks)
    log(f"\n[3/4] training the tiny WaveNet with {ranks} Horovod rank{'s' if ranks > 1 else ''} "
        f"for {steps} steps -> {run_dir} (rerun to go on from the last checkpoint):\n  "
        + " ".join(command))
    _run_streaming(command, log)

    from .generate.command import GenerateConfig, run_generate

    songs_dir = os.path.join(out, "songs")
    log(f"\n[4/4] generating 2 songs of {generate_seconds:g} s -> {songs_dir}")
    run_generate(GenerateConfig(run_dir=run_dir, out=songs_dir, seconds=generate_seconds,
                                 num_songs=2, temperature=1.0, overwrite=True), log=log)
    log(f"\ndemo done:\n  store        {store}  (`dwave info {store}`)\n"
        f"  model        {run_dir}  (`tensorboard --logdir {run_dir}/tensorboard`)\n"
        f"  learning     {learning_summary(run_dir)}\n"
        f"  songs        {songs_dir}/song-000.wav, song-001.wav (+ .png spectrograms)")
    return 0


def learning_summary(run_dir: str) -> str:
    """The last validation loss against the store's baselines, from RUN_DIR/validation.json."""
    from .model.rundir import read_validation_log, versus_baselines

    log = read_validation_log(run_dir)
    if not log or not log.get("history") or not log.get("baselines"):
        return "no validation recorded (a store of one track holds none out)"
    last, b = log["history"][-1], log["baselines"]
    verdict = ("below the bigram: it learns from context" if last["bits"] < b["bigram_bits"]
               else "not yet below the bigram: train longer (--steps)")
    return (f"validation {last['bits']:.3f} bits/sample at step {last['step']}"
            f"{versus_baselines(last['bits'], b)}: {verdict}")


def train_command(store: str, run_dir: str, steps: int, ranks: int) -> list[str]:
    """`horovodrun -np RANKS dwave train ...` for the tiny preset with the default training flags
    (Gloo: no MPI set-up needed)."""
    train = [sys.executable, "-m", "dwave.cli", "train", store, "--run-dir", run_dir,
             "--preset", "tiny", "--steps", str(steps), "--val-every", str(max(1, steps // 3)),
             "--ckpt-every", "100"]
    if ranks == 1:
        return train
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    if not os.path.exists(horovodrun):
        horovodrun = shutil.which("horovodrun") or ""
    if not horovodrun:
        raise DwaveError("horovodrun not found next to this Python or on PATH: install Horovod "
                         "(bash scripts/setup.sh) or run the demo with --ranks 1")
    return [horovodrun, "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo", *train]


def _run_streaming(command: list[str], log) -> None:
    """Run `command`, passing its output on line by line (horovodrun's "[rank]<stream>:"
    prefixes removed: only rank 0 prints)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        line = line.rstrip("\n")
        if "]<std" in line[:20]:
            line = line.split(">:", 1)[-1]
        if is_tensorflow_chatter(line):
            continue
        log(line)
    if process.wait() != 0:
        raise DwaveError(f"training failed (exit {process.returncode}); its last lines are above")


def is_tensorflow_chatter(line: str) -> bool:
    """TensorFlow's start-up chatter (CPU features, oneDNN), not worth a demo user's attention."""
    return any(marker in line for marker in (
        "cpu_feature_guard", "oneDNN custom operations", "rebuild TensorFlow with the appropriate",
        "To enable the following instructions", "TF_ENABLE_ONEDNN_OPTS"))
