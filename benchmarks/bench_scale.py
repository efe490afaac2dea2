#!/usr/bin/env python
"""Archive scale: the store's bookkeeping and the streaming input as the number of tracks grows.

    python benchmarks/bench_scale.py [--sizes 1000,10000,100000] [--backends local,s3]
                                     [--out bench-output] [--repeat 3] [--latency-ms 30]

For each size N it builds a store of N synthetic tracks (random codes, TRACK_SAMPLES each, in
the real layout, written by TrackStore.write_part as preprocessing writes them) on local disk
and on a moto S3 server on loopback, and N real (1-byte) source files it claims to come from.
Then, each timed `--repeat` times (median), with the S3 requests each made (counted from moto's
own request log):

* index, whole fold: the index rebuilt from every part (a first run that wrote them all);
* index, end of a run: one new part folded in (what every later run does);
* open for training: scan_store + open_samplers (the store's config, index and parts listing);
* rerun, nothing to do: `dwave preprocess SOURCES --out STORE` when every song is stored;
* info: describe_store.

And the input pipeline, stream mode, on a store of STREAM_TRACKS 30-s clips (random access:
its speed does not depend on N): windows/s per rank for batches of 64
windows of the `small` preset's span, 1, 4 and 16 (stream mode's default) windows a read, with
1, 16 and 64 byte-range reads in flight, bytes and requests per window, against Zarr's own
reader of the same windows (the baseline); and memory mode: two processes ("ranks") mapping the
same store, their private and proportional memory against a private copy each.

Real S3 answers a request in ~20-50 ms where moto on loopback takes ~1 ms: each operation's
estimate at real S3 is its requests x --latency-ms when made one after another (an upper bound:
dwave issues the part reads of a fold and a batch's window reads concurrently).
Writes OUT/scale.json and OUT/scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import numpy as np  # noqa: E402

from machine import describe  # noqa: E402

TRACK_SAMPLES = 8192  # 0.5 s at 16 kHz: enough for one `small` span; N = 100,000 is 820 MB
# The input pipeline is measured on a store of fma_large's kind: STREAM_TRACKS clips of 30 s.
STREAM_TRACKS, CLIP_SAMPLES = 1000, 30 * 16000
TRACKS_PER_PART = 256  # preprocess.PART_MAX_SONGS: 30-s clips fill parts by count
SPAN = 5023  # the `small` preset's receptive field (1023) + a 4000-sample window
BATCH = 64
CONCURRENCY = (1, 16, 64)
WINDOWS_PER_READ = (1, 4, 16)  # one read per window, fewer, stream mode's default
OPERATIONS = ("index_fold_all", "index_end_of_run", "open_for_training", "rerun_nothing_to_do",
              "info")


class RequestLog:
    """S3 requests counted where they arrive: the lines of moto's own request log."""

    def __init__(self, path: str):
        self.path = path

    def count(self) -> int:
        with open(self.path, errors="replace") as f:
            return sum(1 for line in f if re.search(r"(GET|PUT|HEAD|POST|DELETE) /", line))


def start_s3(out: str):
    """A moto S3 server on loopback with its request log in a file: (process, log)."""
    from conftest import start_moto_server

    log_path = os.path.join(out, "scale-moto.log")
    server, endpoint = start_moto_server(log_path)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="scale")
    return server, RequestLog(log_path)


def make_sources(directory: str, n: int):
    """N one-byte files named as FMA names its songs: what the store's tracks claim to be."""
    from dwave.store.sources import expand_sources

    if not os.path.isdir(directory) or len(os.listdir(directory)) != n:
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
        for i in range(1, n + 1):
            with open(os.path.join(directory, f"{i:06d}.wav"), "wb") as f:
                f.write(b"x")
    return expand_sources([directory], {}, None).sources


def build_store(url: str, sources, rng, track_samples: int = TRACK_SAMPLES) -> float:
    """The store of len(sources) tracks; returns the seconds it took."""
    from dwave.store.track_store import TrackStore

    store = TrackStore(url)
    started = time.perf_counter()
    store.prepare(16000, 256, overwrite=True)
    per_part = min(TRACKS_PER_PART, max(1, (64 << 20) // track_samples))  # <= 64 MB a part
    block = rng.integers(0, 256, track_samples * per_part, dtype=np.uint8)
    for first in range(0, len(sources), per_part):
        batch = sources[first:first + per_part]
        rows = [{"id": s.track_id, "sample_rate": 16000, "duration": track_samples / 16000,
                 "source": s.uri, "fingerprint": s.fingerprint, "genre": None} for s in batch]
        codes = [block[i * track_samples:(i + 1) * track_samples] for i in range(len(batch))]
        store.write_part(f"bench{first:08d}", rows, codes)
    store.write_index([])
    return time.perf_counter() - started


def measure(operation, repeat: int, requests: RequestLog | None) -> dict:
    times, counts = [], []
    for i in range(repeat):
        before = requests.count() if requests else 0
        started = time.perf_counter()
        operation(i)
        times.append(time.perf_counter() - started)
        if requests:
            time.sleep(0.05)  # the log's last lines
            counts.append(requests.count() - before)
    return {"seconds": statistics.median(times), "all_seconds": times,
            "requests": int(statistics.median(counts)) if counts else None}


def bookkeeping(url: str, sources_dir: str, repeat: int, requests) -> dict:
    from dwave.train.data import open_samplers, scan_store
    from dwave.store.info import describe_store
    from dwave.store.preprocess import run_preprocess
    from dwave.store.track_store import Index, TrackStore

    store = TrackStore(url)

    def fold_all(_):
        store.write_index([], base=Index())

    def end_of_run(i):
        store.write_part(f"extra{i:04d}", [{"id": f"extra{i}", "source": "bench",
                                            "duration": TRACK_SAMPLES / 16000}],
                         [np.full(TRACK_SAMPLES, 128, np.uint8)])
        store.write_index([])

    def open_for_training(_):
        open_samplers(scan_store(url), SPAN, BATCH, 0, mode="stream", load=False)

    def rerun(_):
        summary = run_preprocess([sources_dir], url, progress=False, log=lambda *_: None)
        assert not summary.written and not summary.failures, "the rerun had work to do"

    return {name: measure(op, repeat, requests) for name, op in [
        ("index_fold_all", fold_all), ("index_end_of_run", end_of_run),
        ("open_for_training", open_for_training), ("rerun_nothing_to_do", rerun),
        ("info", lambda _: describe_store(url))]}


def streaming(url: str, requests, batches: int) -> dict:
    """Windows/s of stream mode for each windows-per-read and concurrency, bytes and requests
    per window, and Zarr's own reader of the same windows (the baseline)."""
    import zarr

    from dwave.train.data import open_samplers, scan_store
    from dwave.store.track_store import is_remote

    scan = scan_store(url)
    out = {"window_bytes": SPAN, "batch": BATCH, "rows": {}}
    for per_read in WINDOWS_PER_READ:
        for concurrency in CONCURRENCY if is_remote(url) else (1,):
            sampler = open_samplers(scan, SPAN, BATCH, 0, validation_fraction=0.0, mode="stream",
                                    load=False, windows_per_read=per_read).train
            sampler.concurrency = concurrency
            warm = 10_000 * sampler.steps_per_round
            sampler.batch(0, warm)  # warm: the connection pool, the first files
            reader = sampler._reader()
            reader.requests = reader.bytes_read = 0
            before = requests.count() if requests else 0
            steps = -(-batches // sampler.steps_per_round) * sampler.steps_per_round  # rounds
            started = time.perf_counter()
            for step in range(steps):
                sampler.batch(0, step)
            seconds = time.perf_counter() - started
            windows = steps * BATCH
            out["rows"][f"{per_read}/{concurrency}"] = {
                "windows_per_read": per_read, "in_flight": concurrency,
                "windows_per_s": windows / seconds,
                "bytes_per_window": reader.bytes_read / windows,
                "requests_per_window": ((requests.count() - before) / windows if requests
                                        else reader.requests / windows)}
    # Baseline: the same windows through Zarr's own reader of the part arrays.
    kwargs = {"storage_options": scan.store.storage_options} if is_remote(url) else {}
    arrays = {}
    windows = 0
    started = time.perf_counter()
    for step in range(max(1, batches // 4)):
        track, start = sampler.locate(0, step)
        for t, s in zip(track, start):
            tr = sampler.tracks[t]
            if tr.part not in arrays:
                arrays[tr.part] = zarr.open_array(f"{url}/parts/{tr.part}/codes", mode="r",
                                                  **kwargs)
            arrays[tr.part][tr.offset + s:tr.offset + s + SPAN]
            windows += 1
    out["zarr_reader_windows_per_s"] = windows / (time.perf_counter() - started)
    return out


RANK_SCRIPT = r"""
import json, sys, numpy as np
from dwave.train.data import open_training_data
data = open_training_data(sys.argv[1], %d, %d, 0, validation_fraction=0.0, mode=sys.argv[2])
if sys.argv[2] == "memory":
    total = sum(int(c.sum(dtype=np.int64)) for c in data.train.code_chunks())
else:  # a private copy of every track in one buffer, as memory mode held them before
    copy = np.empty(sum(t.length for t in data.train.tracks), np.uint8)
    at = 0
    for i, t in enumerate(data.train.tracks):
        copy[at:at + t.length] = data.train.read([(i, 0, t.length)])[0]
        at += t.length
    total = int(copy.sum(dtype=np.int64))
status = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith("Rss"))
rollup = dict(l.split(":", 1) for l in open("/proc/self/smaps_rollup") if ":" in l)
mb = lambda v: int(v.split()[0]) / 1024
print(json.dumps({"rss_anon_mb": mb(status["RssAnon"]), "rss_file_mb": mb(status["RssFile"]),
                  "pss_mb": mb(rollup["Pss"]), "checksum": total}), flush=True)
sys.stdin.readline()  # hold the memory until every rank has reported
""" % (SPAN, BATCH)


def memory_mode(url: str, ranks: int = 2) -> dict:
    """`ranks` processes on this node holding the store's tracks: mapped (memory mode) and, as
    the baseline, each reading a private copy."""
    from dwave.store.track_store import TrackStore

    data_mb = sum(TrackStore(url).current_index()[0].tracks.columns["length"]) / 2**20
    out = {"data_mb": data_mb, "ranks": ranks}
    for mode, label in (("memory", "mapped"), ("stream", "private_copy")):
        procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, url, mode], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for _ in range(ranks)]
        reports = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            p.communicate("\n", timeout=120)
        assert len({r["checksum"] for r in reports}) == 1
        out[label] = reports
    return out


def stream_rows(results: dict, backend: str, url: str, requests, batches: int) -> None:
    results["stream"][backend] = s = streaming(url, requests, batches)
    where = f"{STREAM_TRACKS} clips of 30 s, {backend}"
    for row in s["rows"].values():
        print(f"{where}: stream, {row['windows_per_read']} window(s) a read, "
              f"{row['in_flight']:>2} in flight: {row['windows_per_s']:8.0f} windows/s, "
              f"{row['bytes_per_window'] / SPAN:.2f}x the window's bytes, "
              f"{row['requests_per_window']:.3f} requests/window", flush=True)
    print(f"{where}: Zarr's own reader (baseline): {s['zarr_reader_windows_per_s']:8.0f} "
          "windows/s", flush=True)


def estimate(result: dict, latency_s: float) -> float | None:
    return None if result["requests"] is None else result["requests"] * latency_s


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for backend, by_size in results["bookkeeping"].items():
        sizes = sorted(int(n) for n in by_size)
        for op in OPERATIONS:
            style = "-" if backend == "local" else "--"
            axes[0].plot(sizes, [by_size[str(n)][op]["seconds"] for n in sizes], style,
                         marker="o", label=f"{op} ({backend})")
            if backend == "s3":
                axes[1].plot(sizes, [by_size[str(n)][op]["requests"] for n in sizes], style,
                             marker="o", label=op)
    for ax, ylabel in ((axes[0], "seconds (median)"), (axes[1], "S3 requests")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tracks in the store")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("store bookkeeping vs archive size")
    axes[1].set_title("S3 requests per operation (moto's log)")
    fig.suptitle(results["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--backends", default="local,s3")
    parser.add_argument("--out", default="bench-output")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=30.0,
                        help="real S3's time per request assumed for the estimates (30)")
    parser.add_argument("--batches", type=int, default=50,
                        help="batches of 64 windows timed per stream row (50)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    backends = args.backends.split(",")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    results = {"machine": describe(), "track_samples": TRACK_SAMPLES,
               "tracks_per_part": TRACKS_PER_PART, "latency_ms_assumed": args.latency_ms,
               "bookkeeping": {}, "build_seconds": {}, "stream": {}}
    print(f"bench_scale on {results['machine']}", flush=True)
    server, requests = (start_s3(out) if "s3" in backends else (None, None))
    rng = np.random.default_rng(0)
    try:
        for n in sizes:
            sources_dir = os.path.join(out, f"scale-sources-{n}")
            sources = make_sources(sources_dir, n)
            for backend in backends:
                url = (os.path.join(out, f"scale-store-{n}") if backend == "local"
                       else f"s3://scale/store-{n}")
                built = build_store(url, sources, rng)
                results["build_seconds"].setdefault(backend, {})[str(n)] = built
                figures = bookkeeping(url, sources_dir, args.repeat,
                                      requests if backend == "s3" else None)
                results["bookkeeping"].setdefault(backend, {})[str(n)] = figures
                for op, r in figures.items():
                    real = estimate(r, args.latency_ms / 1000)
                    print(f"N={n:>7,} {backend:<5} {op:<20} {r['seconds']:8.3f} s"
                          + (f"  {r['requests']:>5} requests  ~{real:.1f} s at "
                             f"{args.latency_ms:.0f} ms" if r["requests"] is not None else ""),
                          flush=True)
                if backend == "local":
                    shutil.rmtree(url)
        clips = make_sources(os.path.join(out, "scale-sources-clips"), STREAM_TRACKS)
        for backend in backends:
            url = (os.path.join(out, "scale-store-clips") if backend == "local"
                   else "s3://scale/store-clips")
            build_store(url, clips, rng, CLIP_SAMPLES)
            stream_rows(results, backend, url, requests if backend == "s3" else None,
                        args.batches)
            if backend == "local":
                results["memory_mode"] = memory_mode(url)
                m = results["memory_mode"]
                for label in ("mapped", "private_copy"):
                    print(f"memory mode, {m['ranks']} ranks, {m['data_mb']:.0f} MB of codes, "
                          f"{label}: " + "; ".join(
                              f"rank {i}: RssAnon {r['rss_anon_mb']:.0f} MB, RssFile "
                              f"{r['rss_file_mb']:.0f} MB, Pss {r['pss_mb']:.0f} MB"
                              for i, r in enumerate(m[label])), flush=True)
                shutil.rmtree(url)
    finally:
        if server:
            server.terminate()
            server.wait(10)
    with open(os.path.join(out, "scale.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.join(out, "scale.png"))
    print(f"wrote {out}/scale.json and {out}/scale.png")


if __name__ == "__main__":
    main()
