"""The track table: one row per track, stored column by column as JSON.

One home for the fields a store records of each track. A part of the store (a batch of songs
written by one preprocessing task) carries the table of its own tracks; the store's index carries
the table of every part it has folded in. Columns rather than rows: the field names are written
once per table instead of once per track, and a column of numbers parses fast
(100,000 tracks: a ~20 MB document read in one request).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# name -> what it holds. `part` and `offset` say where the codes are: samples
# [offset, offset + length) of parts/<part>/codes.
TRACK_FIELDS: dict[str, str] = {
    "id": "the track id (from the file name: 000123.mp3 -> 123)",
    "part": "the part whose codes array holds the track",
    "offset": "first sample of the track in that array",
    "length": "samples",
    "duration": "seconds",
    "sample_rate": "samples per second of the codes",
    "genre": "genre from --metadata, or null",
    "source": "where the song came from (path, s3:// or https:// URL, zip member)",
    "fingerprint": "the source's size + mtime, ETag or checksum: a rerun skips a track whose "
                   "source still has it",
    "source_sample_rate": "the song's own sample rate",
    "source_channels": "the song's own channel count",
    "peak": "the song's peak amplitude before normalisation",
    "length_source": "how the song's length was established: 'header' (decoded to the end and "
                     "checked against the count the file declares) or 'decoded' (the file "
                     "declares none: decoded to its last complete frame); null in stores "
                     "written before dwave recorded it (`dwave store verify --against-source`)",
    "decoder": "the decoder and its version (libsndfile 1.2.2; ffmpeg's libavcodec through PyAV)",
}
REQUIRED_FIELDS = ("id", "part", "offset", "length")


@dataclass
class TrackTable:
    """Columns of equal length, one per TRACK_FIELDS name."""

    columns: dict[str, list] = field(
        default_factory=lambda: {name: [] for name in TRACK_FIELDS})

    def __len__(self) -> int:
        return len(self.columns["id"])

    @classmethod
    def from_rows(cls, rows: list[dict]) -> "TrackTable":
        return cls({name: [row.get(name) for row in rows] for name in TRACK_FIELDS})

    def rows(self) -> list[dict]:
        names = list(TRACK_FIELDS)
        return [dict(zip(names, values)) for values in zip(*(self.columns[n] for n in names))]

    @classmethod
    def from_json(cls, data: dict, where: str) -> "TrackTable":
        """A table read back from a store; `where` names it in the error for a damaged one."""
        from ..errors import DwaveError

        try:
            lengths = {len(data[name]) for name in REQUIRED_FIELDS}
        except (KeyError, TypeError):
            raise DwaveError(f"{where}: the track table lacks a column of "
                             f"{', '.join(REQUIRED_FIELDS)}: the store is damaged") from None
        if len(lengths) != 1:
            raise DwaveError(f"{where}: the track table's columns differ in length: the store "
                             "is damaged")
        (rows,) = lengths
        return cls({name: list(data.get(name) or [None] * rows) for name in TRACK_FIELDS})

    def to_json(self) -> dict:
        return self.columns

    def extend(self, other: "TrackTable") -> None:
        for name in TRACK_FIELDS:
            self.columns[name].extend(other.columns[name])

    def select(self, keep: list[bool]) -> "TrackTable":
        return TrackTable({name: [v for v, k in zip(values, keep) if k]
                           for name, values in self.columns.items()})

    def extents(self):
        """(part, offset, length) of every track: where its codes lie in the store."""
        return zip(self.columns["part"], self.columns["offset"], self.columns["length"])

    def by_id(self) -> dict[str, dict]:
        return {row["id"]: row for row in self.rows()}
