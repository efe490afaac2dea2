"""Genres from a metadata CSV: FMA's ``tracks.csv`` (three header rows) or a plain
``track_id,genre`` file (one header row)."""

from __future__ import annotations

import contextlib
import csv
import io
import zipfile

from ..errors import DwaveError


def _normalise_id(track_id: str) -> str:
    track_id = track_id.strip()
    # isascii: '²'.isdigit() is true, and int('²') an error
    return str(int(track_id)) if track_id.isascii() and track_id.isdigit() else track_id


#: FMA's metadata archive holds its track table here.
FMA_TRACKS_MEMBER = "fma_metadata/tracks.csv"


@contextlib.contextmanager
def _open_table(path: str):
    """The CSV as text; FMA's fma_metadata.zip as it ships: its tracks.csv read in place."""
    # utf-8-sig: a spreadsheet's CSV export starts with a byte-order mark, which would
    # otherwise become part of the first header name ("\ufefftrack_id").
    if not zipfile.is_zipfile(path):
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield f
        return
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n == FMA_TRACKS_MEMBER] or \
            [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "tracks.csv"]
        if not names:
            raise DwaveError(f"metadata file {path} is a zip without a tracks.csv: unzip it and "
                             "pass the CSV that has the genres")
        with archive.open(names[0]) as raw:
            yield io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def load_genres(path: str) -> dict[str, str]:
    """Map track id -> genre. Tracks without a genre are left out. `path` is a CSV, or FMA's
    fma_metadata.zip (its tracks.csv)."""
    try:
        with _open_table(path) as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None:
                raise DwaveError(f"metadata file {path} is empty")
            if "track_id" in header:
                id_col = header.index("track_id")
                genre_col = _find(header, ("genre", "genre_top"), path)
            else:
                # FMA's tracks.csv: row 1 names the table (album/artist/set/track) of each
                # column, row 2 the field, row 3 is "track_id" and blanks.
                fields = next(rows, [])
                third = next(rows, [])
                if not third or third[0] != "track_id":
                    raise DwaveError(
                        f"metadata file {path}: expected a 'track_id' header column, or FMA's "
                        "tracks.csv with its three header rows"
                    )
                pairs = list(zip(header, fields))
                if ("track", "genre_top") not in pairs:
                    raise DwaveError(f"metadata file {path}: no track/genre_top column")
                id_col, genre_col = 0, pairs.index(("track", "genre_top"))
            genres = {}
            for row in rows:
                if len(row) > max(id_col, genre_col) and row[genre_col].strip():
                    genres[_normalise_id(row[id_col])] = row[genre_col].strip()
            return genres
    except OSError as exc:
        raise DwaveError(f"cannot read metadata file {path}: {exc.strerror}") from None
    except zipfile.BadZipFile as exc:
        raise DwaveError(f"metadata file {path} is a damaged zip ({exc})") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DwaveError(f"metadata file {path} is not a readable CSV: {exc}") from None


def _find(header: list[str], names: tuple[str, ...], path: str) -> int:
    for name in names:
        if name in header:
            return header.index(name)
    raise DwaveError(f"metadata file {path}: no column named {' or '.join(names)}")
