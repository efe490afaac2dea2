"""`dwave store verify`: is every track of a store all there? One listing of parts/ (the shard
objects' names and sizes against what the track table says they hold), no codes read; with
--repair, damaged parts are moved aside (to STORE/damaged/, kept) and the index drops their
tracks, so that a preprocess rerun writes them again."""

from __future__ import annotations

from .track_store import TrackStore


def verify_store(url: str, storage_options: dict | None = None, repair: bool = False,
                 log=print) -> bool:
    """Whether the store is whole (after a repair: whether nothing is left to repair)."""
    store = TrackStore(url, storage_options)
    config = store.config()
    index = store.read_index()
    table = index.tracks.columns
    damaged = store.damaged_parts(index.tracks.extents(), config.dtype.itemsize)
    holds: dict[str, list[str]] = {}
    for track_id, part in zip(table["id"], table["part"]):
        if part in damaged:
            holds.setdefault(part, []).append(track_id)
    log(f"store {store.url}: {len(index.parts)} parts, {len(index.tracks)} tracks checked (one "
        "listing of parts/, no codes read): " + (
            "every shard there, whole" if not damaged else
            f"{len(damaged)} damaged part(s) holding {sum(map(len, holds.values()))} track(s)"))
    for part, why in damaged.items():
        names = holds.get(part, [])
        log(f"  parts/{part}: {why} (tracks {', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''})")
    if not damaged:
        return True
    if not repair:
        log("`dwave store verify STORE --repair` moves them aside (kept under STORE/damaged/) "
            "so that a preprocess rerun writes their tracks again")
        return False
    for part in damaged:
        log(f"  moved parts/{part} to {store.set_aside(part)}")
    index = store.write_index(index.failures, base=index)
    log(f"store {store.url}: {len(index.tracks)} tracks left; rerun `dwave preprocess SOURCE "
        f"--out {store.url}` to write the {sum(map(len, holds.values()))} set aside again")
    return True
