"""What a SOURCE can be, expanded to individual songs that any worker can open.

A SOURCE is a file, a directory (walked recursively), a glob, a ``.zip`` archive (members read
in place, never extracted; ``ARCHIVE.zip::PATTERN`` for the members a glob matches), an ``s3://`` prefix or object, or an ``http(s)://`` URL (downloaded
with resume; ``#sha256=HEX`` after the URL checks the result). Each song becomes a
:class:`Source`: a small, plain value that a Dask worker can open on its own.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from ..errors import DwaveError
from .download import download, split_checksum
from .zip_members import ArchivePool, ZipMember

#: Extensions of the formats libsndfile decodes. Files with other extensions found while walking
#: a directory, glob or archive are not songs (cover art, READMEs, checksums) and are counted,
#: not reported as failures. A file named explicitly is always tried.
AUDIO_EXTENSIONS = frozenset(
    ".mp3 .wav .wave .flac .ogg .oga .opus .aif .aiff .aifc .au .snd .caf .w64 .rf64".split()
)

_FMA_NAME = re.compile(r"^([0-9]+)$")  # FMA names its songs 000002.mp3, 155320.mp3, ...


@dataclass(frozen=True)
class Source:
    """One song: where it is, and how to tell if it changed since it was processed."""

    uri: str  # local path, "ARCHIVE.zip::MEMBER", "s3://bucket/key" or "https://..."
    fingerprint: str  # size + mtime, zip CRC, S3 ETag, or URL + checksum
    size: int = field(default=0, compare=False)  # bytes, where known: longest songs go first
    storage_options: dict = field(default_factory=dict, compare=False, hash=False)
    # A zip member's place in its archive, read from the central directory when the archive
    # was listed: a worker then reads the member without parsing that directory again.
    member: ZipMember | None = field(default=None, compare=False)

    @property
    def track_id(self) -> str:
        return track_id_for(self.uri)

    def open(self, archives: ArchivePool | None = None
             ) -> contextlib.AbstractContextManager[BinaryIO | str]:
        """The song as something a decoder opens: a local path, or a seekable binary file.
        `archives` keeps zip archives open across the songs of a part."""
        return _open_source(self, archives)


def track_id_for(uri: str) -> str:
    """FMA file names give their number (``000002.mp3`` -> ``2``); anything else a readable,
    stable id: the file's stem plus a hash of the full URI (so equal names never collide)."""
    name = re.split(r"[/\\]|::", uri)[-1]
    stem = os.path.splitext(name)[0]
    if _FMA_NAME.match(stem):
        return str(int(stem))
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:40] or "track"
    # surrogateescape: a file name that is not UTF-8 (Python keeps its bytes as surrogates)
    return f"{slug}-{hashlib.sha1(uri.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}"


def track_id_order(track_id: str) -> tuple:
    """Track ids in the order a reader expects: FMA's numbers by value (2 before 10), then the
    others by name."""
    numeric = track_id.isascii() and track_id.isdigit()
    return (0, int(track_id), "") if numeric else (1, 0, track_id)


ZIP_MEMBER = "::"  # ARCHIVE.zip::MEMBER


def zip_member(uri: str) -> tuple[str, str] | None:
    """(archive, member) of a zip member's URI, else None. The archive part ends in .zip and,
    locally, is a file: a real directory named `live::2024/` is a directory."""
    at = uri.lower().find(".zip" + ZIP_MEMBER)
    if at < 0:
        return None
    archive, member = uri[:at + 4], uri[at + 4 + len(ZIP_MEMBER):]
    if "://" not in archive and not os.path.isfile(archive):
        return None
    return archive, member


def is_local_file(uri: str) -> bool:
    return "://" not in uri and zip_member(uri) is None


def is_audio_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in AUDIO_EXTENSIONS


# --------------------------------------------------------------------------------------------
# Expansion: SOURCE arguments -> songs
# --------------------------------------------------------------------------------------------


@dataclass
class Expansion:
    sources: list[Source]
    ignored: list[str]  # files passed over because their extension is not an audio format


def expand_sources(
    specs: list[str], storage_options: dict | None = None, cache_dir: str | None = None
) -> Expansion:
    """Turn SOURCE arguments into songs, in a deterministic order, without duplicates."""
    storage_options = storage_options or {}
    sources: list[Source] = []
    ignored: list[str] = []
    for spec in specs:
        if spec.startswith("s3://"):
            found = _expand_s3(spec, storage_options, ignored)
        elif spec.startswith(("http://", "https://")):
            found = _expand_http(spec, cache_dir)
            if found is None:  # a downloaded .zip archive: expand its members
                found = _expand_zip(download(spec, cache_dir), ignored)
        else:
            found = _expand_local(spec, ignored)
        if not found:
            raise DwaveError(f"no audio files found in {spec!r}")
        sources.extend(found)
    # Each song once: the same URI twice on the command line, or one real file reached by two
    # paths (a symlink beside its target, two overlapping specs), keeps its first path.
    unique, real_paths = [], set()
    for source in dict.fromkeys(sources):
        if is_local_file(source.uri):
            real = os.path.realpath(source.uri)
            if real in real_paths:
                continue
            real_paths.add(real)
        unique.append(source)
    return Expansion(unique, ignored)


def _expand_local(spec: str, ignored: list[str]) -> list[Source]:
    in_zip = zip_member(spec)
    if in_zip:  # ARCHIVE.zip::PATTERN: the members the pattern matches (`fma_large/000/*`)
        archive, pattern = in_zip
        regex = re.compile(_glob_regex(pattern))
        members = [s for s in _expand_zip(archive, ignored)
                   if regex.fullmatch(zip_member(s.uri)[1])]
        if not members:
            raise DwaveError(f"no audio member of {archive} matches {pattern!r}")
        return members
    if glob.has_magic(spec):
        paths = glob_paths(spec)
        if not paths:
            raise DwaveError(f"no files match {spec!r}")
        return [s for p in paths for s in _expand_local_path(p, ignored, explicit=False)]
    if not os.path.lexists(spec):
        raise DwaveError(f"no such file or directory: {spec}")
    return _expand_local_path(spec, ignored, explicit=True)


def _expand_local_path(path: str, ignored: list[str], explicit: bool) -> list[Source]:
    path = os.path.abspath(path)
    if os.path.isdir(path):
        found = []
        for file in walk_files(path):
            found.extend(_expand_local_path(file, ignored, explicit=False))
        return found
    if path.lower().endswith(".zip"):
        return _expand_zip(path, ignored)
    if not explicit and not is_audio_name(path):
        ignored.append(path)
        return []
    try:
        stat = os.stat(path)
    except OSError as exc:  # a dangling symlink, a file that vanished: the song fails, no more
        return [Source(path, f"unreadable:{exc.strerror}", 0)]
    return [Source(path, f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}", stat.st_size)]


def walk_files(top: str) -> list[str]:
    """Every file under `top`, in sorted order, following symlinked directories but entering
    each real directory once: a symlink loop (a link to a parent) neither repeats songs nor
    recurses forever. Unreadable directories are passed over."""
    files: list[str] = []
    seen: set[str] = set()

    def walk(directory: str) -> None:
        real = os.path.realpath(directory)
        if real in seen:
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks; False for a dangling one
            except OSError:
                is_dir = False
            if is_dir:
                walk(entry.path)
            else:
                files.append(entry.path)

    walk(top)
    return files


def glob_paths(pattern: str) -> list[str]:
    """What a shell-style glob matches (`*`, `?`, `[...]` within one path component, `**` across
    any number of them), found by walking its fixed leading directory with walk_files' loop
    protection (Python's glob follows symlinked directories without any, so one symlink loop
    makes `dir/**/*.wav` list a song many times, and a few never finish). Matching directories
    are returned too (their songs are then expanded)."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = "/".join(parts[:fixed]) or ("/" if pattern.startswith("/") else ".")
    regex = re.compile(_glob_regex("/".join(parts[fixed:])))
    if not os.path.isdir(base):
        return []
    matches = set()
    for file in walk_files(base):
        relative = os.path.relpath(file, base)
        pieces = relative.split(os.sep)
        for depth in range(1, len(pieces) + 1):  # the file, or a directory above it
            if regex.fullmatch("/".join(pieces[:depth])):
                matches.add(os.path.join(base, *pieces[:depth]))
                break
    return sorted(matches)


def _glob_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def _expand_zip(path: str, ignored: list[str], opener=None, fingerprint: str = "",
                storage_options: dict | None = None) -> list[Source]:
    """The audio members of the zip archive at `path` (a local path, or one `opener()` opens:
    an S3 object, read by range for its central directory only)."""
    try:
        with (opener() if opener else open(path, "rb")) as f, zipfile.ZipFile(f) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, OSError) as exc:
        raise DwaveError(f"cannot read zip archive {path}: {exc}") from None
    found = []
    for member in sorted(members, key=lambda m: m.filename):
        uri = f"{path}{ZIP_MEMBER}{member.filename}"
        if not is_audio_name(member.filename):
            ignored.append(uri)
            continue
        found.append(Source(uri, f"{fingerprint}crc32={member.CRC:08x},size={member.file_size}",
                            member.file_size, storage_options or {}, ZipMember.of(member)))
    return found


def _expand_s3(spec: str, storage_options: dict, ignored: list[str]) -> list[Source]:
    import fsspec

    fs = fsspec.filesystem("s3", **storage_options)
    path = spec[len("s3://") :].rstrip("/")
    try:
        if glob.has_magic(path):
            listing = fs.glob(path, detail=True)
        elif fs.isfile(path):
            listing = {path: fs.info(path)}
        else:
            listing = fs.find(path, detail=True)
    except (OSError, PermissionError) as exc:  # botocore errors surface as OSError subclasses
        raise DwaveError(f"cannot list {spec}: {exc}") from None
    found = []
    for key in sorted(listing):
        meta = listing[key]
        if meta.get("type") == "directory":
            continue
        if key.lower().endswith(".zip"):  # its members, as for a local or downloaded archive
            etag = str(meta.get("ETag", meta.get("etag", ""))).strip('"')
            found.extend(_expand_zip(
                f"s3://{key}", ignored, lambda key=key: fs.open(key, "rb", block_size=1 << 20),
                f"etag={etag},", storage_options))
            continue
        if not is_audio_name(key):
            ignored.append(f"s3://{key}")
            continue
        etag = str(meta.get("ETag", meta.get("etag", ""))).strip('"')
        fingerprint = f"etag={etag},size={meta.get('size')}"
        found.append(Source(f"s3://{key}", fingerprint, int(meta.get("size") or 0),
                            storage_options))
    return found


def _expand_http(spec: str, cache_dir: str | None) -> list[Source] | None:
    url, _ = split_checksum(spec)
    if url.lower().split("?")[0].endswith(".zip"):
        return None
    return [Source(spec, f"url={spec}", 0, {"cache_dir": cache_dir} if cache_dir else {})]


# --------------------------------------------------------------------------------------------
# Opening one song (runs on a worker)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_source(source: Source, archives: ArchivePool | None) -> Iterator[BinaryIO | str]:
    uri = source.uri
    in_zip = zip_member(uri)
    if in_zip:
        with contextlib.ExitStack() as stack:
            if archives is None:
                archives = stack.enter_context(ArchivePool())
            yield stack.enter_context(archives.open(*in_zip, source.member,
                                                    source.storage_options))
    elif uri.startswith("s3://"):
        import fsspec

        fs = fsspec.filesystem("s3", **source.storage_options)
        # A 4 MiB read-ahead keeps libsndfile's small reads from becoming HTTP requests.
        with fs.open(uri, "rb", block_size=4 << 20) as f:
            yield f
    elif uri.startswith(("http://", "https://")):
        with open(download(uri, source.storage_options.get("cache_dir")), "rb") as f:
            yield f
    else:
        # A local path goes to the decoder as a path: it then reads the file itself, without
        # a Python callback per read (~40,000 of them for a 7-minute MP3 in libsndfile). As
        # bytes where the name is not UTF-8 (soundfile would encode it strictly).
        try:
            uri.encode()
            yield uri
        except UnicodeEncodeError:
            yield os.fsencode(uri)


_GLOB_CHARS = re.compile(r"[*?\[]")


def spec_root(spec: str) -> str | None:
    """The location a SOURCE spec reads from, as a normalised path ("/abs/dir", or
    "s3://bucket/prefix" without a trailing slash); the part before any glob character. None
    for http(s) (a download lands in the cache, never in a store)."""
    if spec.startswith(("http://", "https://")):
        return None
    match = _GLOB_CHARS.search(spec)
    base = spec[:match.start()] if match else spec
    if match:
        base = base.rsplit("/", 1)[0] if "/" in base else "."
    if spec.startswith("s3://"):
        return base.rstrip("/")
    return os.path.realpath(base or ".")


def overlapping(a: str, b: str) -> bool:
    """Whether two locations from spec_root are the same, or one lies inside the other."""
    a, b = a.rstrip("/") or "/", b.rstrip("/") or "/"
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def check_out_apart_from_sources(specs: list[str], out: str) -> None:
    """A store must not be, contain or lie inside a source: preprocess would read its own
    output, or a rerun's --overwrite could reach the songs."""
    out_root = spec_root(out)
    for spec in specs:
        root = spec_root(spec)
        if root is not None and out_root is not None and overlapping(root, out_root):
            raise DwaveError(f"--out {out} overlaps the source {spec} (the same place, or one "
                             "inside the other): write the store somewhere else")
