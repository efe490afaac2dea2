"""The track store: a Zarr (format 3) group, on local disk or ``s3://bucket/prefix``.

Layout, version 2 (a contract that ``train``, ``info`` and users' own scripts read; zarr alone
opens every piece)::

    STORE/                      root attrs: dwave_store_version, sample_rate,
                                quantization_channels, store_id (a random id of this store),
                                written_by (dwave.versions: the software that created it)
      parts/<part_id>/          one group per batch of songs written by one preprocessing task;
                                attrs: tracks (the part's track table), samples, complete,
                                written_by (the software that wrote this part)
        codes                   1-D uint8 (uint16 above 256 codes) mu-law codes of the part's
                                tracks, one after another; sharded (see dwave.store.part_codes)
      index/                    attrs: parts (the parts folded in), tracks (their track table),
                                failures [{source, reason}], updated
      damaged/<part_id>-<time>/ parts set aside by `dwave store verify --repair` or preprocess
                                (shards missing or cut short): kept as they were, never read

The track table (dwave.store.track_table) stores columns: id, part, offset, length, duration, genre,
source, fingerprint, ... Track t's codes are parts/<part>/codes[offset:offset + length].

A part counts only once its ``complete`` attribute is set, written after all of its codes: a
killed writer leaves a part without it, which readers ignore and a rerun writes again. Each
preprocessing task writes its own part, so workers never touch the same objects. The index is
the table of every complete part, one document read in one request; at the end of a run the
parts written since are folded into it. A reader lists ``parts/`` (one request per 1,000 parts)
to see parts a killed run wrote but did not index, and parts removed since.

Version 1 stores (one Zarr array per track under ``tracks/``, consolidated metadata) are
converted in place by ``dwave store upgrade`` (dwave.store.upgrade) without decoding anything again.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from ..errors import DwaveError, describe
from ..versions import software_versions
from .audio import DEFAULT_QUANTIZATION_CHANNELS, DEFAULT_SAMPLE_RATE
from .part_codes import (SHARD_KEY, MappedReader, RangeReader, create_codes_array, encode_shards,
                         shard_key, shard_sizes)
from .track_table import TrackTable

STORE_FORMAT_VERSION = 2
ZARR_JSON = "zarr.json"  # a Zarr 3 node's metadata: the store's root attributes live in it
# What a Zarr LocalStore writes first when it writes zarr.json: zarr.<uuid hex>.partial, renamed
# over zarr.json once complete (the write is atomic). Seen beside the groups, it is a root being
# written this moment.
_PARTIAL_ZARR_JSON = re.compile(r"zarr\.[0-9a-f]{32}\.partial")
GROUPS = ("parts", "index")
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 192000


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
        # Workers add parts while the driver holds the same (cached) filesystem: a cached
        # listing would hide them from the final index.
        options.setdefault("use_listings_cache", False)
        # Above 1, s3fs asks for an object's size (a HEAD) before every whole-object GET.
        options.setdefault("max_concurrency", 1)
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

    def _open(self, mode: str = "r", path: str = ""):
        import zarr

        kwargs = {"storage_options": self.storage_options} if is_remote(self.url) else {}
        return zarr.open_group(f"{self.url}/{path}".rstrip("/"), mode=mode, zarr_format=3,
                               use_consolidated=False, **kwargs)

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
        for path, attrs in [*((f"{self.url}/{g}", {}) for g in GROUPS), (self.url, attributes)]:
            try:
                zarr.create_group(path, zarr_format=3, attributes=attrs, **kwargs)
            except ContainsGroupError:
                if not attrs:
                    continue
                root = self._open("r+")
                have = dict(root.attrs)
                if not have:  # a root left without attributes (see location_state)
                    root.attrs.update(attrs)
                elif _settings(have) != _settings(attrs):
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
        raise DwaveError(f"--out {self.url} holds entries named like a store's groups (parts, "
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
                if all(n in (ZARR_JSON, *GROUPS) or _PARTIAL_ZARR_JSON.fullmatch(n)
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
            raise DwaveError(f"{where}: cannot tell what is there ({describe(exc)[:200]}); "
                             "nothing was changed, check the location and "
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
        """Whether `root` holds nothing but its metadata and empty `parts`/`index` groups:
        what prepare() has written before the attributes that make it a store."""
        base = root.rstrip("/")
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False)}
        if not names <= {ZARR_JSON, *GROUPS}:
            return False
        for group in names - {ZARR_JSON}:
            inside = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{base}/{group}",
                                                                        detail=False)}
            if not inside <= {ZARR_JSON}:
                return False
        return True

    def _remove_store(self) -> None:
        """Delete what dwave wrote (its root metadata and its two groups), nothing else."""
        fs, root = self._filesystem()
        for name in (*GROUPS, "tracks", ZARR_JSON):  # tracks: a version-1 store's
            path = f"{root.rstrip('/')}/{name}"
            if fs.exists(path):
                fs.rm(path, recursive=True)
        _cached_group.cache_clear()

    def root_attributes(self) -> dict:
        """The root's attributes (any store version); a clear error if this is not a store."""
        try:
            attrs = dict(self._open("r").attrs)
        except PermissionError:
            raise DwaveError(
                f"{self.url}: access denied: check the credentials (AWS_PROFILE, "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, --storage-options) and the bucket's "
                "policy") from None
        except (FileNotFoundError, KeyError):  # zarr's GroupNotFoundError among them
            fs, root = self._filesystem()
            what = "no Zarr group" if fs.exists(root) else "nothing"
            raise DwaveError(f"{self.url} is not a dwave store ({what} there)") from None
        except ValueError:
            raise DwaveError(f"{self.url} is not a dwave store (its {ZARR_JSON} is not valid "
                             "Zarr metadata)") from None
        except OSError as exc:  # a dead mount, an unreachable endpoint: not "not a store"
            raise DwaveError(f"{self.url}: cannot read it ({describe(exc)[:160]}); check the "
                             "location and retry") from None
        if "dwave_store_version" not in attrs:
            raise DwaveError(f"{self.url} is a Zarr group but not a dwave store")
        return attrs

    def identity(self) -> str | None:
        """The store's random store_id (set when it was made; --overwrite makes a new one)."""
        return self.root_attributes().get("store_id")

    def config(self) -> StoreConfig:
        attrs = self.root_attributes()
        version = int(attrs["dwave_store_version"])
        if version != STORE_FORMAT_VERSION:
            raise DwaveError(
                f"store {self.url} is a version-{version} store" + (
                    " (one Zarr array per track): convert it once, in place and without decoding "
                    f"anything again, with `dwave store upgrade {self.url}`"
                    if version < STORE_FORMAT_VERSION else
                    f"; this dwave reads version {STORE_FORMAT_VERSION}: upgrade dwave"))
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
            config = self.config()
            if not fs.exists(f"{root.rstrip('/')}/parts/{ZARR_JSON}"):
                raise DwaveError(f"store {self.url} has no parts group (an --overwrite that was "
                                 "interrupted?): rerun with --overwrite to finish starting it "
                                 "again")
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
        if not MIN_SAMPLE_RATE <= config.sample_rate <= MAX_SAMPLE_RATE:
            # Above it, one song's decode buffer (4 bytes a sample) outgrows any worker.
            raise DwaveError(f"--sample-rate {config.sample_rate}: must be between "
                             f"{MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz")
        try:
            if state == "store":
                self._remove_store()
            self._create({
                "dwave_store_version": STORE_FORMAT_VERSION,
                "sample_rate": config.sample_rate,
                "quantization_channels": config.quantization_channels,
                "store_id": uuid.uuid4().hex,
                "written_by": software_versions(),
            })
        except OSError as exc:  # a missing bucket, wrong credentials, a read-only or full disk
            raise DwaveError(
                f"--out {self.url}: cannot write the store ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else exc.strerror}): check that "
                "the bucket or directory exists, is writable, and the credentials") from None
        return config

    # -- parts ----------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        """The file-system path (local) or bucket/key (S3) of `key` under the store's root."""
        return f"{self._filesystem()[1].rstrip('/')}/{key}"

    def write_part(self, part_id: str, rows: list[dict], codes: list[np.ndarray]) -> None:
        """Write one part: the tracks `rows` (TRACK_FIELDS, without part and offset), whose codes
        are `codes`, one array each. The part's codes go first, its track table and `complete`
        last: until that one write the part does not exist for any reader."""
        dtype = np.dtype(codes[0].dtype)
        total = sum(len(c) for c in codes)
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in codes])[:-1]]).tolist()
        table = TrackTable.from_rows([{**row, "part": part_id, "offset": int(offset),
                                       "length": len(c)}
                                      for row, offset, c in zip(rows, offsets, codes)])
        group = _cached_group(self.url, json.dumps(self.storage_options, sort_keys=True),
                              "parts").require_group(part_id)
        group.attrs.put({"complete": False})  # a part being rewritten is no longer complete
        create_codes_array(group, total, dtype)
        shards = encode_shards(np.concatenate(codes) if len(codes) > 1 else codes[0])
        fs, _ = self._filesystem()
        paths = {self._path(shard_key(part_id, k)): blob for k, blob in enumerate(shards)}
        if not is_remote(self.url):
            fs.makedirs(os.path.dirname(next(iter(paths))), exist_ok=True)
        fs.pipe(paths)  # on S3, the shards' PUTs all in flight at once
        group.attrs.put({"tracks": table.to_json(), "samples": total, "complete": True,
                         "written_by": software_versions()})

    def list_parts(self) -> set[str]:
        """The part ids present under parts/ (complete or not): one listing."""
        fs, root = self._filesystem()
        try:
            entries = fs.ls(f"{root.rstrip('/')}/parts", detail=False)
        except FileNotFoundError:
            return set()
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
        return {n for n in names if n != ZARR_JSON and not _PARTIAL_ZARR_JSON.fullmatch(n)}

    def read_part_tables(self, part_ids) -> dict[str, TrackTable | None]:
        """Each part's track table, None for a part that is not complete (being written, or
        left by a killed run). Fetched together: concurrent requests on S3."""
        part_ids = sorted(part_ids)
        if not part_ids:
            return {}
        fs, _ = self._filesystem()
        paths = [self._path(f"parts/{p}/{ZARR_JSON}") for p in part_ids]
        blobs = fs.cat(paths, on_error="return")
        out = {}
        for part, path in zip(part_ids, paths):
            blob = blobs.get(path)
            if isinstance(blob, FileNotFoundError) or blob is None:
                out[part] = None  # removed meanwhile, or its metadata not yet written
                continue
            if isinstance(blob, BaseException):
                raise blob
            try:
                attrs = json.loads(blob)["attributes"]
            except (ValueError, KeyError, TypeError):
                raise DwaveError(f"store {self.url}: parts/{part}/{ZARR_JSON} is damaged: "
                                 f"remove parts/{part} and rerun `dwave preprocess` to write "
                                 "its tracks again") from None
            out[part] = (TrackTable.from_json(attrs["tracks"], f"{self.url}/parts/{part}")
                         if attrs.get("complete") is True else None)
        return out

    def damaged_parts(self, extents, itemsize: int) -> dict[str, str]:
        """{part id: what is wrong} for the parts of the tracks at `extents` ((part, offset,
        length) each) whose shard objects are not all there at their full size. One recursive
        listing of parts/ (on S3, one request per 1,000 objects: ~3 a part), no codes read."""
        samples: dict[str, int] = {}
        for part, offset, length in extents:
            samples[part] = max(samples.get(part, 0), int(offset) + int(length))
        if not samples:
            return {}
        fs, _ = self._filesystem()
        try:
            listing = fs.find(self._path("parts"), detail=True)
        except FileNotFoundError:
            listing = {}
        found: dict[str, dict[int, int]] = {}
        for path, info in listing.items():
            shard = SHARD_KEY.search(path)
            if shard:
                found.setdefault(shard.group(1), {})[int(shard.group(2))] = info.get("size")
        damaged = {}
        for part in sorted(samples):
            have = found.get(part, {})
            for shard, size in enumerate(shard_sizes(samples[part], itemsize)):
                if shard not in have:
                    damaged[part] = f"shard {shard} is missing"
                    break
                if have[shard] != size:
                    damaged[part] = f"shard {shard} holds {have[shard]} bytes, not {size}"
                    break
        return damaged

    def set_aside(self, part_id: str) -> str:
        """Move a damaged part out of parts/ to damaged/ (kept, not deleted: its good shards
        may still matter to someone); the next index fold drops its tracks, so a preprocess rerun
        writes them again. Returns where it went."""
        fs, _ = self._filesystem()
        # Stamped: a rerun writes the same part id again, which may one day be set aside too.
        name = f"{part_id}-{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S%fZ}"
        source, target = self._path(f"parts/{part_id}"), self._path(f"damaged/{name}")
        if not is_remote(self.url):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.mv(source, target, recursive=True)
        return f"{self.url}/damaged/{name}"

    # -- index ----------------------------------------------------------------------------------

    def read_index(self) -> "Index":
        """The index as the last run left it (one request)."""
        fs, _ = self._filesystem()
        try:
            raw = fs.cat_file(self._path(f"index/{ZARR_JSON}"))
        except FileNotFoundError:
            return Index()
        try:
            attrs = json.loads(raw)["attributes"]
            table = (TrackTable.from_json(attrs["tracks"], f"{self.url}/index")
                     if "tracks" in attrs else TrackTable())
        except (ValueError, KeyError, TypeError):
            raise IndexDamaged(f"store {self.url}: index/{ZARR_JSON} is damaged: rerun `dwave "
                               "preprocess` on the store to rebuild it from its parts") from None
        return Index(list(attrs.get("parts", [])), table, list(attrs.get("failures", [])),
                     attrs.get("updated"))

    def current_index(self, refresh=(), base: "Index | None" = None) -> tuple["Index", bool]:
        """The index brought up to date with the parts present now: parts written since it was
        written (a killed run's, another run's) folded in, parts removed since dropped; the parts
        in `refresh` read again. (index, whether it differs from the stored one). Requests: the
        index (none when the caller read it already: `base`, read_index()'s), one listing per
        1,000 parts, one per new part. `base=Index()` folds every part afresh."""
        index = self.read_index() if base is None else base
        present = self.list_parts()
        indexed = set(index.parts)
        gone = indexed - present
        reread = (present - indexed) | (set(refresh) & present)
        tables = self.read_part_tables(reread)
        added = {p: t for p, t in tables.items() if t is not None}
        drop = gone | set(tables)
        changed = bool(gone or added or (set(refresh) & indexed))
        if not changed:
            return dataclasses.replace(index), False
        table = index.tracks.select([p not in drop for p in index.tracks.columns["part"]])
        seen = set(table.columns["id"])
        for part in sorted(added):
            # Two runs racing may both write a song (each in a part of its own): the first
            # part keeps it, the other's copy is never read.
            new = added[part]
            keep = [tid not in seen for tid in new.columns["id"]]
            seen.update(new.columns["id"])
            table.extend(new.select(keep))
        parts = sorted((indexed - drop) | set(added))
        return Index(parts, table, index.failures, index.updated, gone=sorted(gone)), True

    def write_index(self, failures: list[dict] | None = None, refresh=(),
                    base: "Index | None" = None) -> "Index":
        """Bring the index up to date (current_index, from `base` if given) with `failures`
        recorded (None: keep the index's), and write it in one atomic write if it changed."""
        index, changed = self.current_index(refresh, base)
        if failures is not None:
            failures = sorted(failures, key=lambda f: f["source"])
            changed = changed or failures != index.failures
            index.failures = failures
        if changed or index.updated is None:
            index.updated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            self._write_node(f"index/{ZARR_JSON}", {
                "parts": index.parts, "tracks": index.tracks.to_json(),
                "failures": index.failures, "updated": index.updated})
        return index

    def _write_node(self, key: str, attributes: dict) -> None:
        """A Zarr group's metadata written in one atomic step (an S3 PUT; locally a rename)."""
        document = json.dumps({"zarr_format": 3, "node_type": "group",
                               "attributes": attributes}, separators=(",", ":")).encode()
        fs, _ = self._filesystem()
        path = self._path(key)
        if is_remote(self.url):
            fs.pipe_file(path, document)
        else:
            partial = f"{path}.{uuid.uuid4().hex}.partial"
            try:
                with open(partial, "wb") as f:
                    f.write(document)
                os.replace(partial, path)
            except BaseException:
                if os.path.exists(partial):  # ours, half written (a full disk): not left behind
                    os.remove(partial)
                raise

    def set_genres(self, genres: dict[str, str], table: TrackTable) -> set[str]:
        """Relabel finished tracks (`table`: where they are) in their parts' tables. Returns the
        parts rewritten, for the index to read again (write_index(refresh=...))."""
        parts = {part for tid, part in zip(table.columns["id"], table.columns["part"])
                 if tid in genres}
        for part, old in self.read_part_tables(parts).items():
            if old is None:
                continue
            old.columns["genre"] = [genres.get(t, g) for t, g in
                                    zip(old.columns["id"], old.columns["genre"])]
            samples = max(o + n for o, n in zip(old.columns["offset"], old.columns["length"]))
            self._write_node(f"parts/{part}/{ZARR_JSON}", {
                "tracks": old.to_json(), "samples": samples, "complete": True})
        return parts

    # -- reading codes ----------------------------------------------------------------------------

    def range_reader(self, dtype: np.dtype, concurrency: int = 64) -> RangeReader:
        """Byte-range reads of codes of `dtype` (the store's: StoreConfig.dtype)."""
        fs, root = self._filesystem()
        return RangeReader(fs, root, dtype, is_remote(self.url), concurrency)

    def mapped_reader(self, dtype: np.dtype, local_root: str | None = None) -> MappedReader:
        """Memory-mapped reads of a local store (or of a node cache's copy at `local_root`)."""
        return MappedReader(local_root or self._filesystem()[1], dtype)

    def read_codes(self, track_id: str) -> np.ndarray:
        """One whole track's codes (for tests, baselines and tools; training reads windows)."""
        rows = {r["id"]: r for r in self.current_index()[0].tracks.rows()}
        if track_id not in rows:
            raise DwaveError(f"store {self.url} has no track {track_id}")
        row = rows[track_id]
        try:
            return self.range_reader(self.config().dtype).read(
                [(row["part"], row["offset"], row["offset"] + row["length"])])[0]
        except OSError as exc:
            raise self.unreadable(track_id, row["part"], exc) from None

    def unreadable(self, track_id: str, part: str, exc: Exception,
                   started_id: str | None = None) -> DwaveError:
        """The one-line error for a track whose codes cannot be read. The store is looked at
        again first (`started_id`: its store_id when the reader started): one deleted or
        replaced under a running job says so, rather than blaming the track."""
        try:
            now_id = self.root_attributes().get("store_id")
        except DwaveError:
            return DwaveError(
                f"store {self.url} is gone (deleted, moved or being rewritten while this job "
                f"read it): track "
                f"{track_id} cannot be read; put the store back and rerun (training resumes "
                "from its last checkpoint)")
        if started_id is not None and now_id != started_id:
            return DwaveError(
                f"store {self.url} was replaced while this job read it (its store_id changed: a "
                "`dwave preprocess --overwrite`?): its tracks are not the ones the job started "
                "on; the job stops, its last checkpoint kept; start a new --run-dir on the new "
                "store")
        return DwaveError(
            f"store {self.url}: track {track_id} (parts/{part}) cannot be read "
            f"({describe(exc)}): `dwave store verify {self.url} --repair` sets "
            "damaged parts aside, and a rerun of `dwave preprocess SOURCE --out STORE` writes "
            "their tracks again")


class IndexDamaged(DwaveError):
    """The index document cannot be parsed; the parts it was folded from can rebuild it."""


@dataclass
class Index:
    """The store's index: the parts folded in, their track table, the failures of runs."""

    parts: list[str] = field(default_factory=list)
    tracks: TrackTable = field(default_factory=TrackTable)
    failures: list[dict] = field(default_factory=list)
    updated: str | None = None
    gone: list[str] = field(default_factory=list)  # parts indexed once, no longer present


def part_id_for(track_ids_and_fingerprints: list[tuple[str, str]], config: StoreConfig) -> str:
    """A part's id: a digest of what it holds, so a rerun of the same batch writes the same
    part (over a killed run's incomplete one) instead of leaving that one behind."""
    text = json.dumps([config.sample_rate, config.quantization_channels,
                       sorted(track_ids_and_fingerprints)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _settings(attrs: dict) -> dict:
    """A store's settings: its root attributes but the random store_id."""
    return {k: v for k, v in attrs.items() if k != "store_id"}


# Workers write many parts to the same store: open its groups once per process, not per part.
@functools.lru_cache(maxsize=8)
def _cached_group(url: str, options_json: str, path: str):
    return TrackStore(url, json.loads(options_json))._open("a", path)
