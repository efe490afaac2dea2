"""Which engine advances the songs: `cpu` (dwave.generate.cpu_engine, the compiled loop on the
rank's cores) or `cuda` (dwave.generate.cuda_engine, Numba CUDA kernels on the rank's GPU). Both are
made from a model's ExportedWeights and its dilations and share one interface: restore(
SongsState), state(), generate(uniforms, temperature, forced=None, keep_logits=False)."""

from __future__ import annotations

import os

from ..errors import DwaveError

ENGINES = ("cpu", "cuda")


def cuda_usable() -> bool:
    """A real CUDA GPU that Numba can run kernels on (Numba's simulator does not count: it is
    for tests, thousands of times slower than the CPU engine)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # no driver, no toolkit, a broken install: the CPU engine it is
        return False


def default_engine() -> str:
    return "cuda" if cuda_usable() else "cpu"


def make_engine(name: str, weights, dilations, batch: int, condition_ids=None,
                threads: int | None = None, cores: int | None = None):
    if name == "cpu":
        from .cpu_engine import FastGenerator

        return FastGenerator(weights, dilations, batch, condition_ids, threads, cores)
    if name == "cuda":
        from .cuda_engine import CudaGenerator

        return CudaGenerator(weights, dilations, batch, condition_ids)
    raise DwaveError(f"unknown engine {name!r}: choose from {', '.join(ENGINES)}")
