"""The track store: a Zarr (format 3) group, on local disk or ``s3://bucket/prefix``.

Layout (a contract that ``train``, ``info`` and users' own scripts read)::

    STORE/                      root attrs: dwave_store_version, sample_rate, quantization_channels
      tracks/<track_id>         1-D uint8 (uint16 above 256 channels) mu-law codes,
                                chunks of 2^20 samples; attrs: sample_rate, quantization_channels,
                                length, duration, source, fingerprint, genre, source_sample_rate,
                                source_channels, peak, complete
      index/                    attrs: tracks [{id, length, duration, sample_rate, genre, source}],
                                failures [{source, reason}], updated

A track counts only once its ``complete`` attribute is set, which is written after every chunk:
a killed writer leaves an array without it, which readers ignore and the next run rewrites. The
index is rebuilt and the metadata consolidated at the end of every run, so a reader opens the
whole store in one round trip.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import re
import time
import warnings
from dataclasses import dataclass

import numpy as np
from zarr.codecs import ZstdCodec

from .errors import DwaveError

STORE_FORMAT_VERSION = 1
ZARR_JSON = "zarr.json"  # a Zarr 3 node's metadata: the store's root attributes live in it
# What a Zarr LocalStore writes first when it writes zarr.json: zarr.<uuid hex>.partial, renamed
# over zarr.json once complete (the write is atomic). Seen beside the groups, it is a root being
# written this moment.
_PARTIAL_ZARR_JSON = re.compile(r"zarr\.[0-9a-f]{32}\.partial")
CHUNK_SAMPLES = 1 << 20
DEFAULT_SAMPLE_RATE = 16000
DEFAULT_QUANTIZATION_CHANNELS = 256


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def resolve_storage_options(url: str, storage_options: dict | None) -> dict:
    """Storage options for `url`, with the S3 endpoint taken from AWS_ENDPOINT_URL if set.

    Credentials come from the usual AWS_* variables through botocore; the endpoint is passed
    explicitly because not every botocore that s3fs pins reads AWS_ENDPOINT_URL itself.
    """
    options = dict(storage_options or {})
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = options.get("client_kwargs", {})
    if (url.startswith("s3://") and endpoint and "endpoint_url" not in options
            and "endpoint_url" not in client_kwargs):
        options["endpoint_url"] = endpoint
    if url.startswith("s3://"):
        # Workers add tracks while the driver holds the same (cached) filesystem: a cached
        # listing would hide them from the final index.
        options.setdefault("use_listings_cache", False)
    return options


def _normalise(url: str) -> str:
    return url if is_remote(url) else os.path.abspath(url)


@dataclass(frozen=True)
class StoreConfig:
    sample_rate: int
    quantization_channels: int

    @property
    def dtype(self) -> np.dtype:
        from .audio import code_dtype

        return code_dtype(self.quantization_channels)


class _BeingCreated(Exception):
    """The location holds a store's parts but no root metadata: a run is creating it now."""


class TrackStore:
    """A handle on one store. Cheap to create; every method opens what it needs."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = _normalise(url)
        self.storage_options = resolve_storage_options(self.url, storage_options)

    # -- opening --------------------------------------------------------------------------------

    def _open(self, mode: str = "r", consolidated: bool = False):
        import zarr

        kwargs = {"storage_options": self.storage_options} if is_remote(self.url) else {}
        return zarr.open_group(
            self.url, mode=mode, zarr_format=3, use_consolidated=consolidated, **kwargs
        )

    def _create(self, attributes: dict) -> None:
        """Create the store: its two groups first, then the root metadata with the attributes
        that make it a store, in one write (atomic on a local disk and on S3). A run looking
        meanwhile sees either groups without a root (being created: it waits) or a whole store,
        never a root without attributes. Two runs may create the same store at once: zarr
        checks for a node and then writes it, so the loser of that race gets ContainsGroupError
        for a node that is now there, as wanted."""
        import zarr
        from zarr.errors import ContainsGroupError

        kwargs = {"storage_options": self.storage_options} if is_remote(self.url) else {}
        for path, attrs in [(f"{self.url}/tracks", {}), (f"{self.url}/index", {}),
                            (self.url, attributes)]:
            try:
                zarr.create_group(path, zarr_format=3, attributes=attrs, **kwargs)
            except ContainsGroupError:
                if not attrs:
                    continue
                root = self._open("r+")
                have = dict(root.attrs)
                if not have:  # a root left without attributes (see location_state)
                    root.attrs.update(attrs)
                elif have != attrs:
                    raise DwaveError(
                        f"--out {self.url}: another run created this store at the same moment "
                        f"with {have}; rerun with the same --sample-rate and "
                        "--quantization-channels, or choose another --out")

    def _filesystem(self):
        """(fsspec filesystem, root path) of the store's location."""
        import fsspec

        options = self.storage_options if is_remote(self.url) else {}
        return fsspec.core.url_to_fs(self.url, **options)

    def location_state(self) -> str:
        """What is at the store's location: "new" (nothing, or an empty directory or prefix)
        or "store" (a dwave store). Anything else is an error that names it, never "new": other
        files (a user's songs or notes, a bucket's objects), a damaged store (root metadata
        unreadable or truncated), or a location that cannot be read at all (permissions, an S3
        error). The caller may then write only into "new", and replace only a "store"."""
        for _ in range(3):
            try:
                return self._location_state()
            except _BeingCreated:
                time.sleep(0.2)  # another run is writing the root metadata this moment
        raise DwaveError(f"--out {self.url} holds entries named like a store's groups (tracks, "
                         f"index) but no root metadata {ZARR_JSON}: not a dwave store, nothing "
                         "was changed; choose another --out")

    def _location_state(self) -> str:
        where = f"--out {self.url}"
        try:
            fs, root = self._filesystem()
            if root.rstrip("/") and fs.isfile(root):
                raise DwaveError(f"{where} is a file, not a directory: give a new or empty "
                                 "directory (or an existing dwave store)")
            try:
                raw = fs.cat_file(f"{root.rstrip('/')}/{ZARR_JSON}")
            except FileNotFoundError:
                raw = None
            if raw is None:
                try:
                    entries = fs.ls(root, detail=False)
                except FileNotFoundError:
                    entries = []
                entries = [e for e in entries if e.rstrip("/") != root.rstrip("/")]
                if not entries:
                    return "new"
                present = {os.path.basename(e.rstrip("/")) for e in entries}
                if all(n in (ZARR_JSON, "tracks", "index") or _PARTIAL_ZARR_JSON.fullmatch(n)
                       for n in present):
                    raise _BeingCreated  # the root metadata is being written, or appeared after
                names = ", ".join(repr(os.path.basename(e.rstrip("/"))) for e in entries[:3])
                raise DwaveError(
                    f"{where} holds {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} "
                    f"({names}{', ...' if len(entries) > 3 else ''}) and is not a dwave store: "
                    "preprocess writes only into a new or empty location or an existing store "
                    "(--overwrite replaces only a dwave store); choose another --out")
        except (DwaveError, _BeingCreated):
            raise
        except PermissionError as exc:
            raise DwaveError(f"{where}: cannot read it ({exc.strerror or exc}): fix its "
                             "permissions or choose another --out") from None
        except Exception as exc:  # S3 errors, a dead mount: unknown is not "absent"
            raise DwaveError(f"{where}: cannot tell what is there ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); nothing was changed, check the location and "
                             "credentials and retry") from None
        try:
            attrs = json.loads(raw)["attributes"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DwaveError(
                f"{where}: the store's root metadata {ZARR_JSON} is damaged ({type(exc).__name__}"
                f"); nothing was changed: restore it from a backup, or remove the store yourself "
                "if it is expendable, or choose another --out") from None
        if "dwave_store_version" not in attrs:
            if not attrs and self._only_empty_groups(fs, root):
                return "new"  # a store another run is creating at this moment (see prepare)
            raise DwaveError(f"{where} is a Zarr group but not a dwave store; choose another "
                             "--out")
        return "store"

    @staticmethod
    def _only_empty_groups(fs, root: str) -> bool:
        """Whether `root` holds nothing but its metadata and empty `tracks`/`index` groups:
        what prepare() has written before the attributes that make it a store."""
        base = root.rstrip("/")
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)}
        if not names <= {ZARR_JSON, "tracks", "index"}:
            return False
        for group in names - {ZARR_JSON}:
            inside = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{base}/{group}",
                                                                        detail=False)}
            if not inside <= {ZARR_JSON}:
                return False
        return True

    def exists(self) -> bool:
        """A readable dwave store is there (a damaged or foreign location raises)."""
        return self.location_state() == "store"

    def _remove_store(self) -> None:
        """Delete what dwave wrote (its root metadata and its two groups), nothing else."""
        fs, root = self._filesystem()
        for name in ("tracks", "index", ZARR_JSON):
            path = f"{root.rstrip('/')}/{name}"
            if fs.exists(path):
                fs.rm(path, recursive=True)
        _cached_tracks_group.cache_clear()

    def config(self) -> StoreConfig:
        try:
            attrs = self._open("r", consolidated=None).attrs
        except (FileNotFoundError, KeyError, ValueError, OSError) as exc:
            raise DwaveError(f"{self.url} is not a dwave store ({exc.__class__.__name__})") from None
        if "dwave_store_version" not in attrs:
            raise DwaveError(f"{self.url} is a Zarr group but not a dwave store")
        return StoreConfig(int(attrs["sample_rate"]), int(attrs["quantization_channels"]))

    def prepare(
        self, sample_rate: int | None, quantization_channels: int | None, overwrite: bool = False
    ) -> StoreConfig:
        """Create the store (or wipe it with `overwrite`), or check an existing one's config.

        A value left as None takes the existing store's, else the default. Nothing is written
        to a location holding anything but a dwave store (see location_state), and
        `overwrite` removes only the store's own parts.
        """
        state = self.location_state()
        if state == "store" and not overwrite:
            fs, root = self._filesystem()
            if not fs.exists(f"{root.rstrip('/')}/tracks/{ZARR_JSON}"):
                raise DwaveError(f"store {self.url} has no tracks group (an --overwrite that was "
                                 "interrupted?): rerun with --overwrite to finish starting it "
                                 "again")
            config = self.config()
            for name, wanted, have in [
                ("--sample-rate", sample_rate, config.sample_rate),
                ("--quantization-channels", quantization_channels, config.quantization_channels),
            ]:
                if wanted is not None and wanted != have:
                    raise DwaveError(
                        f"store {self.url} holds tracks made with {name} {have}; pass {have} to "
                        f"add to it, or --overwrite to start it again with {wanted}"
                    )
            return config
        config = StoreConfig(
            sample_rate or DEFAULT_SAMPLE_RATE,
            quantization_channels or DEFAULT_QUANTIZATION_CHANNELS,
        )
        try:
            config.dtype  # validates the channel count before anything is written
        except ValueError as exc:
            raise DwaveError(f"--quantization-channels: {exc}") from None
        try:
            if state == "store":
                self._remove_store()
            self._create({
                "dwave_store_version": STORE_FORMAT_VERSION,
                "sample_rate": config.sample_rate,
                "quantization_channels": config.quantization_channels,
            })
        except OSError as exc:  # a missing bucket, wrong credentials, a read-only or full disk
            raise DwaveError(
                f"--out {self.url}: cannot write the store ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else exc.strerror}): check that "
                "the bucket or directory exists, is writable, and the credentials") from None
        return config

    # -- tracks ---------------------------------------------------------------------------------

    def _tracks_group(self):
        return _cached_tracks_group(self.url, json.dumps(self.storage_options, sort_keys=True))

    def completed_tracks(self) -> dict[str, dict]:
        """Every complete track's attributes, read from the arrays themselves (not the index,
        which a killed run did not get to rebuild)."""
        tracks = self._open("r")["tracks"]
        return {
            name: dict(array.attrs)
            for name, array in tracks.arrays()
            if array.attrs.get("complete") is True
        }

    def set_track_genre(self, track_id: str, genre: str) -> None:
        """Relabel a finished track (the index picks it up when it is rebuilt)."""
        self._tracks_group()[track_id].attrs.update({"genre": genre})

    def write_track(self, track_id: str, codes: np.ndarray, attrs: dict) -> None:
        """Write one track's codes; mark it complete only after all of its chunks."""
        array = self._tracks_group().create_array(
            track_id,
            shape=codes.shape,
            chunks=(CHUNK_SAMPLES,),
            dtype=codes.dtype,
            # mu-law codes of music compress little (zstd-1: 1.14x, zstd-3: 1.24x at twice the
            # CPU); level 1 keeps the write a few percent of the decode.
            compressors=[ZstdCodec(level=1)],
            attributes={**attrs, "complete": False},
            overwrite=True,
        )
        array[:] = codes  # one call: zarr encodes and stores the chunks concurrently
        array.attrs.update({"complete": True})  # last write: the track is visible from here on

    def track_array(self, track_id: str):
        """The Zarr array of one track, for reading slices."""
        return self._reader()["tracks"][track_id]

    def read_codes(self, track_id: str, start: int = 0, stop: int | None = None,
                   array=None) -> np.ndarray:
        """Codes [start, stop) of one track (`array`: its track_array, where the caller keeps it
        open). A track that cannot be read is a one-line error naming it and what to do."""
        try:
            return (self.track_array(track_id) if array is None else array)[start:stop]
        except Exception as exc:  # a codec's, zarr's or the file system's: the message says which
            raise DwaveError(
                f"store {self.url}: track {track_id} cannot be read ({type(exc).__name__}: "
                f"{exc}): if the store is damaged, rebuild it (`dwave preprocess SOURCE --out "
                f"STORE --overwrite`), or remove tracks/{track_id} from it and rerun `dwave "
                "preprocess SOURCE --out STORE` to write that track again") from None

    def _reader(self):
        # Opened once per handle: on S3 each open is a round trip for the consolidated metadata.
        if getattr(self, "_read_group", None) is None:
            self._read_group = self._open("r", consolidated=None)
        return self._read_group

    # -- index ----------------------------------------------------------------------------------

    def read_index(self) -> dict:
        """The index written at the end of the last run: {"tracks": [...], "failures": [...]}."""
        root = self._open("r", consolidated=None)
        attrs = dict(root["index"].attrs) if "index" in root else {}
        return {"tracks": attrs.get("tracks", []), "failures": attrs.get("failures", []),
                "updated": attrs.get("updated")}

    def write_index(self, failures: list[dict]) -> dict:
        """Rebuild the index from the complete tracks, record `failures`, consolidate."""
        import zarr

        tracks = [index_entry(tid, attrs) for tid, attrs in sorted(self.completed_tracks().items())]
        index = {
            "tracks": tracks,
            "failures": sorted(failures, key=lambda f: f["source"]),
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        root = self._open("a")
        root.require_group("index").attrs.update(index)
        kwargs = {}
        if is_remote(self.url):
            from zarr.storage import FsspecStore

            kwargs = {"store": FsspecStore.from_url(self.url, storage_options=self.storage_options)}
        else:
            kwargs = {"store": self.url}
        with warnings.catch_warnings():
            # Zarr 3 warns that consolidated metadata is not (yet) in the v3 spec; we rely on
            # zarr-python's implementation and read it back with zarr-python only.
            warnings.simplefilter("ignore", UserWarning)
            zarr.consolidate_metadata(**kwargs)
        return index


def index_entry(track_id: str, attrs: dict) -> dict:
    return {
        "id": track_id,
        "length": int(attrs["length"]),
        "duration": float(attrs["duration"]),
        "sample_rate": int(attrs["sample_rate"]),
        "genre": attrs.get("genre"),
        "source": attrs.get("source"),
    }


# Workers write many tracks to the same store: open it once per process, not once per track.
@functools.lru_cache(maxsize=8)
def _cached_tracks_group(url: str, options_json: str):
    return TrackStore(url, json.loads(options_json))._open("a")["tracks"]
