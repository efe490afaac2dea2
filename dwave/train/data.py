"""Training spans drawn uniformly over every sample of every track in a store.

Two lengths, two names: a *window* is the samples a step predicts per sequence (`--window`),
a *span* the samples read from the store for it (ModelConfig.span: the receptive field more).
No pre-cut chunks: a span may start at any sample of any
track long enough to hold it, each start equally likely, so long songs weigh in proportion to
their length (as nanoGPT samples its windows from one flat token file).

Batches are a pure function of (seed, rank, step): each Horovod rank draws its own independent
stream, a run resumed at step k draws fresh windows rather than replaying steps 0..k, and a
test can rebuild exactly the batch any rank trained on. Validation tracks are held out by a
hash of their id, so the split never changes as the store grows.

Where the codes live:

* "memory" (default while the training tracks fit in `cache_bytes`): the parts' shards are
  memory-mapped (a store on S3 is first copied once per node into a node cache, see
  dwave.store.node_cache), so the codes live once in the node's page cache, shared by all of its
  ranks; a window is then a slice. What a store of a few thousand songs needs (an hour of
  16 kHz audio is 58 MB).
* "stream": each window is one byte-range read from the store as it is drawn (the store may be
  any size, local or on S3), a batch's reads in flight together, by a pool of tf.data workers
  ahead of the training step.

Both go through the same tf.data pipeline: step numbers -> parallel batch assembly -> prefetch.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import DwaveError
from ..model.config import DEFAULT_CONDITION
from .config import DATA_MODES, DEFAULT_CACHE_BYTES, STREAM_WINDOWS_PER_READ
from ..store.track_store import TrackStore

# tf.data iterators a stopped run left before their end (WindowSampler.batches).
_LEFT_OPEN: list = []
UNKNOWN_VALUE = "unknown"  # the condition value of a track the store has none for
# Grouped reads (WindowSampler): windows planned per round, and rounds kept in memory.
ROUND_WINDOWS = 512
ROUNDS_KEPT = 4
_ROUND_TAG = 0x726F756E64  # keeps round streams apart from per-step ones ("round")


class _Round:
    """A round being read by one thread, waited for by the others."""

    def __init__(self):
        self.ready = threading.Event()
        self.value = None
        self.error: BaseException | None = None


@dataclass(frozen=True)
class Track:
    id: str
    length: int
    condition: str  # the track's value of the run's condition (its genre, today)
    part: str = ""  # where its codes are: parts/<part>/codes[offset:offset + length]
    offset: int = 0


def is_validation_track(track_id: str, fraction: float) -> bool:
    """A stable, store-independent split: the same track is always on the same side."""
    digest = hashlib.sha256(track_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_tracks(tracks: list[Track], fraction: float) -> tuple[list[Track], list[Track]]:
    """(train, validation). With fewer than two tracks nothing is held out; with a hash split
    that leaves either side empty, the shortest track goes to validation."""
    if fraction <= 0 or len(tracks) < 2:
        return list(tracks), []
    val = [t for t in tracks if is_validation_track(t.id, fraction)]
    train = [t for t in tracks if not is_validation_track(t.id, fraction)]
    if not val or not train:
        ordered = sorted(tracks, key=lambda t: (t.length, t.id))
        val, train = ordered[:1], ordered[1:]
    return train, val


def grouped_starts(rng, cumulative_starts: np.ndarray, lengths: np.ndarray, span: int,
                   windows: int, per_read: int):
    """`windows` window (track, start) pairs drawn in groups of `per_read` that share one read:
    each group's first window is uniform over every valid start (as ungrouped draws are), and
    its block, `per_read` spans long (the whole track if shorter), is placed at a uniform offset
    around it (clipped to the track); the rest of the group is uniform within the block. So
    bytes read per window stay one span, and the marginal stays close to uniform. Returns
    (track, start, block start, block end), one entry per window, groups consecutive."""
    groups = -(-windows // per_read)
    draws = rng.integers(0, int(cumulative_starts[-1]), groups)
    track = np.searchsorted(cumulative_starts, draws, side="right")
    anchor = draws - np.where(track > 0, cumulative_starts[track - 1], 0)
    length = lengths[track]
    extent = np.minimum(per_read * span, length)
    block = np.clip(anchor - rng.integers(0, extent - span + 1), 0, length - extent)
    others = block[:, None] + rng.integers(0, (extent - span + 1)[:, None],
                                           (groups, per_read - 1))
    starts = np.concatenate([anchor[:, None], others], axis=1).reshape(-1)[:windows]
    rep = lambda a: np.repeat(a, per_read)[:windows]  # noqa: E731
    return rep(track), starts, rep(block), rep(block + extent)


class WindowSampler:
    """Batches of windows from a list of tracks. `batch(rank, step)` is deterministic.

    `windows_per_read` > 1 (stream mode's default, STREAM_WINDOWS_PER_READ): the windows of a
    round of steps (ROUND_WINDOWS windows) are drawn in groups that share one byte-range read
    (grouped_starts) and then shuffled across the round's steps, so a batch's windows still
    come from different places while the store sees `windows_per_read` times fewer requests
    (what a rank on S3 needs: each request costs milliseconds of CPU on both ends). A round is
    read once, when its first batch is asked for, and kept while its steps are served.
    """

    def __init__(self, store: TrackStore, tracks: list[Track], values: list[str], span: int,
                 batch_size: int, seed: int, stream: int, mode: str, dtype=np.uint8,
                 concurrency: int = 64, windows_per_read: int = 1,
                 store_id: str | None = None):
        self.store, self.tracks, self.span = store, tracks, span
        self.store_id = store_id  # what a failed read compares the store with
        self.dtype = np.dtype(dtype)  # the store's: codes above 255 must never wrap
        self.batch_size, self.seed, self.stream_id, self.mode = batch_size, seed, stream, mode
        value_index = {v: i for i, v in enumerate(values)}
        self.track_condition = np.array([value_index.get(t.condition, 0) for t in tracks],
                                        np.int32)
        # Window starts available in each track, and their running total: a uniform draw over
        # the total, located with searchsorted, is a uniform draw over every valid start.
        self.lengths = np.array([t.length for t in tracks], np.int64)
        self.cumulative_starts = np.cumsum(self.lengths - span + 1)
        self.total_starts = int(self.cumulative_starts[-1])
        self.concurrency = concurrency  # stream mode: byte-range reads in flight per batch
        self.windows_per_read = windows_per_read
        self.steps_per_round = max(1, ROUND_WINDOWS // batch_size)
        self.mapped = None  # memory mode: the mapped shards, once load() ran
        self.failure: DwaveError | None = None  # a read that failed inside tf.data (dataset())
        self._local = threading.local()  # stream mode: a reader per tf.data worker thread
        self._rounds: dict = {}  # (rank, round) -> _Round, the last few
        self._rounds_lock = threading.Lock()

    def load(self, log=None) -> None:
        """Memory mode: map the tracks' shards (a remote store's copied to the node cache
        first, once per node). Stream mode: nothing."""
        if self.mode == "memory" and self.mapped is None:
            from ..store.node_cache import local_copy

            self.mapped = self.store.mapped_reader(self.dtype,
                                                   local_copy(self.store, self.tracks, log))
            # Every track mapped whole (views, nothing copied): a shard missing or cut short is
            # an error now, naming its track, not a failed batch later.
            self.read([(i, 0, t.length) for i, t in enumerate(self.tracks)])

    def _reader(self):
        if self.mode == "memory":
            return self.mapped
        if getattr(self._local, "reader", None) is None:
            self._local.reader = self.store.range_reader(self.dtype, self.concurrency)
        return self._local.reader

    def read(self, windows: list[tuple[int, int, int]]) -> list[np.ndarray]:
        """[(track index, first sample, end sample)] -> their codes. A track that cannot be
        read is a one-line DwaveError naming it and what to do."""
        ranges = [(self.tracks[t].part, self.tracks[t].offset + a, self.tracks[t].offset + b)
                  for t, a, b in windows]
        try:
            return self._reader().read(ranges)
        except Exception:  # noqa: BLE001 - find the track, then say what failed for it
            for (t, _, _), one in zip(windows, ranges):
                try:
                    self._reader().read([one])
                except Exception as exc:  # noqa: BLE001
                    raise self.store.unreadable(self.tracks[t].id, self.tracks[t].part,
                                                exc, self.store_id) from None
            raise

    def code_chunks(self, max_stream_batches: int = 64):
        """The sampler's codes for fitting baselines: every track whole in memory mode; in
        stream mode (a store too big to hold) the windows of its first `max_stream_batches`
        batches (rank 0), which is a uniform sample of the tracks."""
        if self.mode == "memory":
            for i, track in enumerate(self.tracks):
                yield self.read([(i, 0, track.length)])[0]
        else:
            for step in range(max_stream_batches):
                yield from self.batch(0, step)[0]

    def locate(self, rank: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(track index, start within the track) of each window of this rank's batch."""
        if self.windows_per_read > 1:
            track, start, _, _ = self._round_plan(rank, step // self.steps_per_round)
            rows = slice((step % self.steps_per_round) * self.batch_size,
                         (step % self.steps_per_round + 1) * self.batch_size)
            return track[rows], start[rows]
        rng = np.random.default_rng([self.seed, self.stream_id, rank, step])
        draws = rng.integers(0, self.total_starts, self.batch_size)
        track = np.searchsorted(self.cumulative_starts, draws, side="right")
        before = np.where(track > 0, self.cumulative_starts[track - 1], 0)
        return track, draws - before

    def _round_plan(self, rank: int, round_: int):
        """The round's windows in the order its steps take them: (track, start, block start,
        block end) of each."""
        rng = np.random.default_rng([self.seed, self.stream_id, rank, _ROUND_TAG, round_])
        plan = grouped_starts(rng, self.cumulative_starts, self.lengths, self.span,
                              self.steps_per_round * self.batch_size, self.windows_per_read)
        order = rng.permutation(len(plan[0]))
        return tuple(a[order] for a in plan)

    def batch(self, rank: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes (batch, span) of the store's dtype, condition int32 (batch,))."""
        if self.windows_per_read > 1:
            codes, track = self._round(rank, step // self.steps_per_round)
            rows = slice((step % self.steps_per_round) * self.batch_size,
                         (step % self.steps_per_round + 1) * self.batch_size)
            return codes[rows], self.track_condition[track[rows]]
        track, start = self.locate(rank, step)
        codes = np.empty((self.batch_size, self.span), self.dtype)
        windows = self.read([(int(t), int(s), int(s) + self.span) for t, s in zip(track, start)])
        for row, window in enumerate(windows):
            codes[row] = window
        return codes, self.track_condition[track]

    def _round(self, rank: int, round_: int) -> tuple[np.ndarray, np.ndarray]:
        """A round's codes (its windows, in step order) and tracks: read once (the first
        thread to ask reads; tf.data's others wait for it), kept for the next few rounds."""
        key = (rank, round_)
        with self._rounds_lock:
            entry = self._rounds.get(key)
            owner = entry is None
            if owner:
                entry = self._rounds[key] = _Round()
                for old in sorted(self._rounds)[:-ROUNDS_KEPT]:
                    del self._rounds[old]
        if owner:
            try:
                entry.value = self._read_round(rank, round_)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting thread
                entry.error = exc
            finally:
                entry.ready.set()
        entry.ready.wait()
        if entry.error is not None:
            raise entry.error
        return entry.value

    def _read_round(self, rank: int, round_: int):
        track, start, block, end = self._round_plan(rank, round_)
        blocks = {}  # (track, block start) -> block end: one read each
        for t, b, e in zip(track.tolist(), block.tolist(), end.tolist()):
            blocks[(t, b)] = e
        keys = list(blocks)
        read = dict(zip(keys, self.read([(t, b, blocks[(t, b)]) for t, b in keys])))
        codes = np.empty((len(track), self.span), self.dtype)
        for row, (t, s, b) in enumerate(zip(track.tolist(), start.tolist(), block.tolist())):
            codes[row] = read[(t, b)][s - b:s - b + self.span]
        return codes, track

    def dataset(self, rank: int, first_step: int, last_step: int, parallel: int = 4):
        """A tf.data pipeline of this rank's batches for steps [first_step, last_step)."""
        import tensorflow as tf

        def assemble(step):
            # A failed read is kept, not raised: TensorFlow would print each parallel call's
            # traceback. The placeholder returned is never used: batches() raises the kept
            # error before it yields anything that came after it.
            try:
                return self.batch(rank, int(step))
            except DwaveError as exc:
                self.failure = self.failure or exc
                return (np.zeros((self.batch_size, self.span), self.dtype),
                        np.zeros(self.batch_size, np.int32))

        steps = tf.data.Dataset.range(first_step, last_step)
        batches = steps.map(
            lambda s: tf.numpy_function(assemble, [s], (tf.as_dtype(self.dtype), tf.int32),
                                        stateful=False),
            num_parallel_calls=parallel, deterministic=True)
        shape = ((self.batch_size, self.span), (self.batch_size,))
        batches = batches.map(lambda c, g: (tf.ensure_shape(c, shape[0]),
                                            tf.ensure_shape(g, shape[1])))
        return batches.prefetch(max(2, parallel))

    def batches(self, rank: int, first_step: int, last_step: int, parallel: int = 4):
        """Iterate dataset()'s batches. A batch that failed inside the pipeline (a track that
        cannot be read) comes back from TensorFlow as an OpError carrying the DwaveError's text:
        it is raised again as that one-line DwaveError."""
        import tensorflow as tf

        self.failure = None
        iterator = iter(self.dataset(rank, first_step, last_step, parallel))
        exhausted = False
        try:
            for batch in iterator:
                if self.failure is not None:  # set before any batch after it is made
                    raise self.failure
                yield batch
            exhausted = True
        except GeneratorExit:
            # Left early (a stop): deleting a tf.data iterator whose parallel reads are in
            # flight can hang for seconds on the GIL, past a launcher's kill. It is kept
            # instead; the process's exit frees it.
            _LEFT_OPEN.append(iterator)
            raise
        except tf.errors.OpError as exc:
            said = re.search(r"DwaveError: (.*)", exc.message)
            raise DwaveError(said.group(1) if said else "reading a training batch failed: "
                             + exc.message.strip().splitlines()[0]) from None


@dataclass
class TrainingData:
    """The store, opened for training: the condition's values, the split, a sampler per side."""

    train: WindowSampler
    validation: WindowSampler | None
    condition_values: list[str]
    sample_rate: int
    quantization_channels: int  # quantization channels of the store's codes
    train_samples: int
    left_out: dict  # {"tracks": N, "values": [...]}: tracks of values the run does not know;
    #                 "damaged": [Track]: tracks --on-bad-track skip left out

    def load(self, log=None) -> None:
        """Map the tracks (memory mode; a remote store is copied to the node cache first): the
        slow part of opening, kept apart so that a caller can check everything else first."""
        for sampler in (self.train, self.validation):
            if sampler is not None:
                sampler.load(log)


def list_tracks(store: TrackStore, condition: str = DEFAULT_CONDITION) -> list[Track]:
    """The store's tracks (its index, with parts written since folded in and parts removed
    since left out), each with its value of `condition` (a column of the track table)."""
    index, _ = store.current_index()
    return [Track(str(t["id"]), int(t["length"]), t.get(condition) or UNKNOWN_VALUE,
                  t["part"], int(t["offset"]))
            for t in sorted(index.tracks.rows(), key=lambda t: str(t["id"]))]


@dataclass
class StoreScan:
    """What training needs to know of a store before a model exists: its tracks, the values of
    the condition, its sample rate and quantization channels."""

    store: TrackStore
    tracks: list[Track]
    condition: str  # the track attribute the tracks are labelled by (a genre, today)
    condition_values: list[str]  # sorted; tracks without one have UNKNOWN_VALUE
    sample_rate: int
    quantization_channels: int  # quantization channels of the store's codes
    dtype: np.dtype
    store_id: str | None = None  # the store's identity when scanned: a replaced store is not it


def scan_store(store_url: str, storage_options: dict | None = None,
               condition: str = DEFAULT_CONDITION) -> StoreScan:
    """Read a store's index, with a clear error for one that is not a store or is empty."""
    store = TrackStore(store_url, storage_options)
    config = store.config()  # a clear error if this is not a store
    tracks = list_tracks(store, condition)
    if not tracks:
        raise DwaveError(f"store {store.url} holds no tracks: run `dwave preprocess` into it "
                         "first")
    return StoreScan(store, tracks, condition, sorted({t.condition for t in tracks}),
                     config.sample_rate, config.quantization_channels, config.dtype,
                     store.identity())


def open_samplers(scan: StoreScan, span: int, batch_size: int, seed: int,
                  validation_fraction: float = 0.1, cache_bytes: int = DEFAULT_CACHE_BYTES,
                  mode: str | None = None, values: list[str] | None = None,
                  load: bool = True, windows_per_read: int | None = None,
                  validation_windows: tuple[int, int, int] | None = None,
                  on_bad_track: str | None = "stop") -> TrainingData:
    """The training and validation samplers of spans of `span` samples (ModelConfig.span: the
    receptive field + the predicted window), with a clear error for a store that cannot feed one.
    `load=False` leaves reading the tracks to TrainingData.load(). `validation_windows`:
    (span, batch size, seed) of the validation windows, where they differ from training's (a
    resumed run scores the windows it started with).

    `values`: the condition's vocabulary (a resumed run's, from its config); default: the
    store's. Tracks of a value outside a given vocabulary are left out and counted (a
    conditioned model has no embedding for them: relabelling them would teach it wrong).

    Every track used is checked to be all there first (its part's shards present and whole:
    one listing of parts/, no codes read): a damaged one stops the run (`on_bad_track` "stop")
    or is left out and counted ("skip"); None leaves the check to a later call.
    """
    store, tracks = scan.store, scan.tracks
    usable = [t for t in tracks if t.length >= span]
    if not usable:
        longest = max(t.length for t in tracks)
        raise DwaveError(
            f"store {store.url} has no track as long as one training window ({span} samples ="
            f" receptive field + --window); its longest is {longest} samples: use a smaller "
            "--window or preset, or add longer songs")
    if values is None:
        values = scan.condition_values
    known = set(values)
    left_out = [t for t in usable if t.condition not in known]
    unknown = sorted({t.condition for t in left_out})
    usable = [t for t in usable if t.condition in known]
    if not usable:
        raise DwaveError(f"store {store.url}: no track has a {scan.condition} this run knows "
                         f"({', '.join(values)}); the store has {', '.join(unknown)}: start a "
                         "new --run-dir to condition on them")
    usable, damaged = _whole_tracks(store, usable, tracks, scan.dtype.itemsize, on_bad_track)
    train, val = split_tracks(usable, validation_fraction)
    train_bytes = sum(t.length for t in train) * scan.dtype.itemsize
    if mode is None:
        mode = "memory" if train_bytes <= cache_bytes else "stream"
    if mode not in DATA_MODES:
        raise DwaveError(f"data mode must be one of {', '.join(DATA_MODES)}, got {mode!r}")
    if windows_per_read is None:
        windows_per_read = STREAM_WINDOWS_PER_READ if mode == "stream" else 1
    make = lambda ts, stream, span, batch_size, seed: WindowSampler(  # noqa: E731
        store, ts, values, span, batch_size, seed, stream, mode, scan.dtype,
        windows_per_read=windows_per_read, store_id=scan.store_id)
    val_span, val_batch, val_seed = validation_windows or (span, batch_size, seed)
    val = [t for t in val if t.length >= val_span]
    data = TrainingData(
        train=make(train, 0, span, batch_size, seed),
        validation=make(val, 1, val_span, val_batch, val_seed) if val else None,
        condition_values=values,
        sample_rate=scan.sample_rate,
        quantization_channels=scan.quantization_channels,
        train_samples=sum(t.length for t in train),
        left_out={"tracks": len(left_out), "values": unknown, "damaged": damaged},
    )
    if load:
        data.load()
    return data


ON_BAD_TRACK = ("stop", "skip")


def _whole_tracks(store: TrackStore, tracks: list[Track], every_track: list[Track],
                  itemsize: int, on_bad_track: str | None) -> tuple[list[Track], list[Track]]:
    """(tracks all there, tracks in damaged parts); a DwaveError for any damaged under "stop".
    `every_track`: the store's, for the full size of each part (a part's tracks this run
    leaves out still fill its shards)."""
    if on_bad_track is None:
        return tracks, []
    if on_bad_track not in ON_BAD_TRACK:
        raise DwaveError(f"--on-bad-track must be one of {', '.join(ON_BAD_TRACK)}, got "
                         f"{on_bad_track!r}")
    used = {t.part for t in tracks}
    damaged = store.damaged_parts([(t.part, t.offset, t.length) for t in every_track
                                   if t.part in used], itemsize)
    bad = [t for t in tracks if t.part in damaged]
    if bad and on_bad_track == "stop":
        part, why = next(iter(damaged.items()))
        raise DwaveError(
            f"store {store.url}: {len(bad)} track(s) in {len(damaged)} damaged part(s) (e.g. "
            f"parts/{part}: {why}; track {next(t.id for t in bad if t.part == part)}): "
            f"`dwave store verify {store.url} --repair` sets them aside so that a preprocess "
            "rerun writes them again, or train without them: --on-bad-track skip")
    return [t for t in tracks if t.part not in damaged], bad


def open_training_data(store_url: str, span: int, batch_size: int, seed: int,
                       validation_fraction: float = 0.1, storage_options: dict | None = None,
                       cache_bytes: int = DEFAULT_CACHE_BYTES, mode: str | None = None,
                       values: list[str] | None = None, load: bool = True,
                       windows_per_read: int | None = None) -> TrainingData:
    """scan_store then open_samplers, for callers that know the span already."""
    return open_samplers(scan_store(store_url, storage_options), span, batch_size, seed,
                         validation_fraction, cache_bytes, mode, values, load,
                         windows_per_read)
