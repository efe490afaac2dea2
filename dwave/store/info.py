"""`dwave info`: what a store holds, from its index (one read over S3) and a listing of its
parts (parts a killed run wrote but did not index count; removed ones do not)."""

from __future__ import annotations

from collections import Counter

from ..errors import printable
from .sources import track_id_order
from .track_store import TrackStore


def describe_store(url: str, storage_options: dict | None = None) -> dict:
    store = TrackStore(url, storage_options)
    config = store.config()
    index, _ = store.current_index()
    table = index.tracks.columns
    # One listing: what is really there.
    damaged = store.damaged_parts(index.tracks.extents(), config.dtype.itemsize)
    tracks = sorted((t for t in index.tracks.rows() if t["part"] not in damaged),
                    key=lambda t: track_id_order(t["id"]))
    seconds = sum(t["duration"] for t in tracks)
    return {
        "store": store.url,
        "sample_rate": config.sample_rate,
        "quantization_channels": config.quantization_channels,
        "num_tracks": len(tracks),
        "num_samples": sum(t["length"] for t in tracks),
        "hours": seconds / 3600,
        "genres": dict(Counter(t["genre"] for t in tracks if t["genre"]).most_common()),
        "tracks": tracks,
        "failures": index.failures,
        "index_updated": index.updated,
        "written_by": store.root_attributes().get("written_by"),  # None: before dwave 0.1.0
        "damaged": {"parts": damaged,
                    "tracks": sum(1 for p in table["part"] if p in damaged)},
    }


def _software(versions: dict | None) -> str:
    if not versions:
        return "not recorded (a store from before dwave recorded its versions)"
    return ", ".join(f"{name} {version or 'absent'}" for name, version in versions.items())


def format_description(d: dict, max_rows: int = 50) -> str:
    lines = [
        f"store      {d['store']}",
        f"tracks     {d['num_tracks']} ({d['hours']:.2f} h, {d['num_samples']:,} samples)",
        f"format     {d['sample_rate']} Hz, {d['quantization_channels']}-level mu-law",
        "genres     " + (", ".join(f"{g} ({n})" for g, n in d["genres"].items()) or "none"),
        f"failures   {len(d['failures'])}",
        f"indexed    {d['index_updated'] or 'never (no run has finished)'}",
        f"created by {_software(d['written_by'])}",
    ]
    if d["damaged"]["tracks"]:
        lines.append(f"damaged    {d['damaged']['tracks']} track(s) in "
                     f"{len(d['damaged']['parts'])} part(s), not counted above: `dwave store "
                     "verify STORE` says which; a preprocess rerun writes them again")
    if d["tracks"]:
        lines += ["", f"{'id':<24} {'seconds':>9} {'genre':<16} source"]
        for t in d["tracks"][:max_rows]:
            lines.append(f"{printable(t['id']):<24} {t['duration']:>9.1f} "
                         f"{printable(t['genre'] or '-'):<16} {printable(t['source'])}")
        if len(d["tracks"]) > max_rows:
            lines.append(f"... and {len(d['tracks']) - max_rows} more (--json for all)")
    if d["failures"]:
        lines += ["", "failures:"]
        lines += [f"  {printable(f['source'])}: {printable(f['reason'])}"
                  for f in d["failures"]]
    return "\n".join(lines)
