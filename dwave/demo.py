"""`dwave demo`: the whole job end to end on a corpus it synthesises (or a directory you give).

synthesise -> preprocess (Dask) -> train the tiny preset -> generate songs, each stage through
the same functions as the `preprocess`, `train` and `generate` commands.
"""

from __future__ import annotations

import os

from .cluster import ClusterOptions
from .info import describe_store, format_description
from .preprocess import run_preprocess
from .synth import write_corpus


def run_demo(out: str, source: str | None, songs: int, seconds: float, workers: int | None,
             steps: int = 300, generate_seconds: float = 2.0, log=print) -> int:
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
    summary = run_preprocess([source], store, cluster=ClusterOptions(workers=workers),
                             metadata=metadata, log=log)
    for line in summary.lines():
        log(line)
    if not summary.store_tracks:
        return 1
    log("")
    log(format_description(describe_store(store)))

    from .generate import GenerateOptions, run_generate
    from .train import TrainConfig, run_training

    run_dir = os.path.join(out, "run")
    log(f"\n[3/4] training the tiny WaveNet for {steps} steps -> {run_dir} (rerun to go on "
        "from the last checkpoint)")
    run_training(TrainConfig(store=store, steps=steps, batch_size=4, lr=1e-2, warmup_steps=20,
                             window=1024, val_every=max(1, steps // 3), ckpt_every=100),
                 run_dir, preset="tiny", log=log)
    songs_dir = os.path.join(out, "songs")
    log(f"\n[4/4] generating 2 songs of {generate_seconds:g} s -> {songs_dir}")
    run_generate(GenerateOptions(run_dir=run_dir, out=songs_dir, seconds=generate_seconds,
                                 num_songs=2, temperature=1.0), log=log)
    log(f"\ndemo done:\n  store        {store}  (`dwave info {store}`)\n"
        f"  model        {run_dir}  (`tensorboard --logdir {run_dir}/tensorboard`)\n"
        f"  songs        {songs_dir}/song-000.wav, song-001.wav (+ .png spectrograms)")
    return 0
