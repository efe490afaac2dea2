"""`dwave demo`: the whole job end to end on a corpus it synthesises (or a directory you give).

Today: synthesise -> preprocess (Dask) -> describe the store. Training and generation join
the demo as they land.
"""

from __future__ import annotations

import os

from .info import describe_store, format_description
from .preprocess import run_preprocess
from .synth import write_corpus


def run_demo(out: str, source: str | None, songs: int, seconds: float, workers: int | None,
             log=print) -> int:
    os.makedirs(out, exist_ok=True)
    metadata = None
    if source is None:
        source = os.path.join(out, "corpus")
        log(f"[1/2] synthesising {songs} songs of {seconds:.0f} s as MP3 in {source}")
        metadata = write_corpus(source, songs=songs, seconds=seconds)
    store = os.path.join(out, "store")
    log(f"[2/2] preprocessing {source} -> {store}")
    summary = run_preprocess([source], store, workers=workers, metadata=metadata, log=log)
    for line in summary.lines():
        log(line)
    log("")
    log(format_description(describe_store(store)))
    log(f"\ndemo done: the store is {store} (inspect it with `dwave info {store}`)")
    return 0 if summary.store_tracks else 1
