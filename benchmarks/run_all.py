#!/usr/bin/env python
"""Run the four benchmarks and gather every figure into one table.

    python benchmarks/run_all.py [--out bench-output] [--only preprocess,train,learning,generate,scale]
                                 [--publish benchmarks/results] [--reference-dir DIR]

1. preprocess: full-length 44.1 kHz MP3s made from Debian's asc-music (benchmarks/make_songs.sh),
   bench_preprocess.py (decode overhead vs ffmpeg, Dask scaling, worker memory);
2. train: a store of those songs (`dwave preprocess`), bench_train.py for `base` (batch 1 x 4000)
   and `small` (4 x 4000): 1 thread and all cores against Keras, Horovod against independent
   processes, bf16, the roofline, the allreduce projection;
3. learning: the held-out half of the game-soundtrack corpus (benchmarks/make_corpus.sh),
   bench_learning.py (the `small` preset at its defaults for 800 steps, seeds 0, 1, 2,
   validation bits/sample against the store's code histogram and bigram); with
   --reference-dir, the reference WaveNet on the same batches too (~25 minutes);
4. generate: bench_generate.py (naive vs cached, 1/16/64 songs); generate_job: its job,
   memory and agreement sections (stopped and resumed, peak RSS against --seconds and
   --prime-seconds, the CUDA engine against the CPU engine in Numba's simulator; ~35 minutes);
5. scale: bench_scale.py (stores of 1k, 10k and 100k tracks, local and on moto S3: bookkeeping
   time and requests, stream windows/s, memory mode's one copy per node); ~30 minutes alone.

Writes OUT/summary.md and OUT/summary.json (every figure, its target, and the machine it ran
on) next to each benchmark's JSON and PNG; --publish copies them all into the given folder
(benchmarks/results/HISTORY.md explains them; the README shows the headline rows). Takes
about 25 minutes on a 2-core machine. Run nothing else meanwhile: the figures are only as quiet
as the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench_train import bf16_products_only, dwave_row  # noqa: E402
from machine import cpu_model  # noqa: E402

from dwave.train.config import STREAM_WINDOWS_PER_READ  # noqa: E402
STAGES = ("preprocess", "train", "learning", "generate", "generate_job", "scale")
# bench_train's presets and per-rank batches: the issue-12 figures (base 1 x 4000, small 4 x 4000).
TRAIN_BENCHMARKS = {"base": 1, "small": 4}
# The learning stage: one run per seed on the held-out half, the figures their mean.
LEARNING_SEEDS = (0, 1, 2)


def machine() -> dict:
    try:
        with open("/proc/meminfo") as f:
            memory_gib = int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        memory_gib = float("nan")
    return {"host": platform.node(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "memory_gib": round(memory_gib, 1), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def rows(figures: dict) -> list[dict]:
    """One row per figure: benchmark, what, value, unit, target (text) and met (bool or None)."""
    out = []

    def add(bench, what, value, unit="", target=None, met=None):
        out.append({"benchmark": bench, "figure": what, "value": value, "unit": unit,
                    "target": target, "met": met})

    p = figures.get("preprocess")
    if p:
        add("preprocess", "dwave / ffmpeg decode time per song", p["ratio"], "x", "<= 1.2",
            p["ratio"] <= 1.2)
        if "clip_ratio" in p:
            add("preprocess", f"30-s clips, marginal per clip through one Dask worker / ffmpeg "
                f"decode per clip ({p['clips']} clips)", p["clip_ratio"], "x", "<= 1.2",
                p["clip_ratio"] <= 1.2)
            if "clip_chain_s" in p:
                add("preprocess", "30-s clips in-process: dwave's decoder / ffmpeg decode",
                    p["clip_decode_s"] / p["clip_ffmpeg_s"], "x")
                add("preprocess", "30-s clips in-process: dwave's chain (no store write) / "
                    "ffmpeg decode", p["clip_chain_s"] / p["clip_ffmpeg_s"], "x")
        if "zip_ratio" in p:
            add("preprocess", f"30-s clips in an FMA-shaped zip of {p['zip_members']:,} members, "
                "per clip / (member read once + ffmpeg decode)", p["zip_ratio"], "x", "<= 1.3",
                p["zip_ratio"] <= 1.3)
            add("preprocess", "the same clips' throughput from the zip / as files, 2 workers",
                p["zip_throughput_share"], "", ">= 0.75 (out of reach: the member's bzip2 "
                "costs as much as its decode)", p["zip_throughput_share"] >= 0.75)
        for workers, rate in sorted(p["throughput_songs_per_s"].items()):
            add("preprocess", f"throughput, {workers} Dask worker(s)", rate, "songs/s")
        add("preprocess", "parallel efficiency 1 -> 2 workers", p["parallel_efficiency"], "",
            ">= 0.90", p["parallel_efficiency"] >= 0.9)
        add("preprocess", f"worker peak memory, {p['long_song_minutes']:.0f}-min song",
            p["worker_peak_mb"], "MB", "< 400", p["worker_peak_mb"] < 400)
    for preset, t in figures.get("train", {}).items():
        name = f"{preset}, batch {t['batch_size_per_rank']} x {t['window']}"
        for row, r in t["rows"].items():
            add("train", f"{name}: {row}", r["samples_per_s"], "samples/s")
        for threads, speedup in t["speedup_over_keras"].items():
            add("train", f"{name}: dwave / Keras, {threads} thread(s)", speedup, "x", ">= 1.5",
                speedup >= 1.5)
        for launcher, e in t["horovod_efficiency"].items():
            add("train", f"{name}: Horovod {launcher}, {t['ranks']} ranks / {t['ranks']} "
                "independent processes", e["vs_independent"], "", ">= 0.90",
                e["vs_independent"] >= 0.9)
        for threads, speedup in (t.get("bf16_speedup") or {}).items():
            add("train", f"{name}: bf16 / fp32, {threads} thread(s)", speedup, "x", ">= 1.5",
                speedup >= 1.5)
        for threads, products in (t.get("bf16_products_speedup") or {}).items():
            add("train", f"{name}: bf16 / fp32, the step's products alone, {threads} thread(s)",
                products, "x")
            add("train", f"{name}: bf16 / fp32 if only the products changed, {threads} "
                "thread(s)", bf16_products_only(t, threads), "x")
        one = t["rows"][dwave_row(1)]
        add("train", f"{name}: achieved / the step's products alone, 1 thread",
            one["of_dense_rate"], "", ">= 0.40", one["of_dense_rate"] >= 0.4)
        add("train", f"{name}: store / synthetic input, {t['ranks']} ranks",
            t["store_over_synthetic_ranks"], "", ">= 0.95", t["store_over_synthetic_ranks"] >= 0.95)
        if preset == "base":
            for p_row in t["projection_gpu_step"]:
                add("train", f"projection: {p_row['gpus']} GPUs, {p_row['link_gbps']} Gb/s, "
                    f"{t['assumed_gpu_step_ms']:.0f} ms step", p_row["efficiency"], "efficiency")
    lr = figures.get("learning")
    if lr:
        b = lr["baselines"]
        add("learning", "code histogram (unigram) baseline", b["unigram_bits"], "bits/sample")
        add("learning", "bigram baseline p(x_t \\| x_t-1)", b["bigram_bits"], "bits/sample")
        for h in lr["history"]:
            target = {400: ("< bigram", h["bits"] < b["bigram_bits"]),
                      800: ("<= bigram - 0.6", h["bits"] <= b["bigram_bits"] - 0.6)}.get(
                h["step"], (None, None))
            add("learning", f"{lr['preset']}, validation at step {h['step']}", h["bits"],
                "bits/sample", *target)
    if lr and "reference" in lr:
        mine = {h["step"]: h["bits"] for h in lr["history"]}
        for h in lr["reference"]:
            gap = mine[h["step"]] - h["bits"]
            add("learning", f"dwave - reference WaveNet (ibab, {h['bits']:.3f}), same batches, "
                f"step {h['step']}", round(gap, 3), "bits/sample",
                *(("<= 0", gap <= 0) if h["step"] >= 200 else (None, None)))
        ratio = lr.get("time_ratio_of_means")
        if ratio is not None:
            add("learning", "time to the reference's step-800 loss, dwave / reference (mean "
                "curves)", ratio, "", "<= 0.6", ratio <= 0.6)
    sc = figures.get("scale")
    if sc:
        scale_rows(sc, add)
    g = figures.get("generate")
    if g:
        naive = g["naive"]
        add("generate", "naive, full pass per sample", naive, "samples/s")
        for songs in (1, 16, 64):
            rate = g[f"fast_{songs}"]
            target = {1: (">= 5,000", rate >= 5000), 64: (">= 32,000", rate >= 32000)}.get(
                songs, (None, None))
            add("generate", f"fast, {songs} song(s), aggregate", rate, "samples/s", *target)
        add("generate", "fast 1 song / naive", g["fast_1"] / naive, "x", ">= 100",
            g["fast_1"] / naive >= 100)
        add("generate", "fast 1 song, real-time factor", g["fast_1"] / g["sample_rate"], "x",
            "stretch >= 1", g["fast_1"] >= g["sample_rate"])
        add("generate", "fast, 64 songs, one thread", g["fast_64_one_thread"], "samples/s")
        products = g["products"]
        add("generate", f"step products, {products['rows']} songs, tiled kernel",
            products["tiled_gflops"], "GFLOP/s")
        add("generate", f"step products, {products['rows']} songs, BLAS (one core)",
            products["blas_gflops"], "GFLOP/s")
    j = figures.get("generate_job")
    if j:
        generate_job_rows(j, add)
    return out


def generate_job_rows(j: dict, add) -> None:
    """bench_generate.py --sections job,memory,agreement[,cuda]: preemption, memory, engines."""
    if "job" in j:
        summary, preset = j["job"]["summary"], j["job"]["preset"]
        add("generate job", f"stopped halfway + resumed: files identical ({preset})",
            summary["identical_files"], "", "identical", summary["identical_files"])
        add("generate job", "extra generation time, a save every minute",
            100 * summary["save_overhead_every_minute"], "%", "<= 5",
            summary["save_overhead_every_minute"] <= 0.05)
        add("generate job", "stopped + resumed, extra wall time (two process starts)",
            100 * summary["preempt_resume_extra_wall"], "%")
    if "memory" in j:
        m = j["memory"]
        sizes = [k for k in m["seconds"] if k != "growth"]
        for size in sizes:
            add("generate job", f"peak RSS, {m['preset']}, --seconds {float(size):g}",
                m["seconds"][size]["peak_rss_mb"], "MB")
        longest = m["seconds"]["growth"][sizes[-1]]
        add("generate job", f"peak RSS --seconds {float(sizes[-1]):g} / {float(sizes[0]):g}",
            longest, "x", "<= 1.5", longest <= 1.5)
        primes = [k for k in m["prime_seconds"] if k != "growth"]
        add("generate job", f"peak RSS --prime-seconds {float(primes[-1]):g} / "
            f"{float(primes[0]):g}", m["prime_seconds"]["growth"][primes[-1]], "x")
    if "agreement" in j:
        a = j["agreement"]
        where = "simulator" if a["simulator"] else "GPU"
        add("generate job", f"CUDA vs CPU engine, same code per draw ({a['preset']}, {where}, "
            f"{a['draws']} draws)", a["same_code_share"], "")
        add("generate job", "CUDA vs CPU engine, largest logit difference",
            a["max_logit_difference"], "")
    if "cuda" in j:
        add("generate job", "CUDA 1,024 songs / one CPU core (base)",
            j["cuda"]["cuda_1024_over_one_cpu_core"], "x", ">= 100",
            j["cuda"]["cuda_1024_over_one_cpu_core"] >= 100)
    else:
        add("generate job", "CUDA engine speed", "not measured (no GPU)", "", ">= 100 x one "
            "core at 1,024 songs", None)


# bench_scale's targets at the largest N on loopback S3: (seconds, what the issue asks).
SCALE_TARGETS = {"open_for_training": 10, "index_end_of_run": 30, "rerun_nothing_to_do": 60}


def scale_rows(sc: dict, add) -> None:
    latency = sc["latency_ms_assumed"] / 1000
    for backend, by_size in sc["bookkeeping"].items():
        sizes = sorted(by_size, key=int)
        for op in by_size[sizes[0]]:
            times = [by_size[n][op]["seconds"] for n in sizes]
            growth = "; ".join(f"{int(n):,}: {t:.3f} s" for n, t in zip(sizes, times))
            largest = by_size[sizes[-1]][op]
            limit = SCALE_TARGETS.get(op) if backend == "s3" else None
            add("scale", f"{op}, {backend} ({growth})", largest["seconds"], "s",
                f"<= {limit} s" if limit else None,
                largest["seconds"] <= limit if limit else None)
            if largest["requests"] is not None:
                real = largest["requests"] * latency
                add("scale", f"{op}, S3 requests at {int(sizes[-1]):,} tracks (~{real:.1f} s at "
                    f"{sc['latency_ms_assumed']:.0f} ms each)", largest["requests"], "requests",
                    "<= 5 min at 30 ms", real <= 300)
    for backend, st in sc["stream"].items():
        for row in st["rows"].values():
            name = (f"stream, {backend}, {row['windows_per_read']} window(s) a read, "
                    f"{row['in_flight']} in flight")
            # The targets are the default's (other rows show what grouping the reads buys).
            target = (None, None) if row["windows_per_read"] != STREAM_WINDOWS_PER_READ else (
                (">= 2,000", row["windows_per_s"] >= 2000) if backend == "local" else
                (">= 1,000", row["windows_per_s"] >= 1000))
            add("scale", name, row["windows_per_s"], "windows/s", *target)
            ratio = row["bytes_per_window"] / st["window_bytes"]
            add("scale", f"{name}: bytes read / window's bytes", ratio, "x", "<= 4", ratio <= 4)
        add("scale", f"stream, {backend}: Zarr's own reader of the same windows (baseline)",
            st["zarr_reader_windows_per_s"], "windows/s")
    m = sc.get("memory_mode")
    if m:
        for label in ("mapped", "private_copy"):
            pss = sum(r["pss_mb"] for r in m[label])
            add("scale", f"memory mode, {m['ranks']} ranks, {m['data_mb']:.0f} MB of codes, "
                f"{label}: proportional memory of all ranks", pss, "MB")


def markdown(rows_: list[dict], host: dict) -> str:
    lines = [f"Benchmarks on {host['host']}: {host['cpu']}, {host['cores']} cores, "
             f"{host['memory_gib']} GiB, Python {host['python']}, {host['date']}", "",
             "| benchmark | figure | value | target | met |", "|---|---|---:|---|---|"]
    for r in rows_:
        value = r["value"]
        if isinstance(value, (bool, str)):  # a yes/no or a sentence: as it is
            text = {True: "yes", False: "no"}.get(value, value)
        else:
            text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        lines.append(f"| {r['benchmark']} | {r['figure']} | {text} {r['unit']} | "
                     f"{r['target'] or ''} | {met} |")
    return "\n".join(lines) + "\n"


# TensorFlow's start-up lines (CPU features, oneDNN): kept in the logs, not echoed.
TENSORFLOW_CHATTER = ("cpu_feature_guard", "oneDNN custom operations",
                      "rebuild TensorFlow with the appropriate", "To enable the following",
                      "TF_ENABLE_ONEDNN_OPTS")


def run(command: list[str], log_path: str) -> None:
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, cwd=ROOT)
        for line in process.stdout:
            log.write(line)
            if not any(marker in line for marker in TENSORFLOW_CHATTER):
                print("  " + line, end="", flush=True)
    if process.wait() != 0:
        sys.exit(f"run_all: `{' '.join(command)}` failed (exit {process.returncode}); "
                 f"log: {log_path}")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-output", help="working folder (bench-output)")
    parser.add_argument("--only", default=",".join(STAGES),
                        help="comma-separated subset of " + ",".join(STAGES))
    parser.add_argument("--publish", metavar="DIR",
                        help="copy the JSONs, PNGs and summary here (e.g. benchmarks/results)")
    parser.add_argument("--reference-dir", metavar="DIR",
                        help="a checkout of ibab/tensorflow-wavenet: the learning stage then "
                             "also trains it on the same batches (bench_reference.py)")
    args = parser.parse_args()
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    songs = os.path.join(out, "songs44k")
    store = os.path.join(out, "store")
    if {"preprocess", "train"} & set(stages):
        run(["bash", os.path.join(HERE, "make_songs.sh"), songs], os.path.join(out, "songs.log"))
    if "preprocess" in stages:
        run([py, os.path.join(HERE, "bench_preprocess.py"), songs, "--out", out],
            os.path.join(out, "preprocess.log"))
    if "train" in stages:
        run([py, "-m", "dwave.cli", "preprocess", songs, "--out", store, "--no-progress"],
            os.path.join(out, "store.log"))
    if "train" in stages:
        for preset, batch in TRAIN_BENCHMARKS.items():
            run([py, os.path.join(HERE, "bench_train.py"), store, "--out", out, "--preset",
                 preset, "--batch-size", str(batch)], os.path.join(out, f"train_{preset}.log"))
    if "learning" in stages:
        corpus, heldout = os.path.join(out, "corpus"), os.path.join(out, "store-heldout")
        run(["bash", os.path.join(HERE, "make_corpus.sh"), corpus], os.path.join(out, "corpus.log"))
        run([py, "-m", "dwave.cli", "preprocess", os.path.join(corpus, "heldout"), "--out",
             heldout, "--no-progress"], os.path.join(out, "store-heldout.log"))
        for seed in LEARNING_SEEDS:  # the benchmark's own run dirs from an earlier run_all
            shutil.rmtree(os.path.join(out, f"learning-small-seed{seed}"), ignore_errors=True)
        run([py, os.path.join(HERE, "bench_learning.py"), heldout, "--out", out, "--seeds",
             *map(str, LEARNING_SEEDS)]
            + (["--reference-dir", args.reference_dir] if args.reference_dir else []),
            os.path.join(out, "learning.log"))
    if "generate" in stages:
        run([py, os.path.join(HERE, "bench_generate.py"), "--out", out],
            os.path.join(out, "generate.log"))
    if "generate_job" in stages:
        run([py, os.path.join(HERE, "bench_generate.py"), "--out", out, "--sections",
             "job,memory,agreement", "--preset", "tiny"], os.path.join(out, "generate_job.log"))
    if "scale" in stages:
        run([py, os.path.join(HERE, "bench_scale.py"), "--out", out],
            os.path.join(out, "scale.log"))

    figures = {}
    for stage in [s for s in STAGES if s != "train"]:  # train: below
        path = os.path.join(out, f"{stage}.json")
        if os.path.exists(path):
            with open(path) as f:
                figures[stage] = json.load(f)
    for preset in TRAIN_BENCHMARKS:
        path = os.path.join(out, f"train_{preset}.json")
        if os.path.exists(path):
            with open(path) as f:
                figures.setdefault("train", {})[preset] = json.load(f)
    host = machine()
    table = rows(figures)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"machine": host, "figures": table}, f, indent=2)
    text = markdown(table, host)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print("\n" + text)
    if args.publish:
        os.makedirs(args.publish, exist_ok=True)
        for name in os.listdir(out):
            if name.endswith((".json", ".png")) or name == "summary.md":
                shutil.copy2(os.path.join(out, name), os.path.join(args.publish, name))
        print(f"copied the figures and curves to {args.publish}")


if __name__ == "__main__":
    main()
