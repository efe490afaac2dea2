"""Songs inside zip archives, read at the speed of files.

The Free Music Archive ships its songs as zips of ~106,000 bzip2-compressed members
(`fma_large/NNN/NNNNNN.mp3`, written by its `creation.py` with `zipfile.ZIP_BZIP2`). Opening a
member with `zipfile.ZipFile(archive).open(name)` parses the whole central directory first
(hundreds of milliseconds at 10^5 members, for every song) and, because a decoder seeks back
and forth, restarts the member's bzip2 stream on every backward seek. Instead the driver reads
the central directory once, when it lists the sources, and keeps each member's place
(:class:`ZipMember`); a worker then opens each archive once per part (:class:`ArchivePool`) and
reads a member with one seek and one read, decompresses it once and checks its CRC-32, and
hands the decoder the bytes in memory. A member larger than :data:`MEMBER_IN_MEMORY_BYTES` is
streamed through `zipfile` instead, so a worker's memory stays bounded.
"""

from __future__ import annotations

import bz2
import contextlib
import io
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import DwaveError

#: A member up to this size (uncompressed) is read whole into memory; a larger one is streamed.
#: 256 MiB is over 2 hours of 320 kbit/s MP3, and a few times what the decoded song then takes.
MEMBER_IN_MEMORY_BYTES = 256 << 20

_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # APPNOTE.TXT 4.3.7: 30 bytes
_LOCAL_SIGNATURE = b"PK\x03\x04"
# Bytes read past the fixed local header in the same read as the data: the name and extra
# field are usually shorter, so a member costs one read (one request on S3).
_HEADER_ROOM = 1024

_DECOMPRESSORS = {
    zipfile.ZIP_STORED: lambda data: data,
    zipfile.ZIP_DEFLATED: lambda data: zlib.decompress(data, -15),
    zipfile.ZIP_BZIP2: bz2.decompress,
}


@dataclass(frozen=True)
class ZipMember:
    """Where a member's bytes lie in its archive, from the central directory."""

    header_offset: int
    compress_type: int
    compress_size: int
    file_size: int
    crc: int
    flag_bits: int = 0

    @classmethod
    def of(cls, info: zipfile.ZipInfo) -> "ZipMember":
        return cls(info.header_offset, info.compress_type, info.compress_size, info.file_size,
                   info.CRC, info.flag_bits)

    @property
    def read_directly(self) -> bool:
        """Whether one read and a decompression in memory serve this member: a method of
        _DECOMPRESSORS, not encrypted, small enough to hold."""
        return (self.compress_type in _DECOMPRESSORS and not self.flag_bits & 0x1
                and self.file_size <= MEMBER_IN_MEMORY_BYTES)


class DamagedMember(DwaveError):
    """A zip member whose bytes are not what the archive's directory says."""


def read_member(archive: BinaryIO, member: ZipMember, name: str) -> bytes:
    """The member's uncompressed bytes, checked against its size and CRC-32."""
    archive.seek(member.header_offset)
    head = archive.read(_LOCAL_HEADER.size + _HEADER_ROOM + member.compress_size)
    if len(head) < _LOCAL_HEADER.size or head[:4] != _LOCAL_SIGNATURE:
        raise DamagedMember(f"zip member {name}: no local header at byte {member.header_offset} "
                            "(the archive is damaged or was replaced since it was listed)")
    fields = _LOCAL_HEADER.unpack_from(head)
    start = _LOCAL_HEADER.size + fields[-2] + fields[-1]  # + name length + extra length
    data = head[start:start + member.compress_size]
    if len(data) < member.compress_size:
        archive.seek(member.header_offset + start + len(data))
        data += archive.read(member.compress_size - len(data))
    if len(data) < member.compress_size:
        raise DamagedMember(f"zip member {name}: the archive ends {member.compress_size - len(data)}"
                            " bytes into its data (truncated archive)")
    try:
        out = _DECOMPRESSORS[member.compress_type](data)
    except (OSError, ValueError, zlib.error) as exc:
        raise DamagedMember(f"zip member {name}: cannot decompress it ({exc})") from None
    if len(out) != member.file_size or zlib.crc32(out) != member.crc:
        raise DamagedMember(f"zip member {name}: its bytes do not match the archive's CRC-32 "
                            "(damaged archive)")
    return out


class ArchivePool:
    """The archives a worker has open while it processes one part: each opened once, however
    many of its members the part holds; closed together."""

    def __init__(self):
        self._stack = contextlib.ExitStack()
        self._files: dict[str, BinaryIO] = {}
        self._zips: dict[str, zipfile.ZipFile] = {}

    def __enter__(self) -> "ArchivePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._files.clear()
        self._zips.clear()

    def file(self, archive: str, storage_options: dict) -> BinaryIO:
        if archive not in self._files:
            if archive.startswith("s3://"):
                import fsspec

                fs = fsspec.filesystem("s3", **storage_options)
                handle = fs.open(archive, "rb", block_size=4 << 20)
            else:
                handle = open(archive, "rb")
            self._files[archive] = self._stack.enter_context(handle)
        return self._files[archive]

    def zip(self, archive: str, storage_options: dict) -> zipfile.ZipFile:
        """The archive as a ZipFile (its central directory parsed once): for the members
        that are streamed."""
        if archive not in self._zips:
            self._zips[archive] = self._stack.enter_context(
                zipfile.ZipFile(self.file(archive, storage_options)))
        return self._zips[archive]

    @contextlib.contextmanager
    def open(self, archive: str, name: str, member: ZipMember | None,
             storage_options: dict):
        """A zip member as a seekable binary file."""
        if member is not None and member.read_directly:
            yield io.BytesIO(read_member(self.file(archive, storage_options), member, name))
            return
        try:
            with self.zip(archive, storage_options).open(name) as f:
                yield f
        except RuntimeError as exc:  # zipfile's word for an encrypted member
            raise DamagedMember(f"zip member {name}: {exc}") from None
