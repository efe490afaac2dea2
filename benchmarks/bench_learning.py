#!/usr/bin/env python
"""Does the model learn? Validation bits/sample against the store's own baselines, per step.

    python benchmarks/bench_learning.py STORE [--preset small] [--steps 800] [--val-every 100]
                                        [--out bench-output] [-- DWAVE TRAIN FLAGS]

Trains the preset with `dwave train`'s default flags (one process, this machine's cores) unless
told otherwise after `--`, validating every --val-every steps on the run's fixed validation
windows. On the same store and the same train/validation split it computes, itself, the two
baselines a WaveNet must beat:

  * unigram: the code histogram of the training tracks;
  * bigram:  p(x_t | x_{t-1}) counted on the training tracks;

both with add-one smoothing, scored on the targets of the validation windows. It checks them
against the figures `dwave train` computed and printed (RUN_DIR/validation.json), draws the
curve with both baselines as lines (OUT/learning.png) and writes OUT/learning.json.

Targets (issue 10, for `small` at its defaults, 4 x 4000 predicted samples per step): below
the bigram by step 400, at least 0.5 bit below it by step 800.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import cpu_model  # noqa: E402


def independent_baselines(store: str, run_dir: str) -> dict:
    """The two baselines, computed here with plain numpy over the same split and windows as
    the run (not through dwave.baselines), as a check on what the trainer printed."""
    from dwave.config import ModelConfig
    from dwave.data import open_training_data

    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    model = ModelConfig.from_dict(saved["model"])
    train = saved["train"]
    rf = model.receptive_field
    data = open_training_data(store, model.span(train["window"]), train["batch_size"], train["seed"],
                              train["validation_fraction"])
    levels = data.levels
    unigram = np.zeros(levels)
    pairs = np.zeros((levels, levels))
    for i, track in enumerate(data.train.tracks):
        codes = data.train.read([(i, 0, track.length)])[0].astype(np.int64)
        unigram += np.bincount(codes, minlength=levels)
        np.add.at(pairs, (codes[:-1], codes[1:]), 1)
    windows = np.concatenate([data.validation.batch(0, i)[0] for i in range(train["val_batches"])])
    targets, previous = windows[:, rf:].ravel(), windows[:, rf - 1:-1].ravel()
    p_unigram = (unigram + 1) / (unigram.sum() + levels)
    p_bigram = (pairs + 1) / (pairs.sum(axis=1, keepdims=True) + levels)
    return {"unigram_bits": float(-np.log2(p_unigram[targets]).mean()),
            "bigram_bits": float(-np.log2(p_bigram[previous, targets]).mean()),
            "training_samples": int(unigram.sum()), "validation_targets": int(targets.size),
            "training_tracks": len(data.train.tracks),
            "validation_tracks": len(data.validation.tracks)}


def first_step_below(history: list[dict], level: float) -> int | None:
    return next((h["step"] for h in history if h["bits"] < level), None)


def value_at(history: list[dict], step: int) -> float | None:
    return next((h["bits"] for h in history if h["step"] == step), None)


def plot_curves(curves: dict[str, list[dict]], baselines: dict, xlabel: str, title: str,
                path: str) -> None:
    """Validation curves ({label: history}) with the store's two baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, history in curves.items():
        ax.plot([h["step"] for h in history], [h["bits"] for h in history], "o-", label=label)
    ax.axhline(baselines["unigram_bits"], color="grey", linestyle=":",
               label=f"code histogram {baselines['unigram_bits']:.2f}")
    ax.axhline(baselines["bigram_bits"], color="black", linestyle="--",
               label=f"bigram p(x_t|x_t-1) {baselines['bigram_bits']:.2f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation bits / sample")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(result: dict, path: str) -> None:
    b = result["baselines"]
    plot_curves({f"dwave {result['preset']} (validation)": result["history"]}, b,
                "step (batch 4 x 4000 predicted samples)" if result["samples_per_step"] == 16000
                else f"step ({result['samples_per_step']:,} predicted samples)",
                f"{result['store_name']}: {b['training_tracks']} training / "
                f"{b['validation_tracks']} validation tracks ({result['cpu']})", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="a dwave store")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--out", default="bench-output")
    args, extra = parser.parse_known_args()  # the rest: `dwave train` flags
    args.extra = [a for a in extra if a != "--"]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    run_dir = os.path.join(out, f"learning-{args.preset}")
    if os.path.exists(os.path.join(run_dir, "config.json")):
        sys.exit(f"bench_learning: {run_dir} holds an earlier run: move it away first")
    command = [sys.executable, "-m", "dwave.cli", "train", args.store, "--run-dir", run_dir,
               "--preset", args.preset, "--steps", str(args.steps),
               "--val-every", str(args.val_every), "--listen-seconds", "0", *args.extra]
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores\n$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    wall = time.perf_counter() - started

    with open(os.path.join(run_dir, "validation.json")) as f:
        log = json.load(f)
    with open(os.path.join(run_dir, "config.json")) as f:
        train = json.load(f)["train"]
    mine = independent_baselines(args.store, run_dir)
    for key in ("unigram_bits", "bigram_bits"):
        if abs(mine[key] - log["baselines"][key]) > 1e-6:
            sys.exit(f"bench_learning: the trainer's {key} {log['baselines'][key]:.6f} differs "
                     f"from this script's {mine[key]:.6f}")
    history, bigram = log["history"], mine["bigram_bits"]
    result = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "preset": args.preset,
        "store": args.store, "store_name": os.path.basename(os.path.normpath(args.store)),
        "flags": args.extra, "samples_per_step": train["batch_size"] * train["window"],
        "baselines": mine, "history": history, "wall_seconds": wall,
        "first_step_below_bigram": first_step_below(history, bigram),
        "first_step_half_bit_below_bigram": first_step_below(history, bigram - 0.5),
        "bits_at_400": value_at(history, 400), "bits_at_800": value_at(history, 800),
    }
    with open(os.path.join(out, "learning.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(out, "learning.png"))

    print(f"\nlearning benchmark, {args.preset} preset, CPU {result['cpu']}:")
    print(f"  store: {mine['training_tracks']} training tracks ({mine['training_samples']:,} "
          f"samples), {mine['validation_tracks']} validation tracks "
          f"({mine['validation_targets']:,} validation targets)")
    print(f"  baselines (this script, equal to the trainer's): code histogram "
          f"{mine['unigram_bits']:.3f}, bigram {bigram:.3f} bits/sample")
    for h in history:
        print(f"  step {h['step']:>6}: {h['bits']:.3f} bits/sample  ({h['bits'] - bigram:+.3f} "
              f"vs bigram, {h['seconds']:.0f} s)")
    print(f"  below the bigram from step {result['first_step_below_bigram']}, 0.5 bit below "
          f"from step {result['first_step_half_bit_below_bigram']}; {wall:.0f} s in all")
    print(f"wrote {out}/learning.json and {out}/learning.png")


if __name__ == "__main__":
    main()
