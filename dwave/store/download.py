"""Downloading http(s) sources into a cache: resumed (Range requests), checked (Content-Range,
length, an optional sha256), one fetch of a URL at a time across processes. Standard library
only."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request

from ..errors import DwaveError

_BLOCK = 1 << 20


# A download that brings fewer than STALL_BYTES in STALL_SECONDS has stalled (a server that
# trickles a byte every 20 s never trips a per-read timeout): the attempt ends and resumes.
STALL_SECONDS = 60.0
STALL_BYTES = 64 << 10


def split_checksum(spec: str) -> tuple[str, str | None]:
    """``URL#sha256=HEX`` -> (URL, HEX). The fragment is never sent to the server."""
    url, _, fragment = spec.partition("#")
    if not fragment:
        return url, None
    key, _, value = fragment.partition("=")
    if key.lower() != "sha256" or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise DwaveError(f"bad checksum in {spec!r}: expected #sha256=<64 hex digits>")
    return url, value.lower()


def default_cache_dir() -> str:
    return os.environ.get("DWAVE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "dwave", "downloads"
    )


def download(spec: str, cache_dir: str | None = None, attempts: int = 5) -> str:
    """Download ``URL[#sha256=HEX]`` into the cache and return the local path.

    Resumes an interrupted download with an HTTP Range request (from a previous attempt in this
    call, or a previous run: the partial file is kept as ``NAME.part``). A finished download is
    reused. With a checksum, a mismatch deletes the file and raises.
    """
    url, sha256 = split_checksum(spec)
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    # The URL's file name, shortened: a name may be at most 255 bytes (a long URL is not).
    base = (os.path.basename(url.split("?")[0]) or "download")[-100:]
    target = os.path.join(cache_dir, f"{hashlib.sha1(url.encode()).hexdigest()[:12]}-{base}")
    # One fetch of a URL at a time, across processes (Dask workers, two runs): the second
    # waits for the first, then finds the finished file.
    locks = os.path.join(cache_dir, ".locks")
    os.makedirs(locks, exist_ok=True)
    with _exclusive(os.path.join(locks, os.path.basename(target))):
        if not os.path.exists(target):
            fetch_with_resume(url, target + ".part", attempts=attempts)
            if sha256:
                _verify_sha256(target + ".part", sha256, url)
            os.replace(target + ".part", target)
        elif sha256:
            _verify_sha256(target, sha256, url)
    return target


@contextlib.contextmanager
def _exclusive(lock_path: str):
    import fcntl

    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the holder dies
        yield


def _verify_sha256(path: str, expected: str, url: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        os.remove(path)
        raise DwaveError(f"checksum mismatch for {url}: got sha256 {digest.hexdigest()}")



def fetch_with_resume(url: str, part_path: str, attempts: int = 5, timeout: float = 60.0,
                      stall_seconds: float = STALL_SECONDS, stall_bytes: int = STALL_BYTES) -> None:
    """Fetch `url` into `part_path`, continuing from whatever `part_path` already holds.

    Each attempt asks for the bytes after the ones already on disk. A server that ignores Range
    (answers 200 instead of 206), or answers 206 with bytes from another offset than asked
    (Content-Range), gets the download restarted from zero: nothing unverified is appended.
    A body is complete only when its length is known (Content-Length, or chunked framing that
    ended properly) and reached; a server that gives neither is refused, since a cut body
    would look complete. Connection drops and 5xx answers are retried with back-off; 4xx
    answers fail at once.
    """
    for attempt in range(1, attempts + 1):
        have = os.path.getsize(part_path) if os.path.exists(part_path) else 0
        request = urllib.request.Request(url, headers={"User-Agent": "dwave"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if have and response.status == 206:
                    start = _range_start(response)
                    if start != have:
                        # Bytes from elsewhere in the file: appending them would corrupt it.
                        os.remove(part_path)
                        raise http.client.HTTPException(
                            f"asked for bytes from {have}, got a Content-Range starting at "
                            f"{start}")
                    mode, expected = "ab", _content_length(response, have)
                elif have and response.status == 416:  # nothing left: we have it all
                    return
                else:
                    mode, expected = "wb", _content_length(response, 0)
                chunked = "chunked" in response.headers.get("Transfer-Encoding", "").lower()
                if expected is None and not chunked:
                    raise DwaveError(
                        f"cannot download {url}: the server sends neither a Content-Length nor "
                        "chunked framing, so a cut download could not be told from a complete "
                        "one; download it yourself and give the file as SOURCE")
                with open(part_path, mode) as out:
                    _copy_watching_for_stalls(response, out, stall_seconds, stall_bytes)
            size = os.path.getsize(part_path)
            if expected is not None and size < expected:
                raise http.client.IncompleteRead(b"", expected - size)
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:
                return
            if exc.code < 500:
                raise DwaveError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
            error: Exception = exc
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError,
                TimeoutError, _Stalled) as exc:
            error = exc
        if attempt < attempts:
            time.sleep(min(0.2 * 2**attempt, 5.0))
    raise DwaveError(f"cannot download {url} after {attempts} attempts: {error}")


class _Stalled(Exception):
    pass


def _copy_watching_for_stalls(response, out, stall_seconds: float, stall_bytes: int) -> None:
    window_start, window_bytes = time.monotonic(), 0
    while True:
        block = response.read1(_BLOCK)  # what has arrived (not a full block: see the stall)
        if not block:
            return
        out.write(block)
        window_bytes += len(block)
        now = time.monotonic()
        if now - window_start >= stall_seconds:
            if window_bytes < stall_bytes:
                raise _Stalled(f"stalled: {window_bytes} bytes in the last "
                               f"{now - window_start:.0f} s")
            window_start, window_bytes = now, 0


def _range_start(response) -> int | None:
    """The first byte of a 206 answer, from its Content-Range ("bytes START-END/TOTAL")."""
    value = response.headers.get("Content-Range", "")
    unit, _, spec = value.strip().partition(" ")
    try:
        return int(spec.split("-", 1)[0]) if unit == "bytes" else None
    except ValueError:
        return None


def _content_length(response, offset: int) -> int | None:
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None else None
