#!/usr/bin/env python
"""Generation speed of the `base` WaveNet: naive full passes vs cached fast generation.

    python benchmarks/bench_generate.py [--out bench-output] [--samples 4000]

Random weights (speed does not depend on them). Prints samples/s of
  (a) naive: one full forward pass over the receptive field for every new sample (what the
      replaced system did);
  (b) fast (cached), 1 song;
  (c) fast, 16 and 64 songs at once (aggregate samples/s);
their ratios to (a), and the real-time factor at the model's sample rate; writes
OUT/generate.json and OUT/generate_scaling.png (songs per batch vs aggregate samples/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

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


def fast_rate(model, songs: int, samples: int) -> float:
    from dwave.fast import FastGenerator

    generator = FastGenerator(model, songs)
    uniforms = np.random.default_rng(0).random((samples, songs), dtype=np.float32)
    generator.generate(uniforms[:10], 1.0)  # compile (cached on disk after the first run)
    started = time.perf_counter()
    generator.generate(uniforms, 1.0)
    return samples * songs / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-output")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--samples", type=int, default=4000, help="per song, fast runs (4000)")
    parser.add_argument("--naive-samples", type=int, default=20)
    args = parser.parse_args()

    import tensorflow as tf

    from dwave.config import ModelConfig
    from dwave.model import WaveNet

    tf.random.set_seed(0)
    config = ModelConfig.from_preset(args.preset)
    model = WaveNet(config)
    print(f"{config.describe()}, {model.parameter_count:,} parameters", flush=True)
    figures = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
               "preset": args.preset, "sample_rate": config.sample_rate}
    print("naive ...", flush=True)
    figures["naive"] = naive_rate(model, args.naive_samples)
    for songs in (1, 16, 64):
        print(f"fast, {songs} song(s) ...", flush=True)
        figures[f"fast_{songs}"] = fast_rate(model, songs, args.samples // max(1, songs // 16))

    naive = figures["naive"]
    print(f"\n{'method':28}{'samples/s':>12}{'x naive':>10}{'x real time':>13}")
    rows = [("naive (full pass / sample)", naive)] + [
        (f"fast, {n} song{'s' if n > 1 else ''}", figures[f"fast_{n}"]) for n in (1, 16, 64)]
    for name, rate in rows:
        print(f"{name:28}{rate:>12,.0f}{rate / naive:>10,.0f}{rate / config.sample_rate:>13.2f}")
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
