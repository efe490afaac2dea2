#!/usr/bin/env python
"""Generation speed of the `base` WaveNet: naive full passes vs cached fast generation.

    python benchmarks/bench_generate.py [--out bench-output] [--samples 4000]

Random weights (speed does not depend on them). Prints samples/s of
  (a) naive: one full forward pass over the receptive field for every new sample (what the
      replaced system did);
  (b) fast (cached), 1 song;
  (c) fast, 16 and 64 songs at once (aggregate samples/s, one lane per core), and 64 songs
      on one thread (what the lanes add);
their ratios to (a), and the real-time factor at the model's sample rate. Each fast figure is
the median of --repeats runs (this kind of machine is noisy; all runs are printed). Then the
step's matrix products alone, for 32 songs: the tiled kernel (dwave/generate/packed_product.py)
against BLAS (numpy's sgemm), both on one core, in GFLOP/s. Writes OUT/generate.json and
OUT/generate_scaling.png.

--sections picks what runs (default: speed); the others run `dwave generate` itself, on a run
dir of random weights this script writes (OUT/run-PRESET):
  job        preempt and resume: uninterrupted, with a save every --save-every seconds, and
             stopped by SIGTERM halfway then resumed by the same command (both processes'
             wall time); the songs' digests must equal the uninterrupted run's
  memory     peak RSS of the whole `dwave generate` process (os.wait4) against --seconds and
             against --prime-seconds, three sizes each: the growth between them
  agreement  the CUDA engine against the CPU engine on the same inputs (teacher forcing):
             the share of draws that pick the same code, and the largest logit difference;
             in Numba's CUDA simulator where there is no GPU (slow: a few songs and steps)
  cuda       the CUDA engine's samples/s at 1 to 4,096 songs against the CPU engine's at its
             best batch (a GPU machine only; random weights in numpy, no TensorFlow needed)
Written to OUT/generate_job.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

# BLAS on one thread: the product comparison is per core, like the generator's lanes (which
# do not use BLAS). Set before numpy loads its BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def naive_rate(model, samples: int) -> float:
    """One valid-mode pass over the last receptive_field codes per new sample."""
    import tensorflow as tf

    rf = model.config.receptive_field
    forward = tf.function(lambda codes: model(codes)[:, -1])
    codes = np.random.default_rng(0).integers(0, 256, (1, rf))
    forward(codes)
    started = time.perf_counter()
    for _ in range(samples):
        logits = forward(codes).numpy()
        codes = np.concatenate([codes[:, 1:], logits.argmax(-1)[:, None]], axis=1)
    return samples / (time.perf_counter() - started)


def fast_rate(model, songs: int, samples: int, repeats: int, threads=None) -> float:
    """Median aggregate samples/s over `repeats` runs (each printed)."""
    from dwave.generate.cpu_engine import FastGenerator

    generator = FastGenerator.for_model(model, songs, threads=threads)
    uniforms = np.random.default_rng(0).random((samples, songs), dtype=np.float32)
    generator.generate(uniforms[:10], 1.0)  # compile (cached on disk after the first run)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        generator.generate(uniforms, 1.0)
        rates.append(samples * songs / (time.perf_counter() - started))
    print("   runs: " + ", ".join(f"{r:,.0f}" for r in rates), flush=True)
    return float(np.median(rates))


def product_speeds(model, rows: int = 32) -> dict:
    """GFLOP/s of one generation step's products (every layer's conv and residual, the skip
    and head products) for `rows` songs: tiled kernel vs numpy's BLAS, each best of 3."""
    import numba

    from dwave.generate.cpu_engine import pack_weights
    from dwave.generate.packed_product import matmul

    @numba.njit
    def tiled(inputs, weights, outputs, repeats):
        for _ in range(repeats):
            for i in range(len(weights)):
                matmul(inputs[i], weights[i], outputs[i], False)

    packed = pack_weights(model.export())
    weights = list(packed.conv) + list(packed.residual) + [packed.skip, packed.head1,
                                                            packed.head2]
    rng = np.random.default_rng(0)
    inputs = [rng.random((rows, w.shape[1]), dtype=np.float32) for w in weights]
    outputs = [np.empty((rows, w.shape[0] * w.shape[2]), np.float32) for w in weights]
    dense = [np.ascontiguousarray(w.transpose(1, 0, 2).reshape(w.shape[1], -1)) for w in weights]
    flops = sum(2.0 * rows * w.shape[0] * w.shape[1] for w in dense)
    numba_list = numba.typed.List
    args = (numba_list(inputs), numba_list(weights), numba_list(outputs))
    tiled(*args, 1)

    def best(run) -> float:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return min(times)

    repeats = 100
    tiled_s = best(lambda: tiled(*args, repeats)) / repeats

    def blas():
        for _ in range(repeats):
            for a, w, out in zip(inputs, dense, outputs):
                np.dot(a, w, out=out)

    blas_s = best(blas) / repeats
    return {"rows": rows, "tiled_gflops": flops / tiled_s / 1e9,
            "blas_gflops": flops / blas_s / 1e9}


def make_run(run_dir: str, preset: str) -> str:
    """A `dwave train` run dir holding one checkpoint of random weights (speed and memory do not
    depend on the weights' values)."""
    import tensorflow as tf

    from dwave.model.config import ModelConfig
    from dwave.model.network import WaveNet
    from dwave.model.rundir import checkpoint_manager, latest_checkpoint, write_run_config

    if latest_checkpoint(run_dir) is None:
        tf.keras.utils.set_random_seed(0)
        config = ModelConfig.from_preset(preset)
        model = WaveNet(config)
        _, manager = checkpoint_manager(run_dir, 1, config, model=model)
        manager.save(checkpoint_number=1)
        write_run_config(run_dir, config, {"steps": 1}, 1, 1)
    return run_dir


def dwave_generate(*args, stop_after: float | None = None) -> dict:
    """Run `dwave generate ARGS`; its wall time, peak RSS (this process alone, from wait4) and
    the generation loop's own figure from its last line. `stop_after`: SIGTERM after that many
    seconds of generating (the first chunk's progress seen)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dwave.cli", "generate", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if stop_after is not None:
        import threading

        threading.Timer(stop_after, lambda: proc.send_signal(signal.SIGTERM)).start()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"dwave generate failed ({proc.returncode}):\n{stderr[-3000:]}")
    last = stderr.strip().splitlines()[-1]
    loop = float(last.split(" samples in ")[1].split(" s")[0]) if " samples in " in last else 0.0
    return {"wall_s": wall, "loop_s": loop, "peak_rss_mb": usage.ru_maxrss / 1024,
            "last_line": last}


def digests(directory: str) -> dict:
    return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(directory)) if name.startswith("song-")}


def job_section(run: str, out: str, songs: int, seconds: float, save_every: float) -> dict:
    """Uninterrupted (no saves), with saves every `save_every` s, stopped halfway + resumed."""
    import shutil

    flags = ["--num-songs", songs, "--batch-size", songs, "--seconds", seconds]
    warm = os.path.join(out, "warm-up")  # Numba compiles the step loop once, on first use
    shutil.rmtree(warm, ignore_errors=True)
    dwave_generate(run, "--out", warm, "--num-songs", songs, "--batch-size", songs,
                   "--seconds", "0.2")
    rows = {}
    for round_ in (1, 2):  # interleaved, twice: this machine's speed drifts
        for name, extra in (("uninterrupted", ["--save-every", "0"]),
                            ("saving", ["--save-every", save_every])):
            target = os.path.join(out, name)
            shutil.rmtree(target, ignore_errors=True)
            row = dwave_generate(run, "--out", target, *flags, *extra)
            rows.setdefault(name, {"runs": []})["runs"].append(row)
            print(f"   {name}: {row['wall_s']:.1f} s wall, generation loop "
                  f"{row['loop_s']:.1f} s", flush=True)
    for name in ("uninterrupted", "saving"):
        for key in ("wall_s", "loop_s"):
            rows[name][key] = float(np.mean([r[key] for r in rows[name]["runs"]]))
    target = os.path.join(out, "stopped")
    shutil.rmtree(target, ignore_errors=True)
    half = rows["uninterrupted"]["wall_s"] / 2
    first = dwave_generate(run, "--out", target, *flags, stop_after=half)
    assert "stopped by SIGTERM" in first["last_line"], first["last_line"]
    second = dwave_generate(run, "--out", target, *flags)
    rows["stopped_and_resumed"] = {"first": first, "second": second,
                                   "wall_s": first["wall_s"] + second["wall_s"],
                                   "loop_s": first["loop_s"] + second["loop_s"]}
    same = digests(target) == digests(os.path.join(out, "uninterrupted")) \
        == digests(os.path.join(out, "saving"))
    base = rows["uninterrupted"]
    saves = rows["saving"]["loop_s"] / save_every
    rows["summary"] = {
        "identical_files": same,
        "save_overhead_per_save_s": (rows["saving"]["loop_s"] - base["loop_s"]) / max(saves, 1),
        "save_overhead_every_minute": (rows["saving"]["loop_s"] - base["loop_s"])
        / base["loop_s"] * save_every / 60,
        "preempt_resume_extra_wall": rows["stopped_and_resumed"]["wall_s"] / base["wall_s"] - 1,
        "preempt_resume_extra_loop": rows["stopped_and_resumed"]["loop_s"] / base["loop_s"] - 1}
    print(f"   stopped at {half:.0f} s and resumed: {first['wall_s']:.1f} + "
          f"{second['wall_s']:.1f} s wall; files identical to the uninterrupted run's: {same}",
          flush=True)
    return rows


def write_prime(path: str, seconds: float, rate: int = 16000) -> str:
    """A synthetic song (chords with a beat) for --prime."""
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    audio = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) / 3
    audio *= 0.5 + 0.5 * (np.sin(2 * np.pi * 2 * t) > 0)
    sf.write(path, (0.5 * audio).astype(np.float32), rate, subtype="PCM_16")
    return path


def memory_section(run: str, out: str, songs: int, seconds_sizes: list, prime_sizes: list,
                   prime_song_seconds: float) -> dict:
    import shutil

    rows = {"seconds": {}, "prime_seconds": {}}
    flags = ["--num-songs", songs, "--batch-size", songs, "--save-every", "0"]
    for seconds in seconds_sizes:
        target = os.path.join(out, f"memory-{seconds}")
        shutil.rmtree(target, ignore_errors=True)
        rows["seconds"][str(seconds)] = row = dwave_generate(run, "--out", target, *flags,
                                                              "--seconds", seconds)
        print(f"   {songs} songs x {seconds} s: peak RSS {row['peak_rss_mb']:,.1f} MB "
              f"({row['wall_s']:.0f} s)", flush=True)
        shutil.rmtree(target, ignore_errors=True)
    prime = write_prime(os.path.join(out, "prime.wav"), max(prime_sizes) + 1)
    for seconds in prime_sizes:
        target = os.path.join(out, f"prime-{seconds}")
        shutil.rmtree(target, ignore_errors=True)
        rows["prime_seconds"][str(seconds)] = row = dwave_generate(
            run, "--out", target, *flags, "--seconds", prime_song_seconds, "--prime", prime,
            "--prime-seconds", seconds)
        print(f"   {songs} songs x {prime_song_seconds} s after {seconds} s of prime: peak RSS "
              f"{row['peak_rss_mb']:,.1f} MB ({row['wall_s']:.0f} s)", flush=True)
        shutil.rmtree(target, ignore_errors=True)
    for key, sizes in (("seconds", seconds_sizes), ("prime_seconds", prime_sizes)):
        first = rows[key][str(sizes[0])]["peak_rss_mb"]
        rows[key]["growth"] = {str(size): rows[key][str(size)]["peak_rss_mb"] / first
                               for size in sizes}
    return rows


def random_weights(preset: str):
    """ExportedWeights of the preset's shapes, random, in numpy (no TensorFlow: a GPU machine
    may not have it)."""
    from dwave.model.config import ModelConfig
    from dwave.model.weights import random_weights as draw

    c = ModelConfig.from_preset(preset)
    return draw(c, scale=0.1, conv_scale=0.2, bias_scale=0.1, head_scale=0.5), c.dilations


def agreement_section(preset: str, songs: int, steps: int) -> dict:
    """Teacher-forced: both engines see the same inputs at every step, so every draw is
    comparable (a free-running song goes its own way after its first different code)."""
    from dwave.generate.cpu_engine import FastGenerator
    from dwave.generate.cuda_engine import CudaGenerator
    from numba import config

    weights, dilations = random_weights(preset)
    rng = np.random.default_rng(1)
    forced = rng.integers(0, weights.embedding.shape[0], (steps, songs))
    uniforms = rng.random((steps, songs), dtype=np.float32)
    cpu = FastGenerator(weights, dilations, songs)
    gpu = CudaGenerator(weights, dilations, songs, songs_per_block=min(8, songs),
                        threads_per_block=32 if config.ENABLE_CUDASIM else 128)
    _, cpu_logits = cpu.generate(uniforms, 1.0, forced=forced, keep_logits=True)
    started = time.perf_counter()
    _, gpu_logits = gpu.generate(uniforms, 1.0, forced=forced, keep_logits=True)
    seconds = time.perf_counter() - started
    from dwave.generate.cpu_engine import inverse_temperature
    from dwave.model.output import draw_code

    inv_t = inverse_temperature(1.0)
    q = weights.embedding.shape[0]
    same = [draw_code(cpu_logits[k, b], inv_t, uniforms[k, b], q)
            == draw_code(gpu_logits[k, b], inv_t, uniforms[k, b], q)
            for k in range(steps) for b in range(songs)]
    row = {"simulator": bool(config.ENABLE_CUDASIM), "songs": songs, "steps": steps,
           "same_code_share": float(np.mean(same)), "draws": len(same),
           "max_logit_difference": float(np.abs(gpu_logits - cpu_logits).max()),
           "max_logit": float(np.abs(cpu_logits).max()), "cuda_seconds": seconds}
    print(f"   {row['draws']} draws: {row['same_code_share']:.4f} the same code; largest logit "
          f"difference {row['max_logit_difference']:.2e} (logits up to {row['max_logit']:.1f})"
          + (" [Numba's CUDA simulator]" if row["simulator"] else ""), flush=True)
    return row


def cuda_section(preset: str, samples: int) -> dict:
    """The CUDA engine's aggregate samples/s, 1 to 4,096 songs, and the CPU engine's on this
    machine's cores (64 songs) and on one core, for the ratio the issue asks about."""
    from dwave.generate.cpu_engine import FastGenerator
    from dwave.generate.cuda_engine import CudaGenerator

    weights, dilations = random_weights(preset)
    rows = {}
    for songs in (1, 16, 256, 1024, 4096):
        gpu = CudaGenerator(weights, dilations, songs)
        uniforms = np.random.default_rng(0).random((samples, songs), dtype=np.float32)
        gpu.generate(uniforms[:10], 1.0)  # compile
        started = time.perf_counter()
        gpu.generate(uniforms, 1.0)
        rate = samples * songs / (time.perf_counter() - started)
        rows[str(songs)] = {"samples_per_s": rate, "songs_per_s_realtime": rate / 16000}
        print(f"   cuda, {songs} songs: {rate:,.0f} samples/s", flush=True)
    for threads in (None, 1):
        cpu = FastGenerator(weights, dilations, 64, threads=threads)
        uniforms = np.random.default_rng(0).random((samples // 4, 64), dtype=np.float32)
        cpu.generate(uniforms[:10], 1.0)
        started = time.perf_counter()
        cpu.generate(uniforms, 1.0)
        rate = uniforms.size / (time.perf_counter() - started)
        rows["cpu_64_" + ("one_core" if threads == 1 else "all_cores")] = rate
        print(f"   cpu, 64 songs, {'one core' if threads == 1 else 'all cores'}: "
              f"{rate:,.0f} samples/s", flush=True)
    rows["cuda_1024_over_one_cpu_core"] = (rows["1024"]["samples_per_s"]
                                           / rows["cpu_64_one_core"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-output")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--samples", type=int, default=4000, help="per song, fast runs (4000)")
    parser.add_argument("--naive-samples", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs per fast figure (3)")
    parser.add_argument("--sections", default="speed",
                        help="comma-separated: speed, job, memory, agreement, cuda (speed)")
    parser.add_argument("--job-preset", default="small", help="model of the job and memory runs")
    parser.add_argument("--job-songs", type=int, default=16)
    parser.add_argument("--job-seconds", type=float, default=30.0)
    parser.add_argument("--save-every", type=float, default=10.0,
                        help="seconds between saves in the job section (10: six times the "
                             "target's once a minute, so the overhead shows)")
    parser.add_argument("--memory-preset", default="tiny",
                        help="model of the memory runs (tiny: 64 songs x 10 minutes in ~20 min)")
    parser.add_argument("--memory-songs", type=int, default=64)
    parser.add_argument("--memory-seconds", default="10,100,600")
    parser.add_argument("--memory-prime-seconds", default="1,10,60")
    parser.add_argument("--agreement-songs", type=int, default=4)
    parser.add_argument("--agreement-steps", type=int, default=32)
    args = parser.parse_args()
    sections = args.sections.split(",")
    from machine import describe

    print(f"machine: {describe()}", flush=True)
    if sections != ["speed"]:
        job_sections(args, sections, describe())
    if "speed" not in sections:
        return

    import tensorflow as tf

    from dwave.model.config import ModelConfig
    from dwave.model.network import WaveNet

    tf.keras.utils.set_random_seed(0)
    from dwave.model import fused_ops

    config = ModelConfig.from_preset(args.preset)
    # The naive baseline's full passes at their fastest here: with the fused CPU kernels where
    # they load (the cached engines read the same weights either way).
    model = WaveNet(config, "fp32", fused_ops.for_training("fp32"))
    print(f"{config.describe()}, {model.parameter_count:,} parameters", flush=True)
    figures = {"machine": describe(),
               "preset": args.preset, "sample_rate": config.sample_rate}
    print("naive ...", flush=True)
    figures["naive"] = naive_rate(model, args.naive_samples)
    from dwave.cores import usable_cores

    figures["threads"] = usable_cores()
    for songs in (1, 16, 64):
        print(f"fast, {songs} song(s) ...", flush=True)
        figures[f"fast_{songs}"] = fast_rate(model, songs, args.samples // max(1, songs // 16),
                                             args.repeats)
    print("fast, 64 songs on one thread ...", flush=True)
    figures["fast_64_one_thread"] = fast_rate(model, 64, args.samples // 4, args.repeats, 1)
    print("products of one step, 32 songs: tiled kernel vs BLAS ...", flush=True)
    figures["products"] = product_speeds(model)

    naive = figures["naive"]
    print(f"\n{'method':32}{'samples/s':>12}{'x naive':>10}{'x real time':>13}")
    rows = [("naive (full pass / sample)", naive)] + [
        (f"fast, {n} song{'s' if n > 1 else ''}", figures[f"fast_{n}"]) for n in (1, 16, 64)]
    rows.append(("fast, 64 songs, one thread", figures["fast_64_one_thread"]))
    for name, rate in rows:
        print(f"{name:32}{rate:>12,.0f}{rate / naive:>10,.0f}{rate / config.sample_rate:>13.2f}")
    products = figures["products"]
    print(f"\nthreads: {figures['threads']} (one per usable core); products of one step for "
          f"{products['rows']} songs: tiled kernel {products['tiled_gflops']:.1f} GFLOP/s, "
          f"BLAS {products['blas_gflops']:.1f} GFLOP/s "
          f"({products['tiled_gflops'] / products['blas_gflops']:.2f}x)")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "generate.json"), "w") as f:
        json.dump(figures, f, indent=2)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    songs = [1, 16, 64]
    ax.plot(songs, [figures[f"fast_{n}"] for n in songs], "o-", label="fast (cached), aggregate")
    ax.axhline(naive, color="grey", linestyle=":", label="naive, 1 song")
    ax.axhline(config.sample_rate, color="k", linestyle="--", label="real time (1 song)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("songs per batch")
    ax.set_ylabel("samples / s")
    ax.set_title(f"WaveNet {args.preset} generation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "generate_scaling.png"), dpi=120)
    print(f"\nwrote {args.out}/generate.json and {args.out}/generate_scaling.png")


def job_sections(args, sections: list, machine: str) -> None:
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "generate_job.json")
    figures = json.load(open(path)) if os.path.exists(path) else {}
    figures["machine"] = machine
    if "job" in sections:
        run = make_run(os.path.join(out, f"run-{args.job_preset}"), args.job_preset)
        print(f"job: {args.job_songs} songs x {args.job_seconds:g} s, {args.job_preset} ...",
              flush=True)
        figures["job"] = job_section(run, out, args.job_songs, args.job_seconds,
                                     args.save_every)
        figures["job"]["preset"] = args.job_preset
    if "memory" in sections:
        run = make_run(os.path.join(out, f"run-{args.memory_preset}"), args.memory_preset)
        print(f"memory: {args.memory_songs} songs, {args.memory_preset} ...", flush=True)
        figures["memory"] = memory_section(
            run, out, args.memory_songs, [float(x) for x in args.memory_seconds.split(",")],
            [float(x) for x in args.memory_prime_seconds.split(",")], 2.0)
        figures["memory"]["preset"] = args.memory_preset
    if "agreement" in sections:
        if "NUMBA_ENABLE_CUDASIM" not in os.environ:
            from dwave.generate.engines import cuda_usable

            if not cuda_usable():  # the simulator, in a process of its own (read at import)
                with open(path, "w") as f:
                    json.dump(figures, f, indent=2)
                subprocess.run([sys.executable, *sys.argv, "--sections", "agreement"],
                               env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}, check=True)
                figures = json.load(open(path))
                sections = [s for s in sections if s != "agreement"]
        if "agreement" in sections:
            print(f"agreement: {args.agreement_songs} songs x {args.agreement_steps} steps, "
                  f"{args.preset} ...", flush=True)
            figures["agreement"] = agreement_section(args.preset, args.agreement_songs,
                                                     args.agreement_steps)
            figures["agreement"]["preset"] = args.preset
    if "cuda" in sections:
        print(f"cuda: {args.preset} ...", flush=True)
        figures["cuda"] = cuda_section(args.preset, args.samples)
    with open(path, "w") as f:
        json.dump(figures, f, indent=2)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
