"""`dwave store upgrade`: a version-1 store (one Zarr array per track under tracks/, their
attributes consolidated into the root) converted in place to version 2 (dwave.store.track_store),
without decoding any song again.

Order, so that a killed upgrade is finished by running it again: the parts first (their ids are
digests of their tracks, so a rerun finds the ones already written complete and skips them),
then the index, then the root's version (the switch: until then every other command still sees
a version-1 store and says to upgrade it), and last the old tracks/ group.
"""

from __future__ import annotations

import time

import numpy as np

from ..errors import DwaveError
from .part_codes import SHARD_SAMPLES
from .preprocess import PART_MAX_SONGS
from .track_store import (STORE_FORMAT_VERSION, ZARR_JSON, Index, StoreConfig, TrackStore,
                          part_id_for)

# Samples per part when converting (the songs are decoded already, so a part is sized by its
# codes: 4 shards, a few hundred MB of memory at most while it is written).
UPGRADE_PART_SAMPLES = 4 * SHARD_SAMPLES
V1_TRACK_FIELDS = ("sample_rate", "duration", "genre", "source", "fingerprint",
                   "source_sample_rate", "source_channels", "peak")


def upgrade_store(url: str, storage_options: dict | None = None, log=print) -> dict:
    import uuid

    import zarr

    store = TrackStore(url, storage_options)
    attrs = store.root_attributes()
    version = int(attrs["dwave_store_version"])
    if version == STORE_FORMAT_VERSION:
        log(f"store {store.url} is already version {STORE_FORMAT_VERSION}: nothing to do")
        return {"parts": 0, "tracks": 0}
    if version != 1:
        raise DwaveError(f"store {store.url} is version {version}; this dwave upgrades version "
                         "1 stores only")
    config = StoreConfig(int(attrs["sample_rate"]), int(attrs["quantization_channels"]))
    started = time.perf_counter()
    root = store._open("r+")
    tracks = root["tracks"]
    old = {name: dict(array.attrs) for name, array in tracks.arrays()
           if array.attrs.get("complete") is True}
    log(f"store {store.url}: {len(old)} complete version-1 tracks to convert")
    if "parts" not in root:
        zarr.create_group(f"{store.url}/parts", zarr_format=3, **(
            {"storage_options": store.storage_options} if "://" in store.url else {}))
    done = {p for p, t in store.read_part_tables(store.list_parts()).items() if t is not None}
    written = 0
    for batch in _batches(sorted(old), old):
        part_id = part_id_for([(tid, old[tid].get("fingerprint")) for tid in batch], config)
        if part_id in done:
            continue
        rows = [{"id": tid, **{k: old[tid].get(k) for k in V1_TRACK_FIELDS}} for tid in batch]
        codes = [np.asarray(tracks[tid][:]) for tid in batch]
        store.write_part(part_id, rows, codes)
        written += 1
    v1_index = dict(root["index"].attrs) if "index" in root else {}
    # A new index folded from every part (version 1's lists its tracks as rows of dicts).
    index = store.write_index(list(v1_index.get("failures", [])), base=Index())
    # The switch: the root rewritten whole, without the consolidated metadata of version 1.
    store._write_node(ZARR_JSON, {**attrs, "dwave_store_version": STORE_FORMAT_VERSION,
                                  "store_id": attrs.get("store_id") or uuid.uuid4().hex})
    fs, base = store._filesystem()
    fs.rm(f"{base.rstrip('/')}/tracks", recursive=True)
    log(f"store {store.url}: version {STORE_FORMAT_VERSION}, {len(index.tracks)} tracks in "
        f"{len(index.parts)} parts ({written} written now) in {time.perf_counter() - started:.1f} s")
    return {"parts": written, "tracks": len(index.tracks)}


def _batches(track_ids: list[str], attrs: dict[str, dict]):
    batch, samples = [], 0
    for tid in track_ids:
        length = int(attrs[tid]["length"])
        if batch and (len(batch) >= PART_MAX_SONGS or samples + length > UPGRADE_PART_SAMPLES):
            yield batch
            batch, samples = [], 0
        batch.append(tid)
        samples += length
    if batch:
        yield batch
