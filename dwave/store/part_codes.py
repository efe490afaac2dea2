"""The codes of a store's parts: one sharded 1-D Zarr array per part, and fast range reads of it.

Each part's `codes` array is a standard Zarr 3 array (any Zarr reader can slice it) with two
sizes chosen for training:

* shards of SHARD_SAMPLES samples: one object (file or S3 key) each, so an archive of thousands
  of hours is tens of thousands of objects, not millions;
* uncompressed inner chunks of CHUNK_SAMPLES samples, written in order with none left out
  ("dense"): sample i of a shard then lies at byte i * itemsize of its object, so a training
  window is ONE byte-range read of exactly its own bytes, with no shard index to fetch first.
  mu-law codes of music compress little with zstd (benchmarks/results/HISTORY.md), so storing
  them raw costs little space and saves every reader a decompression and every window a 1 MiB chunk read. A stock
  Zarr reader fetches the shard's index and the <= 2 inner chunks (16 KiB each) a window touches.

encode_shards writes the shards in exactly that form (see there why dwave writes them itself).
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict

import numpy as np

SHARD_SAMPLES = 1 << 24  # 16 Mi samples: 17.5 min at 16 kHz, 16 MiB at uint8
CHUNK_SAMPLES = 1 << 14  # 16 Ki samples: what a stock Zarr reader fetches per window
CODES_ARRAY = "codes"


def shard_key(part_id: str, shard: int) -> str:
    """Where shard `shard` of a part lives, relative to the store's root."""
    return f"parts/{part_id}/{CODES_ARRAY}/c/{shard}"


#: shard_key's form, found in a path: (part id, shard number)
SHARD_KEY = re.compile(rf"parts/([^/]+)/{CODES_ARRAY}/c/(\d+)$")


def create_codes_array(group, samples: int, dtype: np.dtype):
    """The part's codes array inside Zarr group `group`: its metadata (encode_shards makes its
    shards). An index at each shard's end (Zarr's default), raw inner chunks."""
    return group.create_array(
        CODES_ARRAY, shape=(samples,), dtype=dtype, chunks=(CHUNK_SAMPLES,),
        shards=(SHARD_SAMPLES,), compressors=None, fill_value=0, overwrite=True)


def encode_shards(codes: np.ndarray) -> list[bytes]:
    """A codes array's shard objects, byte for byte as Zarr's sharding codec stores them with
    the codecs create_codes_array declares: inner chunks raw and in order (the last padded with
    the fill value 0), then the index of every inner chunk of a whole shard, then its crc32c.
    Written by dwave itself because Zarr's per-inner-chunk cost, over a part's thousands of
    chunks, exceeds decoding the songs; a test reads them back through Zarr."""
    import google_crc32c

    itemsize = codes.dtype.itemsize
    raw = np.ascontiguousarray(codes).astype(codes.dtype.newbyteorder("<"), copy=False)
    shards = []
    for start in range(0, len(raw), SHARD_SAMPLES):
        values = raw[start:start + SHARD_SAMPLES]
        chunks = -(-len(values) // CHUNK_SAMPLES)
        index = np.full((SHARD_SAMPLES // CHUNK_SAMPLES, 2), 2**64 - 1, "<u8")
        index[:chunks, 0] = np.arange(chunks, dtype=np.uint64) * (CHUNK_SAMPLES * itemsize)
        index[:chunks, 1] = CHUNK_SAMPLES * itemsize
        padding = bytes((chunks * CHUNK_SAMPLES - len(values)) * itemsize)
        index_bytes = index.tobytes()
        crc = np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes()
        shards.append(b"".join([values.tobytes(), padding, index_bytes, crc]))
    return shards


def shard_sizes(samples: int, itemsize: int) -> list[int]:
    """The byte size of each shard object of a part of `samples` codes, as encode_shards makes
    them: what a part whose shards are all there and whole has, checked without reading them."""
    index_bytes = (SHARD_SAMPLES // CHUNK_SAMPLES) * 16 + 4
    sizes = []
    for start in range(0, samples, SHARD_SAMPLES):
        chunks = -(-min(SHARD_SAMPLES, samples - start) // CHUNK_SAMPLES)
        sizes.append(chunks * CHUNK_SAMPLES * itemsize + index_bytes)
    return sizes


def byte_ranges(start: int, stop: int, itemsize: int) -> list[tuple[int, int, int]]:
    """Samples [start, stop) of a part's codes as (shard, first byte, end byte) reads."""
    out = []
    while start < stop:
        shard, within = divmod(start, SHARD_SAMPLES)
        take = min(stop - start, SHARD_SAMPLES - within)
        out.append((shard, within * itemsize, (within + take) * itemsize))
        start += take
    return out


class RangeReader:
    """Reads many sample ranges of a store's parts at once: one byte-range request per range
    (two where a range crosses a shard), up to `concurrency` of them in flight on S3. Locally a
    range is one pread of a kept-open file. A short or failed read raises OSError naming it."""

    def __init__(self, fs, root: str, dtype: np.dtype, remote: bool, concurrency: int = 64,
                 open_files: int = 256):
        self.fs, self.root, self.dtype, self.remote = fs, root.rstrip("/"), np.dtype(dtype), remote
        self.concurrency = concurrency
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._open_files = open_files
        self.requests = 0  # byte-range reads issued (benchmarks report it)
        self.bytes_read = 0

    def read(self, ranges: list[tuple[str, int, int]]) -> list[np.ndarray]:
        """[(part id, first sample, end sample)] -> the codes of each range."""
        pieces = [(i, shard_key(part, shard), lo, hi)
                  for i, (part, start, stop) in enumerate(ranges)
                  for shard, lo, hi in byte_ranges(start, stop, self.dtype.itemsize)]
        paths = [f"{self.root}/{key}" for _, key, _, _ in pieces]
        if self.remote:
            blobs = self.fs.cat_ranges(paths, [p[2] for p in pieces], [p[3] for p in pieces],
                                       batch_size=self.concurrency, on_error="return")
        else:
            blobs = [self._pread(path, lo, hi) for path, (_, _, lo, hi) in zip(paths, pieces)]
        self.requests += len(pieces)
        parts: list[list[bytes]] = [[] for _ in ranges]
        for (i, key, lo, hi), blob in zip(pieces, blobs):
            if isinstance(blob, BaseException):
                raise OSError(f"{key} bytes {lo}-{hi}: {type(blob).__name__}: {blob}")
            if len(blob) != hi - lo:
                raise OSError(f"{key} bytes {lo}-{hi}: only {len(blob)} bytes there (the shard "
                              "is cut short)")
            self.bytes_read += len(blob)
            parts[i].append(blob)
        return [np.frombuffer(b"".join(p), self.dtype) for p in parts]

    def _pread(self, path: str, lo: int, hi: int) -> bytes:
        fd = self._fds.pop(path, None)
        if fd is None:
            if len(self._fds) >= self._open_files:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd
        return os.pread(fd, hi - lo, lo)



class MappedReader:
    """Sample ranges of parts kept on a local disk, memory-mapped: the pages live once in the
    node's page cache, shared by every rank that maps them (not one copy per rank)."""

    def __init__(self, root: str, dtype: np.dtype):
        self.root, self.dtype = root.rstrip("/"), np.dtype(dtype)
        self._maps: dict[tuple[str, int], np.ndarray] = {}

    def _map(self, part: str, shard: int) -> np.ndarray:
        key = (part, shard)
        if key not in self._maps:
            path = f"{self.root}/{shard_key(part, shard)}"
            self._maps[key] = np.memmap(path, self.dtype, mode="r")
        return self._maps[key]

    def read(self, ranges: list[tuple[str, int, int]]) -> list[np.ndarray]:
        out = []
        itemsize = self.dtype.itemsize
        for part, start, stop in ranges:
            pieces = []
            for shard, lo, hi in byte_ranges(start, stop, itemsize):
                mapped = self._map(part, shard)[lo // itemsize:hi // itemsize]
                if len(mapped) * itemsize != hi - lo:
                    raise OSError(f"{shard_key(part, shard)} bytes {lo}-{hi}: only "
                                  f"{len(mapped) * itemsize} bytes there (the shard is cut short)")
                pieces.append(mapped)
            out.append(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))
        return out
