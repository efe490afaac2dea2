"""Songs -> mu-law tracks in the store, in parallel with a Dask bag.

The driver expands the sources, decides which tracks still need doing (resume: from the store's
index and a listing of its parts, never a read of every track), groups them into parts (batches
of songs, so a task's fixed cost is shared by up to PART_MAX_SONGS songs), and hands one part per
bag partition to the cluster; each worker decodes, resamples and encodes its part's songs and
writes them as one part of the store; the driver collects a small result per song, then folds
the new parts into the index. Nothing but those small results travels back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import DwaveError, printable
from .audio import (DEFAULT_MAX_SONG_MINUTES, AudioError, decode_to_mono, encode_in_place,
                    normalisation_gain)
from .cluster import ClusterConfig
from .sources import Source, check_out_apart_from_sources, expand_sources, track_id_order
from .zip_members import ArchivePool
from .track_store import (Index, IndexDamaged, StoreConfig, TrackStore, part_id_for,
                          resolve_storage_options)

# A part holds at most this many songs and this much source data: enough songs that a Dask
# task's fixed cost (tens of milliseconds, about a 30-s clip's decoding) is nothing beside
# their decoding, few enough bytes that a worker holds a part's codes easily (64 MiB of MP3 at
# 128 kbit/s is ~70 min of audio, 67 MB of 16 kHz codes) and a killed task redoes little.
PART_MAX_SONGS = 256
PART_MAX_SOURCE_BYTES = 64 << 20
# ... and the parts are small enough that every worker gets several (load balance).
PARTS_PER_WORKER = 4


@dataclass(frozen=True)
class TrackTask:
    source: Source
    track_id: str
    genre: str | None


@dataclass(frozen=True)
class PartTask:
    part_id: str
    tracks: tuple[TrackTask, ...]


def group_into_parts(tasks: list[TrackTask], config: StoreConfig, workers: int) -> list[PartTask]:
    """Consecutive tasks (longest first, see plan_tasks) grouped into parts of at most
    PART_MAX_SONGS songs and PART_MAX_SOURCE_BYTES, and at most 1/PARTS_PER_WORKER of the work
    of one worker each."""
    total = sum(t.source.size for t in tasks)
    budget = max(1, min(PART_MAX_SOURCE_BYTES, total // max(1, workers * PARTS_PER_WORKER)))
    groups: list[list[TrackTask]] = []
    size = 0
    for task in tasks:
        if not groups or len(groups[-1]) >= PART_MAX_SONGS or size + task.source.size > budget:
            groups.append([])
            size = 0
        groups[-1].append(task)
        size += task.source.size
    return [PartTask(part_id_for([(t.track_id, t.source.fingerprint) for t in group], config),
                     tuple(group)) for group in groups]


def process_part(part: PartTask, store_url: str, storage_options: dict, config: StoreConfig,
                 max_seconds: float = DEFAULT_MAX_SONG_MINUTES * 60) -> list[dict]:
    """Decode a part's songs and write the good ones as one part of the store. Runs on a
    worker; returns a small dict per song.

    Bad audio is a result ("failed" with the reason), not an exception: exceptions are kept for
    infrastructure trouble (an S3 hiccup, a dead disk), which Dask retries (the whole part).
    """
    results, rows, codes = [], [], []
    with ArchivePool() as archives:  # each zip archive opened once for the part's songs
        for task in part.tracks:
            result, row, track_codes = decode_track(task, config, max_seconds, archives)
            results.append(result)
            if track_codes is not None:
                rows.append(row)
                codes.append(track_codes)
    if codes:
        # Outside decode_track's handling: an error while writing is the store's trouble, not
        # a song's, so Dask retries the part rather than reporting songs as unreadable.
        TrackStore(store_url, storage_options).write_part(part.part_id, rows, codes)
    return results


def decode_track(task: TrackTask, config: StoreConfig, max_seconds: float,
                 archives: ArchivePool | None = None):
    """One song's (result, track table row, codes); codes None for a song that failed."""
    started = time.perf_counter()
    result = {"track_id": task.track_id, "source": task.source.uri}
    try:
        with task.source.open(archives) as file:
            decoded = decode_to_mono(file, config.sample_rate, max_seconds)
        gain = normalisation_gain(decoded)
        row = {
            "id": task.track_id,
            "sample_rate": config.sample_rate,
            "duration": round(decoded.duration, 6),
            "source": task.source.uri,
            "fingerprint": task.source.fingerprint,
            "genre": task.genre,
            "source_sample_rate": decoded.source_sample_rate,
            "source_channels": decoded.source_channels,
            "peak": decoded.peak,
            "length_source": decoded.length_source,
            "decoder": decoded.decoder,
        }
        codes = encode_in_place(decoded, gain, config.quantization_channels)
    except AudioError as exc:
        return {**result, "status": "failed", "reason": str(exc)}, None, None
    except (FileNotFoundError, PermissionError, IsADirectoryError, DwaveError) as exc:
        return {**result, "status": "failed", "reason": _os_reason(exc)}, None, None
    return ({**result, "status": "written", "duration": decoded.duration,
             "seconds": time.perf_counter() - started}, row, codes)


def _os_reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read: {exc.strerror}"
    return str(exc)


@dataclass
class Summary:
    store: str
    config: StoreConfig
    sources: int
    written: list[dict] = field(default_factory=list)
    skipped: int = 0
    failures: list[dict] = field(default_factory=list)
    ignored: int = 0
    known_failures: int = 0  # failed in an earlier run, unchanged since: not tried again
    wall_seconds: float = 0.0
    store_tracks: int = 0
    store_hours: float = 0.0

    @property
    def audio_seconds(self) -> float:
        return sum(r["duration"] for r in self.written)

    @property
    def realtime_factor(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def lines(self) -> list[str]:
        out = [
            f"store {self.store}: {self.store_tracks} tracks, {self.store_hours:.2f} h of audio "
            f"at {self.config.sample_rate} Hz",
            f"this run: {len(self.written)} written, {self.skipped} already done, "
            f"{len(self.failures)} failed" + (f", {self.known_failures} known failures not "
                                              "tried again" if self.known_failures else "")
            + f", {self.ignored} non-audio files ignored",
        ]
        if self.written:
            out.append(
                f"processed {self.audio_seconds / 3600:.2f} h of audio in {self.wall_seconds:.1f} s "
                f"({self.realtime_factor:,.0f}x real time, "
                f"{len(self.written) / self.wall_seconds:.2f} songs/s)"
            )
        for failure in self.failures:
            out.append(f"  FAILED {printable(failure['source'])}: "
                       f"{printable(failure['reason'])}")
        return out


def plan_tasks(
    sources: list[Source], genres: dict[str, str], done: dict[str, dict],
    failed: dict[str, dict] | None = None,
) -> tuple[list[TrackTask], int, list[dict], dict[str, str], list[dict]]:
    """Which songs still need processing: (tasks, number already done, id failures, genres to
    set on finished tracks whose --metadata genre differs from the stored one, known failures:
    songs that failed before and are unchanged since, not tried again). `failed` maps a track
    id to its recorded failure; None tries every failed song again."""
    tasks, skipped, failures, relabel, known = [], 0, [], {}, []
    claimed: dict[str, str] = {}
    for source in sources:
        track_id = source.track_id
        if track_id in claimed:
            failures.append({
                "source": source.uri, "track_id": track_id, "duplicate": True,
                "reason": f"duplicate track id {track_id} (also from {claimed[track_id]})",
            })
            continue
        claimed[track_id] = source.uri
        previous = done.get(track_id)
        if previous and previous.get("fingerprint") == source.fingerprint:
            skipped += 1  # done; the same song even if its path changed (a moved archive)
            if track_id in genres and genres[track_id] != previous.get("genre"):
                relabel[track_id] = genres[track_id]
            continue
        if previous and previous.get("source") not in (None, source.uri):
            # 000002.mp3 then, a different 2.wav now: the same id, another song. Replacing
            # the stored track would silently lose the first; the user decides.
            failures.append({
                "source": source.uri, "track_id": track_id,
                "reason": f"track id {track_id} is already in the store from "
                          f"{previous['source']}: rename this file, or --overwrite the store to "
                          "replace it",
            })
            continue
        before = (failed or {}).get(track_id)
        if not previous and before and before.get("fingerprint") == source.fingerprint:
            known.append(before)  # the same bytes fail the same way: not decoded again
            continue
        tasks.append(TrackTask(source, track_id, genres.get(track_id)))
    # Longest first (by file size): the last tasks to finish are then short ones, so workers
    # run out of work at nearly the same time (LPT scheduling; songs differ in length by 10x).
    tasks.sort(key=lambda task: -task.source.size)
    return tasks, skipped, failures, relabel, known


def run_preprocess(
    specs: list[str],
    out: str,
    *,
    sample_rate: int | None = None,
    quantization_channels: int | None = None,
    cluster: ClusterConfig | None = None,
    metadata: str | None = None,
    overwrite: bool = False,
    storage_options: dict | None = None,
    source_storage_options: dict | None = None,
    cache_dir: str | None = None,
    max_song_minutes: float = DEFAULT_MAX_SONG_MINUTES,
    retry_failed: bool = False,
    progress: bool = True,
    log=print,
) -> Summary:
    from .cluster import dask_client
    from .metadata import load_genres

    check_out_apart_from_sources(specs, out)
    genres = load_genres(metadata) if metadata else {}
    store = TrackStore(out, storage_options)
    # The sources' options are their own: {"anon": true} for a public bucket of songs must
    # not make the writes to a private store anonymous (nor the store's keys reach the songs).
    expansion = expand_sources(specs, resolve_storage_options("s3://", source_storage_options),
                               cache_dir)
    config = store.prepare(sample_rate, quantization_channels, overwrite)
    try:
        stored = store.read_index()  # read once: folded now and again at the end of the run
    except IndexDamaged:
        log(f"store {store.url}: its index is damaged; rebuilding it from the parts (the "
            "failures it recorded are forgotten)")
        stored = Index()
    _set_aside_damaged(store, stored, config, log)
    index, _ = store.current_index(base=stored)  # the parts present, no read of every track
    if index.gone:
        log(f"{len(index.gone)} part(s) the index lists are no longer in the store: their "
            "tracks count as not done")
    done = index.tracks.by_id()
    # A failure is the song's (its track id and bytes), wherever it was read from: one bad
    # song seen through two archives is one failure, and an unchanged one is not retried.
    failed = {f["track_id"]: f for f in index.failures if f.get("track_id")}
    tasks, skipped, failures, relabel, known = plan_tasks(
        expansion.sources, genres, done, None if retry_failed else failed)
    relabelled = store.set_genres(relabel, index.tracks) if relabel else set()
    if relabel:
        log(f"--metadata: genre set on {len(relabel)} finished track(s) whose genre it changes")
    unmatched = sorted(set(genres) - {s.track_id for s in expansion.sources} - set(done),
                       key=track_id_order)
    if unmatched:
        log(f"--metadata: {len(unmatched)} track id(s) match no song here or in the store "
            f"(e.g. {printable(', '.join(unmatched[:5]))})")
    summary = Summary(store.url, config, len(expansion.sources), skipped=skipped,
                      ignored=len(expansion.ignored))
    summary.known_failures = len(known)
    log(f"{len(expansion.sources)} songs found: {len(tasks)} to process, {skipped} already in "
        f"the store" + (f", {len(known)} that failed before and are unchanged (not tried "
                        "again; --retry-failed tries them)" if known else "")
        + (f", {len(expansion.ignored)} non-audio files ignored" if expansion.ignored else ""))

    if tasks:
        with dask_client(cluster, log=log) as client:
            parts = group_into_parts(tasks, config, sum(client.nthreads().values()))
            started = time.perf_counter()  # the work, not the cluster's start-up
            results = _compute(client, parts, store, config, progress, max_song_minutes * 60)
            summary.wall_seconds = time.perf_counter() - started
        summary.written = [r for r in results if r["status"] == "written"]
        failures += [r for r in results if r["status"] == "failed"]
    summary.failures = failures

    # Keep earlier runs' failures of songs this run did not try; those it tried are replaced
    # by what happened now (written: gone; failed: the new reason).
    tried = {t.track_id for t in tasks}
    fingerprints = {s.track_id: s.fingerprint for s in expansion.sources}
    touched = {s.uri for s in expansion.sources}
    kept = [f for f in index.failures
            if (f["track_id"] not in tried and f["track_id"] not in done if f.get("track_id")
                else f["source"] not in touched)]  # a record of an older dwave: by its path
    recorded = [{"source": f["source"], "track_id": f["track_id"],
                 "fingerprint": fingerprints.get(f["track_id"]), "reason": f["reason"]}
                for f in failures if not f.get("duplicate")]  # the other source's record holds
    try:
        index = store.write_index(kept + recorded, refresh=relabelled, base=stored)
    except OSError as exc:
        raise DwaveError(
            f"cannot write the index of {store.url} ({type(exc).__name__}: "
            f"{exc.strerror or str(exc)[:120]}): the {len(summary.written)} tracks written are "
            "complete and kept; free space and rerun the same command to rebuild the index"
        ) from None
    summary.store_tracks = len(index.tracks)
    summary.store_hours = sum(index.tracks.columns["duration"]) / 3600
    return summary


def _set_aside_damaged(store: TrackStore, index: Index, config: StoreConfig, log) -> None:
    """Parts whose shards are missing or cut short (one listing) are moved to STORE/damaged/
    (kept), so that their songs count as not done and this run writes them again."""
    damaged = store.damaged_parts(index.tracks.extents(), config.dtype.itemsize)
    for part, why in damaged.items():
        log(f"store {store.url}: parts/{part} is damaged ({why}): moved to "
            f"{store.set_aside(part)}; its songs are written again")


def _compute(client, parts: list[PartTask], store, config, progress,
             max_seconds: float) -> list[dict]:
    import dask.bag as db
    from distributed import as_completed
    from tqdm import tqdm

    # One part per bag partition: parts are sized for load balance (group_into_parts).
    bag = db.from_sequence(parts, npartitions=len(parts)).map(
        process_part, store.url, store.storage_options, config, max_seconds
    )
    # retries: a task whose worker died (OOM, node lost) is rerun elsewhere; the rewrite of a
    # half-written part is safe because parts become visible only when complete.
    futures = client.compute(bag.to_delayed(), retries=2)
    part_of = {future.key: part for future, part in zip(futures, parts)}
    results: list[dict] = []
    bar = tqdm(total=sum(len(p.tracks) for p in parts), unit="song", disable=not progress,
               dynamic_ncols=True, mininterval=0.5, desc="preprocess")
    audio_seconds = 0.0
    with bar:
        for future in as_completed(futures):
            part = part_of[future.key]
            try:
                (batch,) = future.result()  # the partition's one element: the part's results
            except Exception as exc:  # noqa: BLE001 - any worker-side crash becomes a failure
                batch = [{"track_id": task.track_id, "source": task.source.uri,
                          "status": "failed",
                          "reason": f"worker error: {exc.__class__.__name__}: {exc}"}
                         for task in part.tracks]
            for result in batch:
                results.append(result)
                if result["status"] == "failed":
                    bar.write(f"  failed, skipped: {printable(result['source'])}: "
                              f"{printable(result['reason'])}")
                else:
                    audio_seconds += result["duration"]
                    bar.set_postfix_str(f"{audio_seconds / 3600:.2f} h audio", refresh=False)
            bar.update(len(part.tracks))
    return results
