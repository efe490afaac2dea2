"""One copy per node of a remote store's training shards, for memory mode.

Memory mode maps the shards of the training tracks (dwave.store.part_codes.MappedReader). A store on
a local or shared file system is mapped where it is: the page cache holds each page once for
every rank of the node. A store on S3 is first copied into a node-local directory, by the first
rank of the node to get there (an flock serialises them; the others find the copy done): one
download and one copy in memory per node, not one per rank.

The cache directory: $DWAVE_NODE_CACHE, else /dev/shm (memory, where the data is read from
anyway) when it can be written, else the system's temporary directory. Each store has its own
folder there, named by the store's id, so a store rewritten with --overwrite (a new id) never
reads another's copy. Each shard is written under a temporary name and renamed: a killed copy
leaves no shard cut short under its real name.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time

from ..errors import DwaveError
from .part_codes import SHARD_SAMPLES, shard_key
from .track_store import TrackStore, is_remote

COPY_BATCH = 16  # shards fetched at once (16 x 16 MiB in memory at most)


def cache_root() -> str:
    if os.environ.get("DWAVE_NODE_CACHE"):
        return os.environ["DWAVE_NODE_CACHE"]
    if os.access("/dev/shm", os.W_OK):
        return f"/dev/shm/dwave-node-cache-{os.getuid()}"
    return os.path.join(tempfile.gettempdir(), f"dwave-node-cache-{os.getuid()}")


def shards_of(tracks) -> list[str]:
    """The shard keys (relative to the store's root) that hold `tracks`' codes."""
    keys = set()
    for t in tracks:
        first, last = t.offset // SHARD_SAMPLES, (t.offset + t.length - 1) // SHARD_SAMPLES
        keys.update(shard_key(t.part, k) for k in range(first, last + 1))
    return sorted(keys)


def local_copy(store: TrackStore, tracks, log=None) -> str | None:
    """The local root to map `tracks` from: None (the store itself) for a local store, else
    this node's cache of the store, filled with the shards it lacks."""
    if not is_remote(store.url):
        return None
    root = os.path.join(cache_root(), store.root_attributes().get("store_id") or "unnamed")
    try:
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one rank of the node copies, the others wait
            missing = [k for k in shards_of(tracks) if not os.path.exists(os.path.join(root, k))]
            if missing:
                _fetch(store, root, missing, log)
    except OSError as exc:
        raise DwaveError(f"node cache {root}: cannot fill it ({exc.strerror or exc}): free "
                         "space there, set DWAVE_NODE_CACHE to a larger local directory, or use "
                         "--data-mode stream") from None
    return root


def _fetch(store: TrackStore, root: str, keys: list[str], log) -> None:
    fs, _ = store._filesystem()
    started = time.perf_counter()
    copied = 0
    for i in range(0, len(keys), COPY_BATCH):
        batch = keys[i:i + COPY_BATCH]
        blobs = fs.cat([store._path(k) for k in batch], on_error="raise")
        for key in batch:
            blob = blobs[store._path(key)]
            path = os.path.join(root, key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            partial = f"{path}.partial-{os.getpid()}"
            with open(partial, "wb") as f:
                f.write(blob)
            os.replace(partial, path)
            copied += len(blob)
    if log:
        log(f"node cache {root}: copied {len(keys)} shard(s), {copied / 1e6:.0f} MB, in "
            f"{time.perf_counter() - started:.1f} s")
