#!/usr/bin/env python
"""Training throughput: one rank, the machine's cores, Horovod against independent processes,
bfloat16, a straightforward Keras baseline, the roofline, and a projection to GPU clusters.

    python benchmarks/bench_train.py STORE [--preset base] [--batch-size 1] [--out bench-output]

All in one run, predicted samples per second of full training steps (forward, backward, Adam;
the best of --rounds rounds):
  * dwave, one rank, 1 thread and all cores (synthetic in-memory windows; the store's windows
    at 1 thread, and the input pipeline's own rate: does it keep up?);
  * a straightforward Keras WaveNet of the same architecture (Conv1D causal dilated layers,
    skips at every position), 1 thread and all cores: the baseline dwave must beat;
  * R ranks of 1 thread (R = the cores) with `mpirun` and with `horovodrun --gloo`, against one
    rank (weak scaling) and against R independent processes without Horovod running at the
    same moment (what the machine itself loses when its cores work at once);
  * `--precision bf16` where the CPU multiplies bfloat16 natively (a line says so where not),
    against the fp32 step with only its products at bf16's measured rate (Amdahl);
  * the roofline: the step's FLOPs per predicted sample from the architecture
    (ModelConfig.training_flops_per_sample), the achieved GFLOP/s, and this machine's rate for
    the step's own matrix products (each forward product and its two gradient products, timed
    alone with the same threads);
  * a projection to 8, 64 and 512 GPUs: measured step + ring allreduce of the gradients.
Writes OUT/train_<preset>.json and OUT/train_scaling_<preset>.png. STORE is any store that
`dwave preprocess` wrote (`dwave demo` leaves one in demo-output/store). The script reruns
itself for each measurement (--worker, --keras-baseline), so each has a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from machine import describe  # noqa: E402

MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}


# -- the measurements, each in its own process ------------------------------------------------


def _threads(count: int) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(count)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def _wait_for_all(barrier: str | None, rank: int, ranks: int) -> None:
    """Independent processes start their clocks together: each leaves a file, waits for all."""
    if not barrier:
        return
    open(os.path.join(barrier, str(rank)), "w").close()
    while len(os.listdir(barrier)) < ranks:
        time.sleep(0.01)


def best_of(rounds: int, steps: int, step) -> float:
    """Seconds per step: the best of `rounds` rounds of `steps` steps. A VM's cores are shared
    with its host: the best round is the code's speed, the others add the neighbours'."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(steps):
            loss = step()
        float(loss)  # the last step has finished
        best = min(best, (time.perf_counter() - started) / steps)
    return best


def worker(args) -> None:
    """Full training steps of dwave's Trainer: Horovod unless --independent."""
    from dwave.ranks import Ranks, start_horovod

    ranks = Ranks() if args.independent else start_horovod()
    size, rank = ranks.size, (args.rank if args.independent else ranks.rank)
    _threads(args.threads)
    import numpy as np
    import tensorflow as tf

    from dwave.model.config import ModelConfig
    from dwave.train.trainer import Trainer

    config = ModelConfig.from_preset(args.preset)
    span = config.span(args.window)
    tf.keras.utils.set_random_seed(0)
    trainer = Trainer(config, 1e-4, 0, size, args.precision, ranks)
    trainer.broadcast_from_rank0()
    no_stop = tf.constant(False)

    def timed(batches) -> float:
        for _ in range(args.warmup):
            trainer.train_step(*next(batches), no_stop)
        _wait_for_all(args.barrier, rank, args.ranks)
        ranks.sum(tf.constant(0.0))  # start the clock together
        return best_of(args.rounds, args.steps,
                       lambda: trainer.train_step(*next(batches), no_stop)[0])

    rng = np.random.default_rng(rank)
    synthetic = (tf.constant(rng.integers(0, 256, (args.batch_size, span), dtype=np.uint8)),
                 tf.zeros((args.batch_size,), tf.int32))

    def repeat():
        while True:
            yield synthetic

    results = {"ranks": size, "synthetic_step_s": timed(repeat())}
    if args.with_store:
        from dwave.train.data import open_training_data

        data = open_training_data(args.store, span, args.batch_size, seed=0)
        batches = iter(data.train.dataset(rank, 0, 10**9))
        results["store_step_s"] = timed(batches)
        results["data_mode"] = data.train.mode
        started = time.perf_counter()  # the input pipeline alone: batches per second
        for _ in range(20):
            next(batches)
        results["input_batches_per_s"] = 20 / (time.perf_counter() - started)
    if args.roofline:
        results["product_rate_flops"] = product_rate(
            config, args.window, args.batch_size,
            dtype=trainer.model.product_dtype.name)  # the dtype the model's products run in
    if rank == 0 or args.independent:
        results["parameters"] = trainer.model.parameter_count
        results["gradient_bytes"] = 4 * sum(int(np.prod(v.shape))
                                            for v in trainer.model.trainable_variables)
        print("RESULT " + json.dumps(results), flush=True)


def product_rate(config, window: int, batch: int, repeats: int = 3,
                 dtype: str = "float32") -> float:
    """This machine's FLOP/s for the training step's own matrix products (in `dtype`): each
    forward product (m, k) @ (k, n) with its input gradient (m, n) @ (n, k) and weight gradient
    (k, m) @ (m, n), timed alone (best of `repeats`), total FLOPs over total time."""
    import tensorflow as tf

    total_flops = total_s = 0.0
    for _, m, k, n in config.products(window, batch):
        x, w, dy = (tf.cast(tf.random.normal(shape), dtype)
                    for shape in ((m, k), (k, n), (m, n)))
        products = [lambda: tf.matmul(x, w), lambda: tf.matmul(dy, w, transpose_b=True),
                    lambda: tf.matmul(x, dy, transpose_a=True)]
        for product in products:
            product().numpy()  # first call: allocation, kernel choice
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                product().numpy()
                best = min(best, time.perf_counter() - started)
            total_s += best
            total_flops += 2 * m * k * n
    return total_flops / total_s


def keras_baseline(args) -> None:
    """A straightforward Keras WaveNet: what most tutorials and reimplementations write."""
    _threads(args.threads)
    import numpy as np
    import tensorflow as tf

    from dwave.model.config import ModelConfig

    c = ModelConfig.from_preset(args.preset)
    L = tf.keras.layers
    inputs = tf.keras.Input((None,), dtype="int32")
    h = L.Embedding(c.quantization_channels, c.residual_channels)(inputs)
    skips = []
    for d in c.dilations:
        f = L.Conv1D(c.dilation_channels, 2, dilation_rate=d, padding="causal",
                     activation="tanh")(h)
        g = L.Conv1D(c.dilation_channels, 2, dilation_rate=d, padding="causal",
                     activation="sigmoid")(h)
        z = L.Multiply()([f, g])
        skips.append(L.Conv1D(c.skip_channels, 1)(z))
        h = L.Add()([h, L.Conv1D(c.residual_channels, 1)(z)])
    out = L.Activation("relu")(L.Add()(skips))
    out = L.Conv1D(c.skip_channels, 1, activation="relu")(out)
    logits = L.Conv1D(c.quantization_channels, 1)(out)
    model = tf.keras.Model(inputs, logits)
    optimizer = tf.keras.optimizers.Adam(1e-4)
    rf = c.receptive_field

    @tf.function
    def step(codes):
        with tf.GradientTape() as tape:
            logits = model(codes[:, :-1])[:, rf - 1:]
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                labels=codes[:, rf:], logits=logits))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    codes = tf.constant(np.random.default_rng(0).integers(
        0, 256, (args.batch_size, c.span(args.window))), tf.int32)
    for _ in range(args.warmup):
        step(codes)
    step_s = best_of(args.rounds, args.steps, lambda: step(codes))
    print("RESULT " + json.dumps({"synthetic_step_s": step_s}), flush=True)


# -- the driver -------------------------------------------------------------------------------


def dwave_row(threads: int | str) -> str:
    """The name of dwave's one-rank row at `threads` threads (the JSON's key)."""
    return f"dwave, 1 rank x {threads} thread{'s' if int(threads) > 1 else ''}"


def bf16_products_only(f: dict, threads: str) -> float:
    """What bf16 / fp32 would be at `threads` if only the products changed, from one run's
    figures: the fp32 step with its products (at their measured float32 rate) replaced by the
    same products at their measured bfloat16 rate, the rest of the step as in fp32 (Amdahl).
    The bf16 step can pass it where its own rest is lighter (fused casts and sums)."""
    step = 1 / f["rows"][dwave_row(threads)]["samples_per_s"]  # seconds per predicted sample
    fp32_products = f["training_flops_per_sample"] / (f["dense_product_rate_gflops"][threads]
                                                      * 1e9)
    bf16_products = fp32_products / f["bf16_products_speedup"][threads]
    return step / (step - fp32_products + bf16_products)


def _result_of(proc: subprocess.CompletedProcess) -> dict:
    for line in proc.stdout.splitlines():
        if "RESULT " in line:  # horovodrun prefixes "[0]<stdout>:"
            return json.loads(line.split("RESULT ", 1)[1])
    sys.exit(f"benchmark child failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
             f"\n{proc.stderr[-3000:]}")


def _beside_python(tool: str) -> str:
    """A console script of this Python's environment (a venv not on PATH), else PATH's."""
    mine = os.path.join(os.path.dirname(sys.executable), tool)
    return mine if os.access(mine, os.X_OK) else tool


def run_child(command: list[str]) -> dict:
    env = {**os.environ, **MPI_ENV}
    return _result_of(subprocess.run(command, capture_output=True, text=True, env=env))


def run_independent(command: list[str], ranks: int) -> list[dict]:
    """`ranks` plain processes (no Horovod, no MPI) timed over the same moment."""
    with tempfile.TemporaryDirectory() as barrier:
        children = [subprocess.Popen(command + ["--independent", "--rank", str(rank), "--ranks",
                                                str(ranks), "--barrier", barrier],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for rank in range(ranks)]
        outputs = [child.communicate() for child in children]
        return [_result_of(subprocess.CompletedProcess(child.args, child.returncode, *output))
                for child, output in zip(children, outputs)]


def projection(step_s: float, gradient_bytes: int, samples_per_rank_step: int) -> list[dict]:
    """Synchronous data parallelism at scale: each step is the compute plus one ring allreduce
    of the gradients (no overlap of the two assumed: a conservative bound)."""
    rows = []
    for gbps in (25, 100):
        for n in (8, 64, 512):
            allreduce_s = 2 * (n - 1) / n * gradient_bytes * 8 / (gbps * 1e9)
            step = step_s + allreduce_s
            rows.append({"gpus": n, "link_gbps": gbps, "allreduce_ms": 1000 * allreduce_s,
                         "efficiency": step_s / step,
                         "samples_per_s": n * samples_per_rank_step / step})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", nargs="?", help="a dwave store")
    parser.add_argument("--out", default="bench-output")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round (5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds per measurement; the best counts (3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    parser.add_argument("--batch-size", type=int, default=1, help="per rank (1)")
    parser.add_argument("--window", type=int, default=4000,
                        help="predicted samples per window (4000)")
    parser.add_argument("--ranks", type=int, default=os.cpu_count(),
                        help="ranks and independent processes of 1 thread each (the cores: "
                             f"{os.cpu_count()})")
    parser.add_argument("--gpu-step-ms", type=float, default=100.0,
                        help="assumed per-GPU step time for the projection's second table (100)")
    for hidden in ("--worker", "--keras-baseline", "--independent", "--with-store",
                   "--roofline"):
        parser.add_argument(hidden, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.keras_baseline:
        return keras_baseline(args)
    if not args.store:
        parser.error("STORE is required")
    figures = measure(args)
    report(figures)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train_{args.preset}")
    with open(f"{stem}.json", "w") as f:
        json.dump(figures, f, indent=2)
    plot(figures, os.path.join(args.out, f"train_scaling_{args.preset}.png"))
    print(f"\nwrote {stem}.json and {args.out}/train_scaling_{args.preset}.png")


def measure(args) -> dict:
    from dwave.cores import bf16_products_native
    from dwave.model.config import ModelConfig

    here = os.path.abspath(__file__)
    cores, ranks = os.cpu_count() or 1, args.ranks
    common = [args.store, "--preset", args.preset, "--steps", str(args.steps), "--rounds",
              str(args.rounds), "--warmup",
              str(args.warmup), "--batch-size", str(args.batch_size), "--window",
              str(args.window)]
    worker = [sys.executable, here, *common, "--worker"]
    mpirun = ["mpirun", "--bind-to", "none", "-x", "PATH", "-np"]
    per_rank = args.batch_size * args.window
    config = ModelConfig.from_preset(args.preset)
    flops = config.training_flops_per_sample(args.window)

    def rate(result: dict, key: str = "synthetic_step_s") -> float:
        return result.get("ranks", 1) * per_rank / result[key]

    rows, step_s = {}, {}

    def row(name: str, result: dict, threads: int, dense_rate: float | None = None) -> None:
        samples = rate(result)
        rows[name] = {"samples_per_s": samples, "threads": threads,
                      "gflops": samples * flops / 1e9,
                      "of_dense_rate": samples * flops / dense_rate if dense_rate else None}
        step_s[name] = result["synthetic_step_s"]

    print(f"{args.preset}, batch {args.batch_size} x {args.window} per rank; {describe()}",
          flush=True)
    print("measuring dwave, 1 rank x 1 thread (with the store and the roofline) ...", flush=True)
    one = run_child(mpirun + ["1", *worker, "--threads", "1", "--with-store", "--roofline"])
    dense = {1: one["product_rate_flops"]}
    row(dwave_row(1), one, 1, dense[1])
    if cores > 1:
        print(f"measuring dwave, 1 rank x {cores} threads (and the roofline) ...", flush=True)
        many = run_child(mpirun + ["1", *worker, "--threads", str(cores), "--roofline"])
        dense[cores] = many["product_rate_flops"]
        row(dwave_row(cores), many, cores, dense[cores])
    for threads in sorted({1, cores}):
        print(f"measuring the straightforward Keras WaveNet, {threads} thread(s) ...", flush=True)
        keras = run_child([sys.executable, here, *common, "--keras-baseline", "--threads",
                           str(threads)])
        row(f"Keras, {threads} thread(s)", keras, threads, dense[threads])
    print(f"measuring {ranks} independent processes x 1 thread, at the same moment ...",
          flush=True)
    alone = run_independent([*worker, "--threads", "1"], ranks)
    rows[f"{ranks} independent processes x 1 thread"] = {
        "samples_per_s": sum(rate(r) for r in alone), "threads": ranks,
        "gflops": sum(rate(r) for r in alone) * flops / 1e9, "of_dense_rate": None}
    print(f"measuring {ranks} Horovod ranks x 1 thread, mpirun ...", flush=True)
    hvd_mpi = run_child(mpirun + [str(ranks), *worker, "--threads", "1", "--with-store"])
    row(f"Horovod, {ranks} ranks x 1 thread, mpirun", hvd_mpi, ranks)
    print(f"measuring {ranks} Horovod ranks x 1 thread, horovodrun --gloo ...", flush=True)
    hvd_gloo = run_child([_beside_python("horovodrun"), "--gloo", "-np", str(ranks), *worker,
                          "--threads", "1"])
    row(f"Horovod, {ranks} ranks x 1 thread, horovodrun --gloo", hvd_gloo, ranks)
    bf16, bf16_products = bf16_products_native(), {}
    if bf16:
        for threads in sorted({1, cores}):
            print(f"measuring dwave --precision bf16, 1 rank x {threads} thread(s) ...",
                  flush=True)
            result = run_child(mpirun + ["1", *worker, "--threads", str(threads),
                                         "--precision", "bf16", "--roofline"])
            row(f"dwave bf16, 1 rank x {threads} thread(s)", result, threads)
            # The step's products alone in bfloat16 against float32 (bf16_products_only turns
            # it into what the whole step would gain).
            bf16_products[str(threads)] = result["product_rate_flops"] / dense[threads]

    def samples(name: str) -> float:
        return rows[name]["samples_per_s"]

    independent = samples(f"{ranks} independent processes x 1 thread")
    horovod = {}
    for launcher in ("mpirun", "horovodrun --gloo"):
        total = samples(f"Horovod, {ranks} ranks x 1 thread, {launcher}")
        horovod[launcher] = {"vs_one_rank": total / (ranks * samples(dwave_row(1))),
                             "vs_independent": total / independent}
    speedups = {threads: samples(dwave_row(threads))
                / samples(f"Keras, {threads} thread(s)") for threads in sorted({1, cores})}
    figures = {
        "machine": describe(), "preset": args.preset, "parameters": one["parameters"],
        "batch_size_per_rank": args.batch_size, "window": args.window, "ranks": ranks,
        "training_flops_per_sample": flops, "dense_product_rate_gflops": {
            str(t): r / 1e9 for t, r in dense.items()},
        "rows": rows, "speedup_over_keras": {str(t): s for t, s in speedups.items()},
        "horovod_efficiency": horovod, "bf16_native": bf16,
        "data_mode": one["data_mode"],
        "store_over_synthetic_one_rank": rate(one, "store_step_s") / rate(one),
        "store_over_synthetic_ranks": rate(hvd_mpi, "store_step_s") / rate(hvd_mpi),
        "input_batches_per_s_one_rank": one["input_batches_per_s"],
    }
    if bf16:
        figures["bf16_speedup"] = {str(t): samples(
            f"dwave bf16, 1 rank x {t} thread(s)") / samples(
            dwave_row(t)) for t in sorted({1, cores})}
        figures["bf16_products_speedup"] = bf16_products
    gradient_bytes = one["gradient_bytes"]
    figures["gradient_bytes"] = gradient_bytes
    figures["projection_measured_step"] = projection(one["synthetic_step_s"], gradient_bytes,
                                                     per_rank)
    figures["projection_gpu_step"] = projection(args.gpu_step_ms / 1000, gradient_bytes, per_rank)
    figures["measured_step_ms"] = 1000 * one["synthetic_step_s"]
    figures["assumed_gpu_step_ms"] = args.gpu_step_ms
    return figures


def report(f: dict) -> None:
    print(f"\n{f['preset']} preset, {f['parameters']:,} parameters, batch "
          f"{f['batch_size_per_rank']} x {f['window']} predicted samples per rank; "
          f"{f['machine']}")
    print(f"a training step's products: {f['training_flops_per_sample'] / 1e6:.2f} MFLOP per "
          "predicted sample; this machine's rate for the step's own products (float32): "
          + ", ".join(f"{r:.0f} GFLOP/s at {t} thread(s)"
                      for t, r in f["dense_product_rate_gflops"].items()))
    print(f"\n{'synthetic input, full steps':52}{'samples/s':>11}{'GFLOP/s':>9}"
          f"{'of products':>13}")
    for name, r in f["rows"].items():
        share = f"{r['of_dense_rate']:.0%}" if r["of_dense_rate"] else ""
        print(f"{name:52}{r['samples_per_s']:>11,.0f}{r['gflops']:>9.1f}{share:>13}")
    print("\ndwave / straightforward Keras: " + ", ".join(
        f"{s:.2f}x at {t} thread(s)" for t, s in f["speedup_over_keras"].items()))
    for launcher, e in f["horovod_efficiency"].items():
        print(f"Horovod {launcher}, {f['ranks']} ranks: {e['vs_independent']:.1%} of "
              f"{f['ranks']} independent processes, {e['vs_one_rank']:.1%} of {f['ranks']} x "
              "one rank alone")
    if f["bf16_native"]:
        print("bf16 / fp32: " + ", ".join(f"{s:.2f}x at {t} thread(s)"
                                          for t, s in f["bf16_speedup"].items()))
        print("the step's products alone, bf16 / fp32: " + ", ".join(
            f"{s:.2f}x at {t} thread(s)" for t, s in f["bf16_products_speedup"].items()))
        print("bf16 / fp32 if only the products changed (the fp32 step, its products at bf16's "
              "rate): " + ", ".join(f"{bf16_products_only(f, t):.2f}x at {t} thread(s)"
                                    for t in f["bf16_products_speedup"]))
    else:
        print("bf16: not measured: this CPU has neither AVX512-BF16 nor AMX-BF16 "
              "(TensorFlow would emulate the products, slower than float32)")
    print(f"store / synthetic input: {f['store_over_synthetic_one_rank']:.1%} (1 rank), "
          f"{f['store_over_synthetic_ranks']:.1%} ({f['ranks']} ranks); the input pipeline "
          f"alone feeds {f['input_batches_per_s_one_rank']:.0f} batches/s ({f['data_mode']} "
          "mode)")
    print(f"\nprojection: step = compute + ring allreduce of {f['gradient_bytes'] / 1e6:.1f} MB "
          "of gradients, 2(N-1)/N x bytes / bandwidth, no overlap (conservative), perfect input")
    for title, rows, step in [
            ("measured CPU step", f["projection_measured_step"], f["measured_step_ms"]),
            ("assumed GPU step", f["projection_gpu_step"], f["assumed_gpu_step_ms"])]:
        print(f"  {title} {step:.0f} ms:")
        print(f"  {'GPUs':>6}{'link':>10}{'allreduce':>12}{'efficiency':>12}{'samples/s':>14}")
        for row in rows:
            print(f"  {row['gpus']:>6}{row['link_gbps']:>7} Gb{row['allreduce_ms']:>10.1f}ms"
                  f"{row['efficiency']:>11.1%}{row['samples_per_s']:>14,.0f}")


def plot(f: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(f["rows"])
    values = [f["rows"][n]["samples_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    bars = ax.barh(range(len(names)), values,
                   color=["tab:grey" if n.startswith("Keras") else "tab:blue" for n in names])
    ax.bar_label(bars, [f"{v:,.0f}" for v in values], padding=3, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("predicted samples / s (full training steps)")
    ax.set_title(f"WaveNet {f['preset']}, batch {f['batch_size_per_rank']} x {f['window']} per "
                 f"rank; {f['machine']}", fontsize=9)
    ax.set_xlim(0, max(values) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
