"""`dwave store verify`: is every track of a store all there? One listing of parts/ (the shard
objects' names and sizes against what the track table says they hold), no codes read; with
--repair, damaged parts are moved aside (to STORE/damaged/, kept) and the index drops their
tracks, so that a preprocess rerun writes them again.

With --against-source, every track's source is decoded again (on a Dask cluster, as preprocess
does) and its length compared with the stored one: a store written by a dwave that trusted an
MP3's estimated length (before the decoders of dwave.store.decoders) names the songs it cut
short, and --repair sets their parts aside to be written again in full."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DwaveError, printable
from .audio import AudioError, decode_to_mono
from .sources import Source
from .track_store import TrackStore
from .zip_members import ArchivePool

#: A stored length this far from the source's decode is a song stored wrong, not rounding.
LENGTH_TOLERANCE_SECONDS = 0.05
#: Songs re-measured per Dask task: enough to share a task's fixed cost.
SONGS_PER_TASK = 32


@dataclass(frozen=True)
class Remeasured:
    track_id: str
    part: str
    source: str
    stored_seconds: float
    source_seconds: float | None  # None: the source could not be decoded (reason says why)
    reason: str = ""

    @property
    def differs(self) -> bool:
        return self.source_seconds is None or \
            abs(self.source_seconds - self.stored_seconds) > LENGTH_TOLERANCE_SECONDS

    def line(self) -> str:
        if self.source_seconds is None:
            return f"track {self.track_id} ({printable(self.source)}): cannot re-measure: " \
                   f"{printable(self.reason)}"
        return (f"track {self.track_id} ({printable(self.source)}): stored "
                f"{self.stored_seconds:.2f} s, the source decodes to {self.source_seconds:.2f} s "
                f"({self.source_seconds - self.stored_seconds:+.2f} s)")


def _remeasure(rows: list[dict], sample_rate: int,
               source_storage_options: dict) -> list[Remeasured]:
    """Decode each row's source again (runs on a worker); the same decode as preprocess, with
    each zip archive opened once for the batch."""
    out = []
    with ArchivePool() as archives:
        for row in rows:
            out.append(_remeasure_one(row, sample_rate, source_storage_options, archives))
    return out


def _remeasure_one(row: dict, sample_rate: int, source_storage_options: dict,
                   archives: ArchivePool) -> Remeasured:
    stored = row["length"] / sample_rate
    source = Source(row["source"], row.get("fingerprint") or "", 0,
                    {} if row["source"].startswith(("http://", "https://"))
                    else source_storage_options)
    try:
        with source.open(archives) as file:
            seconds = decode_to_mono(file, sample_rate).duration
    except (AudioError, OSError, ValueError, DwaveError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return Remeasured(row["id"], row["part"], row["source"], stored, None, reason)
    return Remeasured(row["id"], row["part"], row["source"], stored, seconds)


def remeasure_store(store: TrackStore, rows: list[dict], sample_rate: int, cluster=None,
                    source_storage_options: dict | None = None, progress: bool = True,
                    log=print) -> list[Remeasured]:
    """Every row's source decoded again on a Dask cluster; the rows whose length differs."""
    import dask.bag as db
    from distributed import as_completed
    from tqdm import tqdm

    from .cluster import dask_client

    # By source: a batch's zip members then share their archive (its directory read once)
    rows = sorted(rows, key=lambda row: row["source"])
    batches = [rows[i:i + SONGS_PER_TASK] for i in range(0, len(rows), SONGS_PER_TASK)]
    results: list[Remeasured] = []
    with dask_client(cluster, log=log) as client:
        bag = db.from_sequence(batches, npartitions=max(1, len(batches))).map(
            _remeasure, sample_rate, source_storage_options or {})
        futures = client.compute(bag.to_delayed(), retries=2)
        with tqdm(total=len(rows), unit="song", disable=not progress, dynamic_ncols=True,
                  mininterval=0.5, desc="re-measuring") as bar:
            for future in as_completed(futures):
                (batch,) = future.result()
                results.extend(batch)
                bar.update(len(batch))
    return [r for r in results if r.differs]


def verify_store(url: str, storage_options: dict | None = None, repair: bool = False,
                 log=print, against_source: bool = False, cluster=None,
                 source_storage_options: dict | None = None, progress: bool = True) -> bool:
    """Whether the store is whole (after a repair: whether nothing is left to repair)."""
    store = TrackStore(url, storage_options)
    config = store.config()
    index = store.read_index()
    table = index.tracks.columns
    damaged = store.damaged_parts(index.tracks.extents(), config.dtype.itemsize)
    if against_source:
        differ = remeasure_store(store, index.tracks.rows(), config.sample_rate, cluster,
                                 source_storage_options, progress, log)
        unmeasured = [r for r in differ if r.source_seconds is None]
        log(f"store {store.url}: the sources of {len(index.tracks)} track(s) decoded again: "
            f"{len(differ) - len(unmeasured)} stored at a length more than "
            f"{LENGTH_TOLERANCE_SECONDS * 1000:.0f} ms from their source's, {len(unmeasured)} "
            "whose source cannot be decoded now")
        for r in differ:
            log("  " + r.line())
        for r in differ:  # a source that cannot be read now is reported, its track kept
            if r.source_seconds is not None:
                damaged.setdefault(r.part, "holds tracks stored shorter or longer than their "
                                            "sources")
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
