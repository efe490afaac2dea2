"""dwave's fused CPU kernels (dwave/model/fused_ops.cc) against TensorFlow's own ops for the same
arithmetic, forward and gradient; the model with and without them; building, caching and
falling back."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dwave.model.config import ModelConfig

from conftest import ROOT


@pytest.fixture(scope="module")
def tf():
    import tensorflow as tf

    return tf


@pytest.fixture(scope="module")
def ops():
    from dwave.model import fused_ops

    module = fused_ops.load()
    assert module is not None, f"the fused kernels did not build: {fused_ops._loaded['reason']}"
    return module


def reference_gate(tf, fg, bias, dtype):
    f, g = tf.split(tf.cast(fg, tf.float32) + bias, 2, axis=-1)
    return tf.cast(tf.tanh(f) * tf.sigmoid(g), dtype)


def values_and_gradients(tf, fn, inputs, weight):
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        y = fn(*inputs)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * weight)
    return y.numpy(), [np.float32(g) for g in tape.gradient(loss, inputs)]


# The kernels' type pairs: float32 for fp32; bfloat16 products around float32 activations.
TYPES = [("float32", "float32"), ("bfloat16", "bfloat16"), ("float32", "bfloat16")]


@pytest.mark.parametrize("tin,tout", TYPES)
@pytest.mark.parametrize("shape", [(3, 7, 10), (5, 64), (2, 0, 8), (1, 1, 2)])
def test_gate_matches_tanh_times_sigmoid_with_its_bias(tf, ops, shape, tin, tout):
    rng = np.random.default_rng(1)
    # Wide enough to saturate both halves (|x| up to ~20), where approximations go wrong.
    fg = tf.cast(rng.normal(0, 6, shape).astype(np.float32), tin)
    bias = tf.constant(rng.normal(0, 2, shape[-1:]).astype(np.float32))
    weight = tf.constant(rng.normal(size=shape[:-1] + (shape[-1] // 2,)).astype(np.float32))
    z, (dfg, dbias) = values_and_gradients(
        tf, lambda x, b: ops.dwave_gate(x, b, Tout=tout), [fg, bias], weight)
    z_ref, (dfg_ref, dbias_ref) = values_and_gradients(
        tf, lambda x, b: reference_gate(tf, x, b, tout), [fg, bias], weight)
    assert z.dtype == z_ref.dtype and z.shape == z_ref.shape and dfg.shape == fg.shape
    # One rounding to bfloat16 is 2^-8 relative; the gate's own error ~1e-6.
    atol = 2e-6 if (tin, tout) == ("float32", "float32") else 8e-3
    np.testing.assert_allclose(np.float32(z), np.float32(z_ref), rtol=0, atol=atol)
    largest = lambda a: np.abs(a).max(initial=0)  # noqa: E731
    np.testing.assert_allclose(dfg, dfg_ref, rtol=0, atol=5 * atol * (1 + largest(dfg_ref)))
    # The bias gradient sums the rows (up to 35 here).
    np.testing.assert_allclose(dbias, dbias_ref, rtol=0,
                               atol=20 * atol * (1 + largest(dbias_ref)))


def test_the_gate_gradient_repeats_to_the_bit_on_several_threads(tf, ops):
    """The bias gradient sums per-shard partial sums in row order, not in the order the
    threads finish: a run repeats exactly."""
    rng = np.random.default_rng(2)
    fg = tf.constant(rng.normal(0, 3, (8, 4000, 64)).astype(np.float32))
    bias = tf.constant(rng.normal(size=64).astype(np.float32))
    dz = tf.constant(rng.normal(size=(8, 4000, 32)).astype(np.float32))
    sums = {ops.dwave_gate_grad(fg, bias, dz)[1].numpy().tobytes() for _ in range(30)}
    assert len(sums) == 1


def test_gate_refuses_an_odd_width(tf, ops):
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        ops.dwave_gate(tf.zeros((2, 3)), tf.zeros(3))


@pytest.mark.parametrize("tin,tout", TYPES)
@pytest.mark.parametrize("dilation,length", [(1, 9), (4, 9), (8, 9), (0, 5), (256, 300)])
def test_pairs_are_the_past_and_present_of_every_position(tf, ops, tin, tout, dilation, length):
    rng = np.random.default_rng(dilation)
    h = tf.cast(tf.constant(rng.normal(size=(3, length, 6)).astype(np.float32)), tin)
    weight = tf.constant(rng.normal(size=(3, length - dilation, 12)).astype(np.float32))

    def reference(x):
        x = tf.cast(x, tout)
        return tf.concat([x[:, :length - dilation], x[:, dilation:]], axis=-1)

    x, (dh,) = values_and_gradients(
        tf, lambda v: ops.dwave_pairs(v, Tout=tout, dilation=dilation), [h], weight)
    x_ref, (dh_ref,) = values_and_gradients(tf, reference, [h], weight)
    assert x.dtype == x_ref.dtype and x.shape == (3, length - dilation, 12)
    np.testing.assert_array_equal(x, x_ref)  # a copy (and one rounding): exact
    # The gradient sums two halves per position: exact in float32, one rounding in bfloat16.
    tolerance = 0 if tout == "float32" else 1e-2 * np.abs(dh_ref).max()
    np.testing.assert_allclose(np.float32(dh), np.float32(dh_ref), rtol=0, atol=tolerance)


def test_pairs_refuse_a_dilation_longer_than_the_input(tf, ops):
    with pytest.raises(tf.errors.InvalidArgumentError, match="dilation 8"):
        ops.dwave_pairs(tf.zeros((1, 8, 2)), dilation=8)


@pytest.mark.parametrize("tr", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(3, 7, 10), (4, 5), (2, 0, 8)])
def test_residual_is_now_plus_product_plus_bias(tf, ops, tr, shape):
    rng = np.random.default_rng(4)
    now = tf.constant(rng.normal(size=shape).astype(np.float32))
    r = tf.cast(rng.normal(size=shape).astype(np.float32), tr)
    bias = tf.constant(rng.normal(size=shape[-1:]).astype(np.float32))
    weight = tf.constant(rng.normal(size=shape).astype(np.float32))

    def reference(now, r, bias):
        return now + tf.nn.bias_add(tf.cast(r, tf.float32), bias)

    out, grads = values_and_gradients(tf, ops.dwave_residual, [now, r, bias], weight)
    out_ref, grads_ref = values_and_gradients(tf, reference, [now, r, bias], weight)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=1e-6)  # the same sum, one rounding
    for mine, theirs in zip(grads, grads_ref):  # d now, d r (rounded to r's type), d bias
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-5 * (1 + np.abs(theirs).max(
            initial=0)))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_model_computes_the_same_with_and_without_fused_kernels(tf, ops, precision):
    """Same weights, same codes: logits and every weight's gradient agree, valid and causal."""
    from dwave.model.network import WaveNet

    config = ModelConfig.from_preset("tiny", condition_values=["a", "b"])
    models = []
    for fused in (True, False):
        tf.keras.utils.set_random_seed(3)
        models.append(WaveNet(config, precision, ops if fused else None))
    assert models[0].fused_ops is not None and models[1].fused_ops is None
    codes = tf.constant(np.random.default_rng(0).integers(0, 256, (2, config.span(50))))
    condition = tf.constant([0, 1])
    results = []
    for model in models:
        with tf.GradientTape() as tape:
            logits = model(codes, condition)
            loss = tf.reduce_mean(logits ** 2)
        causal = model(codes, condition, causal=True)
        results.append((logits.numpy(), causal.numpy(),
                        [tf.convert_to_tensor(g).numpy()
                         for g in tape.gradient(loss, model.trainable_weights)]))
    (fused_logits, fused_causal, fused_grads), (tf_logits, tf_causal, tf_grads) = results
    scale = 1e-4 if precision == "fp32" else 2e-2  # bf16: products rounded differently
    np.testing.assert_allclose(fused_logits, tf_logits, atol=scale * np.abs(tf_logits).max())
    np.testing.assert_allclose(fused_causal, tf_causal, atol=scale * np.abs(tf_causal).max())
    for mine, theirs in zip(fused_grads, tf_grads):
        np.testing.assert_allclose(mine, theirs, atol=scale * (np.abs(theirs).max() + 1e-12))


def test_float16_products_use_tensorflows_ops(tf, ops):
    """The kernels read and write float32 and bfloat16 only: --precision mixed (float16, for
    GPUs) keeps TensorFlow's ops even on a CPU."""
    from dwave.model.network import WaveNet

    from dwave.model import fused_ops

    assert fused_ops.for_training("mixed") is None
    assert fused_ops.for_training("bf16") is ops
    assert fused_ops.for_training("fp32") is ops
    # Building a model loads nothing: it runs the kernels it is given, TensorFlow's ops without.
    assert WaveNet(ModelConfig.from_preset("tiny"), "fp32").fused_ops is None


def run_python(code: str, cache: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "DWAVE_CACHE": cache, **env}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


LOAD = """
    from dwave.model import fused_ops
    from dwave.model.network import WaveNet
    from dwave.model.config import ModelConfig
    module = fused_ops.load()
    model = WaveNet(ModelConfig.from_preset("tiny"), "fp32", fused_ops.for_training("fp32"))
    print("loaded" if module is not None else "fallback", model.fused_ops is not None)
"""


@pytest.mark.slow
def test_ranks_starting_together_build_once_into_an_empty_cache(tmp_path):
    cache = str(tmp_path / "cache")
    procs = [run_python(LOAD, cache) for _ in range(3)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert out.split() == ["loaded", "True"], err
    builds = os.listdir(os.path.join(cache, "ops"))
    assert len(builds) == 1
    assert sorted(os.listdir(os.path.join(cache, "ops", builds[0]))) == [
        "build.lock", "fused_ops.so"]  # no partial library left behind


def load_afresh(monkeypatch, capsys, cache, **env):
    """fused_ops.load() as a process's first call would make it, in this process: `env` set,
    nothing loaded yet. Returns (what for_training gives, dwave's lines on stderr)."""
    from dwave.model import fused_ops

    monkeypatch.setattr(fused_ops, "_loaded", {})  # restored after the test
    monkeypatch.setenv("DWAVE_CACHE", str(cache))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    fused_ops.load()
    kernels = fused_ops.for_training("fp32")
    err = capsys.readouterr().err
    return kernels, [line for line in err.splitlines() if line.startswith("dwave:")]


def test_without_a_compiler_the_model_falls_back_with_one_line(tmp_path, monkeypatch, capsys):
    kernels, lines = load_afresh(monkeypatch, capsys, tmp_path / "cache", CXX="no-such-compiler")
    assert kernels is None
    assert lines == ["dwave: fused CPU kernels unavailable, training uses TensorFlow's own ops "
                     "(slower): no C++ compiler (no-such-compiler) on PATH"]


def test_a_failing_build_falls_back_naming_the_compiler_error(tmp_path, monkeypatch, capsys):
    kernels, lines = load_afresh(monkeypatch, capsys, tmp_path / "cache", CXX="false")
    assert kernels is None
    assert len(lines) == 1 and "dwave: fused CPU kernels unavailable" in lines[0] \
        and "false failed building" in lines[0]
    assert not any(name.endswith(".so") for _, _, names in os.walk(tmp_path) for name in names)


def test_an_unwritable_cache_falls_back_naming_it_and_what_to_do(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache folder would be")  # makedirs fails, whoever runs it
    kernels, lines = load_afresh(monkeypatch, capsys, cache)
    assert kernels is None
    line, = lines
    assert str(cache) in line and "set DWAVE_CACHE to a writable folder" in line
    assert cache.read_text() == "a file where the cache folder would be"


def test_dwave_fused_ops_0_asks_for_tensorflows_ops_quietly(tmp_path, monkeypatch, capsys):
    kernels, lines = load_afresh(monkeypatch, capsys, tmp_path / "cache", DWAVE_FUSED_OPS="0")
    assert kernels is None and lines == []


def test_a_portable_level_is_one_build_for_every_cpu_that_has_it(monkeypatch):
    from dwave.model import fused_ops

    def key_on(cpu: str) -> str:
        monkeypatch.setattr(fused_ops, "_cpu_identity", lambda: cpu)
        return fused_ops._build_key()

    monkeypatch.delenv("DWAVE_MARCH", raising=False)
    assert key_on("model name: A") != key_on("model name: B")  # native: one build per CPU
    monkeypatch.setenv("DWAVE_MARCH", "x86-64-v3")
    assert key_on("model name: A") == key_on("model name: B")
    assert "-march=x86-64-v3" in fused_ops._command("out")


def test_a_level_the_cpu_lacks_is_refused_in_words_before_any_build(monkeypatch):
    from dwave.model import fused_ops

    monkeypatch.setitem(fused_ops._LEVEL_FLAGS, "x86-64-v3", {"avx2", "no-such-cpu-flag"})
    monkeypatch.setenv("DWAVE_MARCH", "x86-64-v3")
    with pytest.raises(RuntimeError, match="DWAVE_MARCH=x86-64-v3 needs no-such-cpu-flag, which "
                                           "this CPU lacks"):
        fused_ops.build()
