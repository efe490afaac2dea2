"""Listen while training: at each validation, rank 0 writes a short sample made by the fast
generator from the current weights, primed with a validation window, so a user can hear what
the numbers mean (a stuck run is audible: silence, a hum or white noise).

Written as RUN_DIR/samples/step-NNNNNNN.wav + .png (spectrogram) and to TensorBoard's
validation run as audio: the prime (the validation window, real music) first, then what the
model made from it; the spectrogram marks where the prime ends.

The other ranks must not wait for it. Rank 0 takes a copy of the weights and primes the caches
on its own thread (one causal pass over the window, milliseconds), then the sampling loop, the
files and the summary run on a background thread of one core while training goes on: the
compiled loop releases the GIL. At most one sample is in flight; a validation that comes while
the previous sample is still being made skips its own (and says so).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..model.rundir import SAMPLES


def primed_generator(model, prime: np.ndarray, condition_id: int | None):
    """A one-song fast generator holding a copy of the model's current weights, its caches
    filled from `prime` (1-D codes)."""
    from ..generate.cpu_engine import FastGenerator, prime_state

    condition = None if condition_id is None else [condition_id]
    generator = FastGenerator.for_model(model, 1, condition, threads=1)
    generator.restore(prime_state(model, np.asarray(prime, np.int64)[None], condition))
    return generator


def sample_codes(generator, samples: int, seed: int) -> np.ndarray:
    """`samples` new codes at temperature 1 (uses only the generator's copied weights)."""
    uniforms = np.random.default_rng(seed).random((samples, 1), dtype=np.float32)
    return generator.generate(uniforms, 1.0)[:, 0]


class Listener:
    """Makes and writes the listening samples of one training run, one at a time, beside it."""

    def __init__(self, run_dir: str, seconds: float, sample_rate: int,
                 quantization_channels: int, writer=None):
        self.directory = os.path.join(run_dir, SAMPLES)
        self.samples = max(1, int(round(seconds * sample_rate)))
        self.sample_rate, self.writer = sample_rate, writer
        self.quantization_channels = quantization_channels
        self.pool = ThreadPoolExecutor(1, "dwave-listen")
        self.pending: tuple[int, Future] | None = None
        self.reports: list[str] = []

    def start(self, model, prime: np.ndarray, condition_id: int | None, step: int,
              wait: bool = False) -> bool:
        """Begin the sample of `step`; False (nothing started) while the last is not done,
        unless `wait` (the run's last validation: nobody is waiting for rank 0 any more)."""
        if wait and self.pending:
            self.pending[1].exception()  # waits
        if self.pending and not self.pending[1].done():
            self.reports.append(f"listen: step {step} skipped, the sample of step "
                                f"{self.pending[0]} is still being made")
            return False
        self._collect()
        started = time.perf_counter()
        generator = primed_generator(model, prime, condition_id)
        blocking = time.perf_counter() - started  # what the training thread spent on it
        self.pending = (step, self.pool.submit(self._make, generator, np.asarray(prime), step,
                                               blocking))
        return True

    def _make(self, generator, prime: np.ndarray, step: int, blocking: float) -> str:
        from ..generate.song_files import write_song
        from ..store.audio import mu_law_decode

        started = time.perf_counter()
        codes = np.concatenate([prime.astype(np.int64),
                                sample_codes(generator, self.samples, seed=step)])
        os.makedirs(self.directory, exist_ok=True)
        stem = os.path.join(self.directory, f"step-{step:07d}")
        write_song(stem, codes, self.sample_rate, self.quantization_channels, primed=len(prime))
        if self.writer is not None:
            import tensorflow as tf

            audio = mu_law_decode(codes, self.quantization_channels).astype(np.float32)
            with open(stem + ".png", "rb") as f:
                picture = tf.io.decode_png(f.read(), channels=3)
            described = (f"the first {len(prime) / self.sample_rate:.2f} s: a validation window "
                         "(real music); after it, the fast generator's continuation")
            with self.writer.as_default(step=step):
                tf.summary.audio("sample", audio[None, :, None], self.sample_rate,
                                 max_outputs=1, description=described)
                tf.summary.image("sample_spectrogram", picture[None], max_outputs=1,
                                 description=described)
        return (f"listen: step {step} -> {os.path.relpath(stem, os.path.dirname(self.directory))}"
                f".wav ({len(prime) / self.sample_rate:.2f} s of prime, then "
                f"{self.samples / self.sample_rate:g} s generated in "
                f"{time.perf_counter() - started:.1f} s beside training after "
                f"{blocking:.2f} s of priming on the training thread)")

    def _collect(self) -> None:
        if self.pending and self.pending[1].done():
            step, future = self.pending
            self.pending = None
            try:
                self.reports.append(future.result())
            except Exception as exc:  # a sample is a by-product: never stop training for it
                self.reports.append(f"listen: warning: the sample of step {step} failed: "
                                    f"{type(exc).__name__}: {exc}")

    def finished(self) -> list[str]:
        """Report lines of samples finished (or skipped) since the last call."""
        self._collect()
        reports, self.reports = self.reports, []
        return reports

    def close(self) -> list[str]:
        """Wait for the sample in flight; its report lines."""
        if self.pending:
            self.pending[1].exception()  # waits
        self.pool.shutdown(wait=True)
        return self.finished()
