"""The generator's product kernels (the tiled FMA one and the plain loops for CPUs without FMA)
against numpy, on every row tail, odd sizes, strided views and accumulation; shape checks;
padding and packing; the whole generator on the loop path and on a generic (FMA-less) CPU."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from dwave.generate.packed_product import WIDTH, matmul, pack, pad_blocks, padded

KERNELS = [True, False]  # tiled (FMA), plain loops


@numba.njit
def product(a, packed, out, accumulate, tiled=True):
    matmul(a, packed, out, accumulate, tiled)


@pytest.mark.parametrize("tiled", KERNELS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9, 32])
@pytest.mark.parametrize("k, n", [(1, 16), (37, 48), (128, 128)])
def test_matmul_equals_numpy_on_strided_views(rows, k, n, tiled):
    rng = np.random.default_rng(rows * 1000 + k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    wide = rng.standard_normal((rows, k + 5)).astype(np.float32)  # a: a view, row stride k + 5
    a = wide[:, 3:3 + k]
    out_wide = np.full((rows, n + 16), 7.0, np.float32)
    out = out_wide[:, 16:]
    product(a, pack(w), out, False, tiled)
    expected = a.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4 * np.sqrt(k))
    assert (out_wide[:, :16] == 7.0).all()  # nothing written outside the view
    product(a, pack(w), out, True, tiled)  # out += a @ w
    np.testing.assert_allclose(out, 2 * expected, rtol=1e-5, atol=2e-4 * np.sqrt(k))


@pytest.mark.parametrize("tiled", KERNELS)
def test_a_row_does_not_depend_on_the_rows_around_it(tiled):
    """Bit for bit: a song's numbers must not change with its batch or its place in it."""
    rng = np.random.default_rng(0)
    w = pack(rng.standard_normal((300, 32)).astype(np.float32))
    a = rng.standard_normal((11, 300)).astype(np.float32)
    together = np.empty((11, 32), np.float32)
    product(a, w, together, False, tiled)
    for r in range(11):
        alone = np.empty((1, 32), np.float32)
        product(a[r:r + 1], w, alone, False, tiled)
        assert np.array_equal(alone[0], together[r])


def test_pad_blocks_pads_each_block_and_pack_makes_panels():
    w = np.arange(2 * 3 * 2 * 5, dtype=np.float32).reshape(2 * 3, 2 * 5)  # 2 x 2 blocks of 3 x 5
    p = pad_blocks(w, 3, 5)
    assert p.shape == (2 * padded(3), 2 * padded(5)) == (32, 32)
    np.testing.assert_array_equal(p[16:19, 16:21], w[3:6, 5:10])
    np.testing.assert_array_equal(p[0:3, 0:5], w[0:3, 0:5])
    assert p.sum() == w.sum()  # the rest is zeros
    assert pad_blocks(w, None, 5).shape == (6, 32)
    packed = pack(p)
    assert packed.shape == (32 // WIDTH, 32, WIDTH)
    np.testing.assert_array_equal(packed[1, :, 3], p[:, WIDTH + 3])


@pytest.mark.slow  # compiles the kernel for five layouts: seconds
def test_matmul_refuses_shapes_and_strides_that_do_not_fit():
    w = pack(np.ones((8, 32), np.float32))
    a, out = np.ones((3, 8), np.float32), np.zeros((3, 32), np.float32)
    for bad_a, bad_out in [(a[:, :7], out), (a, out[:, :16]), (a[:2], out),
                           (np.ones((3, 16), np.float32)[:, ::2], out),
                           (a, np.zeros((3, 64), np.float32)[:, ::2])]:
        with pytest.raises(ValueError, match="matmul:"):
            product(bad_a, w, bad_out, False)
    product(a, w, out, False)
    assert (out == 8).all()


@pytest.mark.slow
@pytest.mark.parametrize("env", [{"DWAVE_PRODUCT_KERNEL": "loops"}, {"NUMBA_CPU_NAME": "generic"}])
def test_fast_generation_equals_the_full_network_on_the_loop_path(env, tmp_path):
    """In a fresh process (own Numba cache): the loop kernel chosen by hand, and chosen by itself
    for a CPU model without FMA; teacher-forced fast logits equal the full network's."""
    import os
    import subprocess
    import sys

    script = """
import numpy as np, tensorflow as tf
from dwave.generate import packed_product
from dwave.model.config import ModelConfig
from dwave.generate.cpu_engine import FastGenerator
from dwave.model.network import WaveNet
assert packed_product.KERNEL == "loops", packed_product.KERNEL
tf.keras.utils.set_random_seed(0)
model = WaveNet(ModelConfig(residual_channels=12, dilation_channels=10, skip_channels=20,
                            stacks=2, max_dilation=4, quantization_channels=100))
codes = np.random.default_rng(0).integers(0, 100, (3, 40))
full = model(codes, causal=True).numpy()
generator = FastGenerator.for_model(model, 3, threads=2)
forced = np.concatenate([codes[:, 1:], codes[:, -1:]], axis=1).T
generator.next_code = codes[:, 0].astype(np.int64)
_, logits = generator.generate(np.zeros((40, 3), np.float32), 1.0, forced=forced,
                               keep_logits=True)
np.testing.assert_allclose(logits.transpose(1, 0, 2), full, rtol=1e-4, atol=1e-4)
print("equal", packed_product.KERNEL)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env,
                                            "NUMBA_CACHE_DIR": str(tmp_path / "numba")})
    assert proc.returncode == 0 and "equal loops" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow  # thousands of barriers with threads napping for cores
def test_the_barrier_holds_with_more_threads_than_cores():
    """Four threads on (here) two cores, 2,000 barriers: each thread sees every other's phase
    before it goes on (a partner that was descheduled is waited for by napping, not spun for)."""
    from concurrent.futures import ThreadPoolExecutor

    from dwave.generate.barrier import barrier, flags

    @numba.njit(nogil=True)
    def worker(arrivals, me, parts, phases, rounds, errors):
        for n in range(1, rounds + 1):
            phases[me * 8] = n
            barrier(arrivals, me, parts, 2 * n - 1)  # barriers are numbered 1, 2, 3, ...
            for other in range(parts):
                if phases[other * 8] < n:
                    errors[me] += 1
            barrier(arrivals, me, parts, 2 * n)  # nobody runs ahead into phase n + 1

    parts, rounds = 4, 1000
    arrivals, phases = flags(parts), np.zeros(parts * 8, np.int64)
    errors = np.zeros(parts, np.int64)
    worker(flags(1), 0, 1, np.zeros(8, np.int64), 1, np.zeros(1, np.int64))  # compile first
    with ThreadPoolExecutor(parts) as pool:
        for f in [pool.submit(worker, arrivals, me, parts, phases, rounds, errors)
                  for me in range(parts)]:
            f.result(timeout=300)
    assert errors.sum() == 0 and (phases[::8] == rounds).all()
