"""The CUDA engine against the CPU engine, in Numba's CUDA simulator (conftest sets
NUMBA_ENABLE_CUDASIM=1, so these kernels run on the CPU, thread by thread): the same logits to
float rounding, the same codes, and one song state that either engine continues."""

from __future__ import annotations

import numpy as np
import pytest

from dwave.generate.cpu_engine import FastGenerator
from dwave.model.config import ModelConfig
from dwave.model.weights import random_weights as weights_of


def random_weights(conditions=3, two_codes=True):
    """A small network of odd sizes (the CPU engine pads them, the CUDA engine does not):
    20 codes, channels 6 / 5 / 8, dilations 1, 2, 1, 2."""
    config = ModelConfig(quantization_channels=20, residual_channels=6, dilation_channels=5,
                         skip_channels=8, stacks=2, max_dilation=2,
                         input_kernel=2 if two_codes else 1,
                         condition_values=[str(i) for i in range(conditions)])
    return weights_of(config), config.dilations


def engines(weights, dilations, batch, condition):
    from dwave.generate.cuda_engine import CudaGenerator

    cpu = FastGenerator(weights, dilations, batch, condition, threads=1)
    # 2 songs per block: 3 songs leave the last block half empty; 4 threads split columns.
    gpu = CudaGenerator(weights, dilations, batch, condition, songs_per_block=2,
                        threads_per_block=4)
    return cpu, gpu


@pytest.mark.parametrize("conditions, two_codes", [
    (3, True), pytest.param(0, False, marks=pytest.mark.slow)])  # the simulator takes seconds
def test_the_cuda_engine_gives_the_cpu_engines_logits_and_codes(conditions, two_codes):
    from numba import config

    assert config.ENABLE_CUDASIM  # the simulator, not a GPU this machine does not have
    weights, dilations = random_weights(conditions=conditions, two_codes=two_codes)
    batch, steps = 3, 4  # 4 steps wrap every ring (dilations 1, 2); the simulator is slow
    condition = [2, 0, 1] if conditions else None
    rng = np.random.default_rng(1)
    # Teacher forcing: the same inputs at every step, so the logits are comparable throughout.
    forced = rng.integers(0, 20, (steps, batch))
    cpu, gpu = engines(weights, dilations, batch, condition)
    _, cpu_logits = cpu.generate(np.zeros((steps, batch)), 1.0, forced=forced, keep_logits=True)
    _, gpu_logits = gpu.generate(np.zeros((steps, batch)), 1.0, forced=forced, keep_logits=True)
    np.testing.assert_allclose(gpu_logits, cpu_logits, rtol=1e-5, atol=1e-5)
    # Sampling from each song's uniforms, and the most likely code at temperature 0.
    for temperature in (0.7, 0.0):
        cpu, gpu = engines(weights, dilations, batch, condition)
        uniforms = rng.random((steps, batch), dtype=np.float32)
        cpu_codes = cpu.generate(uniforms, temperature)
        gpu_codes = gpu.generate(uniforms, temperature)
        np.testing.assert_array_equal(gpu_codes, cpu_codes)
        state_cpu, state_gpu = cpu.state(), gpu.state()
        np.testing.assert_allclose(state_gpu.caches, state_cpu.caches, rtol=1e-5, atol=1e-6)
        assert state_gpu.t == state_cpu.t == steps
        np.testing.assert_array_equal(state_gpu.next_code, state_cpu.next_code)
        np.testing.assert_array_equal(state_gpu.previous_code, state_cpu.previous_code)


def test_a_song_state_moves_between_engines_and_resumes_where_it_was():
    """A state the CPU engine saved, continued by the CUDA engine (and the other way): the
    codes an uninterrupted CPU run makes, the mechanism `dwave generate`'s resume relies on."""
    weights, dilations = random_weights()
    batch, condition = 3, [0, 1, 2]
    uniforms = np.random.default_rng(2).random((16, batch), dtype=np.float32)
    whole, _ = engines(weights, dilations, batch, condition)
    expected = whole.generate(uniforms, 1.0)

    cpu, gpu = engines(weights, dilations, batch, condition)
    first = cpu.generate(uniforms[:6], 1.0)
    gpu.restore(cpu.state())
    middle = gpu.generate(uniforms[6:11], 1.0)
    cpu.restore(gpu.state())
    last = cpu.generate(uniforms[11:], 1.0)
    np.testing.assert_array_equal(np.concatenate([first, middle, last]), expected)


def test_the_engine_is_chosen_by_name_and_the_simulator_is_never_the_default():
    from dwave.errors import DwaveError
    from dwave.generate.cuda_engine import CudaGenerator
    from dwave.generate.engines import default_engine, make_engine

    weights, dilations = random_weights()
    assert isinstance(make_engine("cuda", weights, dilations, 2, [0, 1]), CudaGenerator)
    assert isinstance(make_engine("cpu", weights, dilations, 2, [0, 1]), FastGenerator)
    assert default_engine() == "cpu"  # no GPU here; the simulator is for tests only
    with pytest.raises(DwaveError, match="unknown engine 'tpu'"):
        make_engine("tpu", weights, dilations, 2)
    with pytest.raises(DwaveError, match="conditioned: pass a condition"):
        make_engine("cuda", weights, dilations, 2)
