#!/usr/bin/env python
"""Does the model learn? Validation bits/sample against the store's own baselines, per step.

    python benchmarks/bench_learning.py STORE [--preset small] [--steps 800] [--val-every 100]
                                        [--seeds 0 1 2] [--reference-dir DIR]
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

One run per --seeds value (OUT/learning-PRESET-seedS: its own initial weights, batches and
validation split), the figures their mean. With --reference-dir, the reference WaveNet is
trained on each run's batches too (bench_reference.py), and the time each dwave run takes to
reach the reference's final validation loss is compared with the reference's own.

The store to report figures from is one not tuned on: benchmarks/make_corpus.sh builds a
corpus of game soundtracks in two halves (tune on OUT/tune's store, report on OUT/heldout's).

Targets (issue 20, `small` at its defaults, 4 x 4000 predicted samples per step, mean of 3
seeds, on the held-out half): at or below the reference at every validation from step 200,
0.6 bit below the bigram at step 800, the reference's final loss in <= 0.6 of its time.
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
    the run (not through dwave.train.baselines), as a check on what the trainer printed."""
    from dwave.model.config import ModelConfig
    from dwave.train.data import open_training_data

    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    model = ModelConfig.from_dict(saved["model"])
    train = saved["train"]
    rf = model.receptive_field
    data = open_training_data(store, model.span(train["window"]), train["batch_size"], train["seed"],
                              train["validation_fraction"])
    Q = data.quantization_channels
    unigram = np.zeros(Q)
    pairs = np.zeros((Q, Q))
    for i, track in enumerate(data.train.tracks):
        codes = data.train.read([(i, 0, track.length)])[0].astype(np.int64)
        unigram += np.bincount(codes, minlength=Q)
        np.add.at(pairs, (codes[:-1], codes[1:]), 1)
    windows = np.concatenate([data.validation.batch(0, i)[0] for i in range(train["val_batches"])])
    targets, previous = windows[:, rf:].ravel(), windows[:, rf - 1:-1].ravel()
    p_unigram = (unigram + 1) / (unigram.sum() + Q)
    p_bigram = (pairs + 1) / (pairs.sum(axis=1, keepdims=True) + Q)
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
    curves = {f"dwave {result['preset']} (validation)": result["history"]}
    if "reference" in result:
        curves["reference (ibab), same batches"] = result["reference"]
    plot_curves(curves, b,
                "step (batch 4 x 4000 predicted samples)" if result["samples_per_step"] == 16000
                else f"step ({result['samples_per_step']:,} predicted samples)",
                f"{result['store_name']}: {b['training_tracks']} training / "
                f"{b['validation_tracks']} validation tracks, mean of "
                f"{len(result['seeds'])} seed(s) ({result['cpu']})", path)


def mean_history(histories: list[list[dict]]) -> list[dict]:
    """Per step, the mean of every field over runs validated at the same steps."""
    return [{"step": histories[0][i]["step"],
             **{key: float(np.mean([h[i][key] for h in histories]))
                for key in histories[0][i] if key != "step"}}
            for i in range(len(histories[0]))]


def seconds_to_reach(history: list[dict], level: float) -> float | None:
    """When a validation curve first reaches `level`, linear between its validations
    (training seconds); None if it never does."""
    before = {"seconds": 0.0, "bits": float("inf")}
    for h in history:
        if h["bits"] <= level:
            if not np.isfinite(before["bits"]):
                return h["seconds"]
            share = (before["bits"] - level) / (before["bits"] - h["bits"])
            return before["seconds"] + share * (h["seconds"] - before["seconds"])
        before = h
    return None


def time_ratio(history: list[dict], reference: list[dict]) -> float | None:
    """dwave's seconds to the reference's final loss over the reference's own seconds to it."""
    reached = seconds_to_reach(history, reference[-1]["bits"])
    return None if reached is None else reached / reference[-1]["seconds"]


def train_dwave(store: str, run_dir: str, preset: str, steps: int, val_every: int, seed: int,
                extra: list[str]) -> tuple[list[dict], float]:
    """One `dwave train` run: its validation history and wall seconds."""
    if os.path.exists(os.path.join(run_dir, "config.json")):
        sys.exit(f"bench_learning: {run_dir} holds an earlier run: move it away first")
    command = [sys.executable, "-m", "dwave.cli", "train", store, "--run-dir", run_dir,
               "--preset", preset, "--steps", str(steps), "--val-every", str(val_every),
               "--listen-seconds", "0", "--seed", str(seed), *extra]
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores\n$ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    wall = time.perf_counter() - started
    with open(os.path.join(run_dir, "validation.json")) as f:
        return json.load(f)["history"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="a dwave store")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one run per seed (its weights, batches and split); the figures "
                             "are their mean")
    parser.add_argument("--reference-dir", metavar="DIR",
                        help="a checkout of ibab/tensorflow-wavenet: also train the reference "
                             "on each run's batches (bench_reference.py)")
    parser.add_argument("--out", default="bench-output")
    args, extra = parser.parse_known_args()  # the rest: `dwave train` flags
    args.extra = [a for a in extra if a != "--"]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    runs = []
    for seed in args.seeds:
        run_dir = os.path.join(out, f"learning-{args.preset}-seed{seed}")
        history, wall = train_dwave(args.store, run_dir, args.preset, args.steps,
                                    args.val_every, seed, args.extra)
        run = {"seed": seed, "run_dir": run_dir, "history": history, "wall_seconds": wall}
        if args.reference_dir:
            from bench_reference import train_reference

            reference = train_reference(run_dir, args.reference_dir)
            run.update(reference=reference["reference"],
                       reference_seconds_per_step=reference["reference_seconds_per_step"],
                       time_ratio=time_ratio(history, reference["reference"]))
        runs.append(run)

    first = runs[0]["run_dir"]
    with open(os.path.join(first, "validation.json")) as f:
        trainer_baselines = json.load(f)["baselines"]
    with open(os.path.join(first, "config.json")) as f:
        train = json.load(f)["train"]
    mine = independent_baselines(args.store, first)
    for key in ("unigram_bits", "bigram_bits"):
        if abs(mine[key] - trainer_baselines[key]) > 1e-6:
            sys.exit(f"bench_learning: the trainer's {key} {trainer_baselines[key]:.6f} differs "
                     f"from this script's {mine[key]:.6f}")
    # Each seed splits the tracks its own way: the baselines a run is judged by are its own.
    for run in runs:
        with open(os.path.join(run["run_dir"], "validation.json")) as f:
            run["baselines"] = json.load(f)["baselines"]
    history = mean_history([r["history"] for r in runs])
    bigram = float(np.mean([r["baselines"]["bigram_bits"] for r in runs]))
    result = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "preset": args.preset,
        "store": args.store, "store_name": os.path.basename(os.path.normpath(args.store)),
        "flags": args.extra, "seeds": args.seeds,
        "samples_per_step": train["batch_size"] * train["window"],
        "baselines": {**mine, "bigram_bits": bigram, "unigram_bits": float(np.mean(
            [r["baselines"]["unigram_bits"] for r in runs]))},
        "history": history, "runs": runs,
        "wall_seconds": float(np.mean([r["wall_seconds"] for r in runs])),
        "first_step_below_bigram": first_step_below(history, bigram),
        "first_step_half_bit_below_bigram": first_step_below(history, bigram - 0.5),
        "bits_at_400": value_at(history, 400), "bits_at_800": value_at(history, 800),
    }
    if args.reference_dir:
        result["reference"] = mean_history([r["reference"] for r in runs])
        ratios = [r["time_ratio"] for r in runs]
        result["time_ratio"] = None if None in ratios else float(np.mean(ratios))
        result["time_ratio_of_means"] = time_ratio(history, result["reference"])
    with open(os.path.join(out, "learning.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(out, "learning.png"))
    report(result)
    print(f"wrote {out}/learning.json and {out}/learning.png")


def report(result: dict) -> None:
    b, history = result["baselines"], result["history"]
    bigram = b["bigram_bits"]
    seeds = ", ".join(str(s) for s in result["seeds"])
    print(f"\nlearning benchmark, {result['preset']} preset, CPU {result['cpu']}, seeds {seeds} "
          f"(figures: their mean):")
    print(f"  store {result['store_name']}, seed {result['seeds'][0]}'s split: "
          f"{b['training_tracks']} training tracks ({b['training_samples']:,} samples), "
          f"{b['validation_tracks']} validation tracks ({b['validation_targets']:,} targets)")
    print(f"  baselines (this script, equal to the trainer's): code histogram "
          f"{b['unigram_bits']:.3f}, bigram {bigram:.3f} bits/sample")
    reference = {h["step"]: h for h in result.get("reference", [])}
    for h in history:
        line = (f"  step {h['step']:>6}: {h['bits']:.3f} bits/sample  ({h['bits'] - bigram:+.3f} "
                f"vs bigram, {h['seconds']:.0f} s)")
        if h["step"] in reference:
            r = reference[h["step"]]
            line += (f"  reference {r['bits']:.3f} ({r['seconds']:.0f} s): dwave - reference "
                     f"{h['bits'] - r['bits']:+.3f}")
        print(line)
    print(f"  below the bigram from step {result['first_step_below_bigram']}, 0.5 bit below "
          f"from step {result['first_step_half_bit_below_bigram']}; {result['wall_seconds']:.0f}"
          " s a run")
    if reference:
        ratios = [r["time_ratio"] for r in result["runs"]]
        print("  time to the reference's final loss, dwave / reference: "
              + ", ".join("never" if x is None else f"{x:.2f}" for x in ratios)
              + (f" (mean {result['time_ratio']:.2f})" if result["time_ratio"] else "")
              + (f"; on the mean curves {result['time_ratio_of_means']:.2f}"
                 if result["time_ratio_of_means"] else ""))


if __name__ == "__main__":
    main()
