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
step's matrix products alone, for 32 songs: the tiled kernel (dwave/packed_product.py) against BLAS
(numpy's sgemm), both on one core, in GFLOP/s. Writes OUT/generate.json and OUT/generate_scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    from dwave.cached_generator import FastGenerator

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

    from dwave.cached_generator import pack_weights
    from dwave.packed_product import matmul

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-output")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--samples", type=int, default=4000, help="per song, fast runs (4000)")
    parser.add_argument("--naive-samples", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs per fast figure (3)")
    args = parser.parse_args()

    import tensorflow as tf

    from dwave.config import ModelConfig
    from dwave.model import WaveNet

    tf.keras.utils.set_random_seed(0)
    config = ModelConfig.from_preset(args.preset)
    model = WaveNet(config)
    print(f"{config.describe()}, {model.parameter_count:,} parameters", flush=True)
    figures = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
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


if __name__ == "__main__":
    main()
