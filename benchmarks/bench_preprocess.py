#!/usr/bin/env python
"""Preprocessing cost against the decode floor, Dask scaling, and worker memory on a long song.

    python benchmarks/bench_preprocess.py SONG_DIR [--out bench-output] [--copies 4]

Prints, for the songs in SONG_DIR (full-length 44.1 kHz stereo MP3s are the reference case;
`benchmarks/make_songs.sh` makes them from Debian's asc-music):

  (a) `ffmpeg -i SONG -f null -` per song: decoding alone, the floor;
  (b) dwave's whole per-track processing (decode, mono, resample, normalise, mu-law, Zarr write)
      on one core, and the ratio (b)/(a)  [target <= 1.2; the replaced system's chain ~10];
  (c) 30-s clips (fma_large's kind, cut from the songs without re-encoding): the marginal
      wall time per clip of `run_preprocess` through one Dask worker (runs of --clips and
      4x--clips clips), against one ffmpeg process decoding the same clips  [target <= 1.2:
      the per-task cost shared by a part's songs]; and, in-process on one core, the decoder
      alone and dwave's chain, against the same floor;
  (d) --zip-clips of those clips inside an FMA-shaped bzip2 zip of --zip-members members: per
      clip on one core against reading the member once plus ffmpeg's decode  [target <= 1.3],
      and 2 Dask workers' throughput against the same clips as files  [target >= 0.75];
  throughput with 1 and 2 Dask workers and the parallel efficiency  [target >= 90 %];
  peak memory of a Dask worker processing a 1-hour song  [target < 400 MB];
and writes OUT/preprocess_scaling.png (workers vs songs/s, with the ideal line) and
OUT/preprocess.json. Each timing is the best of --repeats runs: the machine is shared and noisy,
and ratios are taken between figures measured in this same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dwave.store.cluster import ClusterConfig  # noqa: E402
from dwave.store.preprocess import PartTask, TrackTask, process_part, run_preprocess  # noqa: E402
from dwave.store.sources import expand_sources  # noqa: E402
from dwave.store.track_store import TrackStore  # noqa: E402


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def ffmpeg_decode_seconds(path: str, repeats: int) -> float:
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "1",
               "-i", path, "-f", "null", "-"]
    return best_of(repeats, lambda: subprocess.run(command, check=True))


def ffmpeg_decode_all_seconds(paths: list[str], repeats: int) -> float:
    """One ffmpeg decoding every file in turn (its concat demuxer): the decode floor of a batch
    of short files, without a process start per file (~70 ms, more than a 30-s clip's decode)."""
    listing = os.path.join(os.path.dirname(paths[0]), "all.txt")
    with open(listing, "w") as f:
        f.writelines(f"file '{p}'\n" for p in paths)
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "1",
               "-f", "concat", "-safe", "0", "-i", listing, "-f", "null", "-"]
    return best_of(repeats, lambda: subprocess.run(command, check=True))


def dwave_track_seconds(source, store: TrackStore, config, repeats: int) -> float:
    part = PartTask("bench", (TrackTask(source, source.track_id, None),))

    def once():
        (result,) = process_part(part, store.url, store.storage_options, config)
        assert result["status"] == "written", result

    return best_of(repeats, once)


def make_hour_song(songs: list[str], directory: str) -> str:
    """Concatenate the MP3 frames of the songs (no re-encoding) until the result is >= 1 hour."""
    from dwave.store.audio import decode_to_mono

    durations = {song: decode_to_mono(song, 8000).duration for song in songs}
    total, parts = 0.0, []
    while total < 3600:
        for song in songs:
            parts.append(song)
            total += durations[song]
            if total >= 3600:
                break
    listing = os.path.join(directory, "parts.txt")
    with open(listing, "w") as f:
        f.writelines(f"file '{p}'\n" for p in parts)
    hour = os.path.join(directory, "one-hour.mp3")
    subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f",
                    "concat", "-safe", "0", "-i", listing, "-c", "copy", hour], check=True)
    return hour


def worker_peak_memory_mb(path: str, scratch: str) -> tuple[float, float, float]:
    """(baseline RSS, peak RSS, duration s) of a real Dask worker process given one long song."""
    from distributed import Client, LocalCluster

    def rss_mb():
        # VmHWM, the peak of this process's own memory map: getrusage's ru_maxrss survives
        # exec, so a spawned worker would report the RSS of the driver it was forked from.
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)

    store = TrackStore(os.path.join(scratch, "hour-store"))
    config = store.prepare(16000, 256, overwrite=True)
    (source,) = expand_sources([path]).sources
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("dwave.store.preprocess"))  # imports count in the baseline
        (baseline, _), = client.run(rss_mb).values()
        (result,) = client.submit(process_part, PartTask("hour", (TrackTask(source, "hour", None),)),
                                  store.url, store.storage_options, config).result()
        assert result["status"] == "written", result
        (_, peak), = client.run(rss_mb).values()
    return baseline, peak, result["duration"]


def throughput(song_dir: str, workers: int, scratch: str) -> tuple[float, int]:
    store = os.path.join(scratch, f"store-{workers}w")
    summary = run_preprocess([song_dir], store, cluster=ClusterConfig(workers=workers),
                             overwrite=True, progress=False, log=lambda *_: None)
    assert not summary.failures, summary.failures
    return len(summary.written) / summary.wall_seconds, len(summary.written)


def make_clips(songs: list[str], directory: str, count: int, seconds: float = 30.0) -> list[str]:
    """`count` clips of `seconds`, cut from the songs at successive offsets, MP3 frames copied."""
    from dwave.store.audio import decode_to_mono

    os.makedirs(directory, exist_ok=True)
    durations = {song: decode_to_mono(song, 8000).duration for song in songs}
    clips = []
    for i in range(count):
        song = songs[i % len(songs)]
        offset = (i // len(songs)) * seconds % max(1.0, durations[song] - seconds)
        clip = os.path.join(directory, f"{800000 + i:06d}.mp3")
        subprocess.run(["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-ss",
                        str(offset), "-t", str(seconds), "-i", song, "-c", "copy", clip],
                       check=True)
        clips.append(clip)
    return clips


def plot_scaling(points: dict[int, float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workers = sorted(points)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(workers, [points[w] for w in workers], "o-", label="dwave preprocess (measured)")
    ax.plot(workers, [points[workers[0]] * w / workers[0] for w in workers], "k--",
            label="ideal (linear)")
    ax.set_xlabel("Dask workers (1 core each)")
    ax.set_ylabel("songs / s")
    ax.set_xticks(workers)
    ax.set_ylim(bottom=0)
    ax.set_title("Preprocessing throughput vs workers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def clip_row(songs: list[str], scratch: str, count: int, repeats: int) -> dict:
    """Row (c): 30-s clips. The Dask figure is the marginal cost of a clip, the slope between
    runs of `count` and 4x`count` clips: a run's fixed cost (the worker's first imports, the
    first part's start, ~1 s) is not a per-clip cost, and at 64 clips it alone adds ~15 ms a clip.
    Beside it, on one core in this process: libsndfile's decode alone and dwave's whole chain
    without the store write, which split the ratio into what the decoder costs and what
    dwave adds (mono, resample, normalise, mu-law)."""
    from dwave.store.audio import (DECODE_BLOCK_FRAMES, DEFAULT_QUANTIZATION_CHANNELS,
                                   DEFAULT_SAMPLE_RATE)
    from dwave.store.decoders import choose_decoder
    from dwave.store.preprocess import decode_track
    from dwave.store.track_store import StoreConfig

    clips = make_clips(songs, os.path.join(scratch, "clips"), 4 * count)
    few = os.path.join(scratch, "clips-few")
    os.makedirs(few)
    for clip in clips[:count]:
        shutil.copy(clip, few)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    # Every per-clip figure is taken over the same clips: those the larger run adds.
    extra = clips[count:]
    floor = ffmpeg_decode_all_seconds(extra, repeats) / len(extra)

    def each(fn, items):
        for item in items:
            fn(item)  # the result dropped at once: held, 4x`count` decoded clips are ~2 GB

    def decode_only(clip):
        for _ in choose_decoder(clip).blocks(clip, DECODE_BLOCK_FRAMES):
            pass

    decode = best_of(repeats, lambda: each(decode_only, extra))
    decode /= len(extra)
    config = StoreConfig(DEFAULT_SAMPLE_RATE, DEFAULT_QUANTIZATION_CHANNELS)
    tasks = [TrackTask(s, s.track_id, None) for s in expand_sources(extra).sources]
    chain = best_of(repeats, lambda: each(lambda t: decode_track(t, config, 3600.0), tasks))
    chain /= len(extra)
    os.sched_setaffinity(0, set(range(os.cpu_count())))

    def run_seconds(directory: str, n: int) -> float:
        summary = run_preprocess([directory], os.path.join(scratch, "clip-store"),
                                 cluster=ClusterConfig(workers=1), overwrite=True,
                                 progress=False, log=lambda *_: None)
        assert len(summary.written) == n, summary.failures
        return summary.wall_seconds

    slopes, fixed = [], []
    for _ in range(repeats):
        small, large = run_seconds(few, count), run_seconds(os.path.join(scratch, "clips"),
                                                            len(clips))
        slopes.append((large - small) / len(extra))
        fixed.append(small - count * slopes[-1])
    slope = sorted(slopes)[len(slopes) // 2]  # the median: a difference of two noisy runs
    print(f"30-s clips, one core in-process: the decoder alone {decode * 1000:.1f} ms "
          f"({decode / floor:.2f}x ffmpeg's {floor * 1000:.1f} ms), dwave's chain without the "
          f"store write {chain * 1000:.1f} ms ({chain / floor:.2f}x)")
    print(f"30-s clips through one Dask worker ({count} and {len(clips)} clips): marginal "
          f"{slope * 1000:.1f} ms per clip -> ratio {slope / floor:.2f} (target <= 1.2); "
          f"fixed cost of a run {sorted(fixed)[len(fixed) // 2]:.2f} s")
    return {"clips": len(clips), "clip_ffmpeg_s": floor, "clip_decode_s": decode,
            "clip_chain_s": chain, "clip_dwave_s": slope, "clip_ratio": slope / floor,
            "clip_run_fixed_s": sorted(fixed)[len(fixed) // 2]}


def make_fma_zip(clips: list[str], path: str, members: int) -> str:
    """An archive of FMA's shape (its creation.py: ZIP_BZIP2, fma_large/NNN/NNNNNN.mp3 beside
    README.txt and checksums) with `members` songs: the clips, and one-frame MP3s filling the
    rest so that the central directory is FMA's size (the filler is bzip2 at level 1, which only
    makes this archive quicker to write)."""
    filler_song = os.path.join(os.path.dirname(path), "filler.mp3")
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", clips[0], "-t",
                    "0.03", "-c", "copy", filler_song], check=True)
    filler = open(filler_song, "rb").read()
    stamp = (2017, 4, 1, 0, 0, 0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_BZIP2) as z:
        z.writestr(zipfile.ZipInfo("fma_large/README.txt", stamp), "This .zip archive is part "
                   "of the FMA, a dataset for music analysis.\n")
        z.writestr(zipfile.ZipInfo("fma_large/checksums", stamp), "")
        for i in range(members - len(clips)):
            z.writestr(zipfile.ZipInfo(f"fma_large/{i // 1000:03d}/{i:06d}.mp3", stamp), filler,
                       compresslevel=1)
        for clip in clips:
            name = os.path.basename(clip)
            z.write(clip, f"fma_large/{name[:3]}/{name}")
    return path


def fma_zip_row(clip_dir: str, scratch: str, members: int, repeats: int) -> dict:
    """Row (d): the same 30-s clips as files and as members of an FMA-shaped zip of `members`
    members. Per clip, on one core in this process: reading the member once (zipfile, its
    bzip2 stream decompressed) plus ffmpeg's decode of the clip is the floor; dwave's chain
    through the zip (ArchivePool: each archive opened once per part) against it, and the old
    way (a ZipFile per song, which parses the whole central directory, then the decoder seeking
    in the bzip2 stream). Then both as whole `run_preprocess` runs on 2 Dask workers."""
    from dwave.store.audio import DEFAULT_QUANTIZATION_CHANNELS, DEFAULT_SAMPLE_RATE, \
        decode_to_mono
    from dwave.store.preprocess import decode_track
    from dwave.store.track_store import StoreConfig
    from dwave.store.zip_members import ArchivePool

    clips = sorted(os.path.join(clip_dir, c) for c in os.listdir(clip_dir) if c.endswith(".mp3"))
    started = time.perf_counter()
    archive = make_fma_zip(clips, os.path.join(scratch, "fma_large.zip"), members)
    print(f"FMA-shaped zip: {members:,} members, {os.path.getsize(archive) / 1e6:.0f} MB, "
          f"written in {time.perf_counter() - started:.0f} s")
    clip_members = f"{archive}::fma_large/{os.path.basename(clips[0])[:3]}/*"
    started = time.perf_counter()
    sources = expand_sources([clip_members]).sources
    listing = time.perf_counter() - started
    assert len(sources) == len(clips), (len(sources), len(clips))
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    names = [zip_member_name(s.uri) for s in sources]
    with zipfile.ZipFile(archive) as z:
        read_once = best_of(repeats, lambda: [z.read(n) for n in names]) / len(clips)
    floor = ffmpeg_decode_all_seconds(clips, repeats) / len(clips) + read_once
    config = StoreConfig(DEFAULT_SAMPLE_RATE, DEFAULT_QUANTIZATION_CHANNELS)
    tasks = [TrackTask(s, s.track_id, None) for s in sources]

    def through_pool():
        with ArchivePool() as archives:
            for task in tasks:
                result, _, _ = decode_track(task, config, 3600.0, archives)
                assert result["status"] == "written", result

    def zipfile_per_song():  # how dwave opened a member before ArchivePool
        for name in names:
            with zipfile.ZipFile(archive) as z, z.open(name) as f:
                decode_to_mono(f, DEFAULT_SAMPLE_RATE)

    file_tasks = [TrackTask(s, s.track_id, None) for s in expand_sources(clips).sources]
    as_files = best_of(repeats, lambda: [decode_track(t, config, 3600.0) for t in file_tasks])
    ours = best_of(repeats, through_pool) / len(clips)
    before = best_of(1, zipfile_per_song) / len(clips)
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    print(f"FMA-shaped zip, one core in-process, per 30-s clip: reading the member once "
          f"{read_once * 1000:.1f} ms + ffmpeg's decode = floor {floor * 1000:.1f} ms; dwave "
          f"through the zip {ours * 1000:.1f} ms -> {ours / floor:.2f}x (target <= 1.3); the same "
          f"clips as files {as_files / len(clips) * 1000:.1f} ms; a ZipFile per song (before) "
          f"{before * 1000:.1f} ms; listing the archive once {listing:.2f} s")

    def rate(spec: str) -> float:
        summary = run_preprocess([spec], os.path.join(scratch, "zip-store"),
                                 cluster=ClusterConfig(workers=2), overwrite=True,
                                 progress=False, log=lambda *_: None)
        assert len(summary.written) == len(clips), summary.failures
        return len(summary.written) / summary.wall_seconds

    runs = [(rate(clip_dir), rate(clip_members)) for _ in range(repeats)]
    files_rate = max(r[0] for r in runs)
    zip_rate = max(r[1] for r in runs)
    print(f"2 Dask workers, {len(clips)} clips: as files {files_rate:.2f} songs/s, from the "
          f"{members:,}-member zip {zip_rate:.2f} songs/s -> {zip_rate / files_rate:.2f} of the "
          "files' throughput (target >= 0.75)")
    return {"zip_members": members, "zip_clips": len(clips), "zip_listing_s": listing,
            "zip_member_read_s": read_once, "zip_floor_s": floor, "zip_dwave_s": ours,
            "zip_ratio": ours / floor, "zip_files_s": as_files / len(clips),
            "zip_zipfile_per_song_s": before, "zip_files_songs_per_s": files_rate,
            "zip_songs_per_s": zip_rate, "zip_throughput_share": zip_rate / files_rate}


def zip_member_name(uri: str) -> str:
    from dwave.store.sources import zip_member

    return zip_member(uri)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("song_dir")
    parser.add_argument("--out", default="bench-output")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clips", type=int, default=64, help="30-s clips for row (c) (64)")
    parser.add_argument("--zip-members", type=int, default=100_000,
                        help="members of row (d)'s FMA-shaped zip (100,000)")
    parser.add_argument("--zip-clips", type=int, default=40,
                        help="30-s clips among them, the ones measured (40)")
    parser.add_argument("--sections", default="songs,clips,zip,scaling,memory",
                        help="which rows to run, comma-separated (all)")
    parser.add_argument("--copies", type=int, default=4,
                        help="each song is queued this many times (as links) for the Dask runs")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    sources = expand_sources([args.song_dir]).sources
    if not sources:
        sys.exit(f"no songs in {args.song_dir}")

    sections = set(args.sections.split(","))
    figures: dict = {"machine": machine_line(), "songs": []}
    print(figures["machine"])
    points = {}
    with tempfile.TemporaryDirectory() as scratch:
        if "songs" in sections:
            figures.update(song_rows(sources, scratch, args.repeats))
        if "clips" in sections:
            figures.update(clip_row([s.uri for s in sources], scratch, args.clips, args.repeats))
        if "zip" in sections:
            zip_clips = make_clips([s.uri for s in sources], os.path.join(scratch, "zip-clips"),
                                   args.zip_clips)
            figures.update(fma_zip_row(os.path.dirname(zip_clips[0]), scratch, args.zip_members,
                                       args.repeats))
        os.sched_setaffinity(0, set(range(os.cpu_count())))
        if "scaling" in sections:
            points = scaling_rows(sources, scratch, args.copies)
            figures.update(throughput_songs_per_s=points,
                           parallel_efficiency=points[2] / (2 * points[1]))
        if "memory" in sections:
            hour = make_hour_song([s.uri for s in sources], scratch)
            baseline, peak, duration = worker_peak_memory_mb(hour, scratch)
            figures.update(worker_baseline_mb=baseline, worker_peak_mb=peak,
                           long_song_minutes=duration / 60)
            print(f"Dask worker on a {duration / 60:.0f}-minute song: peak RSS {peak:.0f} MB "
                  f"(idle worker with dwave imported: {baseline:.0f} MB) (target < 400 MB)")
            shutil.rmtree(os.path.join(scratch, "hour-store"), ignore_errors=True)

    if points:
        png = os.path.join(args.out, "preprocess_scaling.png")
        plot_scaling(points, png)
        print(f"wrote {png}")
    with open(os.path.join(args.out, "preprocess.json"), "w") as f:
        json.dump(figures, f, indent=2)
    print(f"wrote {os.path.join(args.out, 'preprocess.json')}")
    return 0


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores"


def song_rows(sources, scratch: str, repeats: int) -> dict:
    """Rows (a) and (b): each song's decode floor and dwave's whole per-track cost."""
    from dwave.store.audio import decode_to_mono

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # (a) and (b) on one core
    store = TrackStore(os.path.join(scratch, "single"))
    config = store.prepare(16000, 256, overwrite=True)
    rows = []
    print(f"{'song':<28} {'length':>8} {'format':>14} {'ffmpeg (a)':>11} {'dwave (b)':>10} "
          f"{'b/a':>6}")
    for source in sources:
        decoded = decode_to_mono(source.uri, 16000)  # the length decoded, not the header's
        floor = ffmpeg_decode_seconds(source.uri, repeats)
        ours = dwave_track_seconds(source, store, config, repeats)
        row = {"song": os.path.basename(source.uri), "seconds_of_audio": decoded.duration,
               "ffmpeg_s": floor, "dwave_s": ours, "ratio": ours / floor}
        rows.append(row)
        print(f"{row['song']:<28} {decoded.duration / 60:>6.1f} m "
              f"{decoded.source_sample_rate:>6} Hz x{decoded.source_channels} {floor:>10.3f}s "
              f"{ours:>9.3f}s {ours / floor:>6.2f}")
    total_floor = sum(r["ffmpeg_s"] for r in rows)
    total_ours = sum(r["dwave_s"] for r in rows)
    print(f"per-song cost, all songs: dwave {total_ours / len(sources):.3f} s vs ffmpeg "
          f"decode {total_floor / len(sources):.3f} s -> ratio {total_ours / total_floor:.2f} "
          "(target <= 1.2)")
    return {"songs": rows, "ratio": total_ours / total_floor}


def scaling_rows(sources, scratch: str, copies: int) -> dict[int, float]:
    queue = os.path.join(scratch, "queue")
    os.makedirs(queue)
    for copy in range(copies):
        for i, source in enumerate(sources):
            # Copies, not links: dwave counts one real file reached by two paths once.
            shutil.copy(source.uri, os.path.join(queue, f"{900000 + copy * 1000 + i:06d}.mp3"))
    points = {}
    for workers in (1, 2):
        rate, count = throughput(queue, workers, scratch)
        points[workers] = rate
        print(f"Dask, {workers} worker(s): {count} songs at {rate:.2f} songs/s")
    print(f"parallel efficiency at 2 workers: {points[2] / (2 * points[1]):.0%} (target >= 90 %)")
    return points




if __name__ == "__main__":
    sys.exit(main())
