"""The WaveNet's shape contract: causality (exact), the receptive field, valid == causal mode."""

from __future__ import annotations

import numpy as np
import pytest

from dwave.errors import DwaveError
from dwave.model.config import PRESETS, ModelConfig


@pytest.fixture(scope="module")
def tf():
    import tensorflow as tf

    return tf


def build(config, seed=0):
    import tensorflow as tf

    from dwave.model.network import WaveNet

    tf.keras.utils.set_random_seed(seed)
    return WaveNet(config)


@pytest.mark.parametrize("preset,expected", [("tiny", 128), ("small", 1024), ("base", 3071)])
def test_receptive_field_formula(preset, expected):
    config = ModelConfig.from_preset(preset)
    # kernel 2: each layer of dilation d sees d samples further back; plus the sample itself
    # and, by default, the code before it (the input layer's second tap).
    assert config.receptive_field == sum(config.dilations) + 2 == expected
    assert ModelConfig.from_preset(preset, input_kernel=1).receptive_field == expected - 1
    assert config.dilations[: config.max_dilation.bit_length()] == [
        2**i for i in range(config.max_dilation.bit_length())]
    assert len(config.dilations) == config.stacks * config.max_dilation.bit_length()


def test_base_preset_is_the_reference_size():
    c = ModelConfig.from_preset("base")
    assert (c.stacks, c.max_dilation, c.residual_channels, c.dilation_channels,
            c.skip_channels, c.quantization_channels) == (3, 512, 64, 64, 256, 256)


def test_config_json_round_trip_and_errors():
    c = ModelConfig.from_preset("tiny", condition_values=["a", "b"], residual_channels=8)
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(DwaveError, match="unknown preset"):
        ModelConfig.from_preset("huge")
    with pytest.raises(DwaveError, match="power of 2"):
        ModelConfig(max_dilation=48)
    with pytest.raises(DwaveError, match="unknown fields"):
        ModelConfig.from_dict({**c.to_dict(), "colour": "red"})
    with pytest.raises(DwaveError, match="input_kernel must be 1 or 2"):
        ModelConfig(input_kernel=3)


# The presets with the largest receptive fields take seconds each: the slow tier's.
@pytest.mark.parametrize("preset,input_kernel", [
    pytest.param(p, 2, marks=[pytest.mark.slow] if p in ("base", "music") else [])
    for p in PRESETS] + [("tiny", 1)])
def test_causal_exactly_and_receptive_field_is_tight(preset, input_kernel, tf):
    """Changing inputs at t >= k never changes outputs before k (bit-exact), and the output at
    t depends on the input at t - (receptive_field - 1) but not on anything earlier."""
    # Every preset's dilation structure, with narrow channels to keep the test quick.
    config = ModelConfig.from_preset(preset, residual_channels=8, dilation_channels=8,
                                     skip_channels=16, input_kernel=input_kernel)
    model = build(config)
    rf = config.receptive_field
    n = rf + 64
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (2, n))
    reference = model(codes, causal=True).numpy()
    for k in (1, rf // 2, rf, n - 1):
        changed = codes.copy()
        changed[:, k:] = rng.integers(0, 256, (2, n - k))
        out = model(changed, causal=True).numpy()
        np.testing.assert_array_equal(out[:, :k], reference[:, :k])
        assert not np.array_equal(out[:, k], reference[:, k])  # and position k sees input k
    # Tightness: input 0 reaches output rf-1 and no further. (In the deeper presets that one
    # path through every layer's past tap can fall below float32 resolution at random
    # initialisation, so the "reaches" half is checked on the 12-layer preset.)
    changed = codes.copy()
    changed[:, 0] = (codes[:, 0] + 128) % 256
    out = model(changed, causal=True).numpy()
    if preset == "tiny":
        assert not np.array_equal(out[:, rf - 1], reference[:, rf - 1])
    np.testing.assert_array_equal(out[:, rf:], reference[:, rf:])


@pytest.mark.parametrize("conditioned,input_kernel", [(False, 2), (True, 2), (False, 1)])
def test_valid_mode_equals_causal_mode_where_both_are_defined(conditioned, input_kernel, tf):
    genres = ["a", "b", "c"] if conditioned else []
    config = ModelConfig.from_preset("tiny", condition_values=genres, input_kernel=input_kernel)
    model = build(config)
    rf = config.receptive_field
    codes = np.random.default_rng(2).integers(0, 256, (3, rf + 200))
    genre = np.array([0, 2, 1]) if conditioned else None
    valid = model(codes, condition=genre).numpy()
    causal = model(codes, condition=genre, causal=True).numpy()
    assert valid.shape == (3, 201, 256)
    np.testing.assert_allclose(valid, causal[:, rf - 1:], rtol=1e-5, atol=1e-5)


def test_genre_changes_the_output_and_is_required(tf):
    config = ModelConfig.from_preset("tiny", condition_values=["a", "b"])
    model = build(config)
    codes = np.random.default_rng(3).integers(0, 256, (1, config.receptive_field + 10))
    a = model(codes, condition=np.array([0])).numpy()
    b = model(codes, condition=np.array([1])).numpy()
    assert not np.allclose(a, b)
    with pytest.raises(DwaveError, match="conditioned"):
        model(codes)


def test_parameter_count_matches_the_architecture(tf):
    c = ModelConfig.from_preset("base")
    L, C, D, S, Q = len(c.dilations), 64, 64, 256, 256
    expected = (2 * Q * C  # embeddings of the current code and the one before
                + L * (2 * C * 2 * D + 2 * D)  # fused filter/gate kernel-2 convs
                + (L - 1) * (D * C + C)  # residual 1x1s (the last layer has none)
                + L * D * S + S  # skip 1x1s
                + S * S + S + S * Q + Q)  # head
    assert build(c).parameter_count == expected


def test_each_layers_skip_block_starts_at_the_scale_of_its_own_1x1():
    """The fused (layers*D, S) skip matrix starts as `layers` separate (D, S) Glorot-uniform
    1x1s would (limit sqrt(6 / (D + S))), not as one Glorot matrix over layers*D + S inputs,
    which starts the skip sum ~2x smaller and learned 0.3-0.5 bit slower in the first 400 steps
    than the reference WaveNet on the same batches (benchmarks/bench_reference.py)."""
    c = ModelConfig.from_preset("small")
    D, S = c.dilation_channels, c.skip_channels
    skip = build(c).skip_w.numpy().reshape(len(c.dilations), D, S)
    limit = np.sqrt(6 / (D + S))
    for block in skip:
        assert np.abs(block).max() <= limit
        assert np.abs(block).max() > 0.95 * limit  # 4,096 uniform draws reach the edge
        assert block.std() == pytest.approx(limit / np.sqrt(3), rel=0.05)


def _product_dtypes(model, codes, tf) -> set:
    """The dtypes of the matrix products in the traced forward pass (MatMul's T attribute)."""
    graph = tf.function(lambda x: model(x)).get_concrete_function(
        tf.TensorSpec(codes.shape, tf.int32)).graph
    return {op.get_attr("T") for op in graph.get_operations()
            if op.type in ("MatMul", "BatchMatMulV2")}


@pytest.mark.parametrize("precision,dtype,tolerance", [("bf16", "bfloat16", 0.05),
                                                        ("mixed", "float16", 0.01)])
def test_precision_sets_the_products_type_and_only_that(precision, dtype, tolerance, tf):
    """The products run in the asked type (read from the traced graph, not from a setting);
    weights stay float32 and the logits agree with the float32 network to the type's precision
    (bfloat16 keeps 8 bits of mantissa: ~0.4 % per product)."""
    from dwave.model.network import WaveNet

    config = ModelConfig.from_preset("tiny", residual_channels=8, dilation_channels=8,
                                     skip_channels=16)
    full = build(config)
    low = WaveNet(config, precision)
    low.set_weights(full.get_weights())
    codes = np.random.default_rng(0).integers(0, 256, (2, config.receptive_field + 50))
    assert _product_dtypes(full, codes, tf) == {tf.float32}
    assert _product_dtypes(low, codes, tf) == {tf.as_dtype(dtype)}
    assert {w.dtype for w in low.weights} == {tf.float32}
    exact, approx = full(codes).numpy(), low(codes).numpy()
    assert approx.dtype == np.float32
    scale = np.abs(exact).max()
    assert np.abs(approx - exact).max() < tolerance * scale
    assert np.abs(approx - exact).max() > 0  # it did compute in the lower precision


@pytest.mark.parametrize("batch", [1, 3])
def test_the_configs_product_list_is_what_the_model_multiplies(batch, tf):
    """ModelConfig.products (the FLOP count and the roofline of bench_train) against the
    MatMul ops of the traced training forward pass, shapes read from the graph."""
    config = ModelConfig.from_preset("tiny", residual_channels=8, dilation_channels=6,
                                     skip_channels=10)
    model = build(config)
    window = 50
    graph = tf.function(lambda x: model(x)).get_concrete_function(
        tf.TensorSpec((batch, config.receptive_field - 1 + window), tf.int32)).graph
    traced = sorted((tuple(op.inputs[0].shape) + (op.inputs[1].shape[1],))
                    for op in graph.get_operations() if op.type == "MatMul")
    assert traced == sorted((m, k, n) for _, m, k, n in config.products(window, batch))
    per_sample = sum(6 * m * k * n for m, k, n in traced) / (batch * window)
    assert config.training_flops_per_sample(window) == pytest.approx(per_sample)


def _numpy_wavenet(weights, config, codes, condition_id=None):
    """The network of ExportedWeights' docstring in plain numpy, causal mode, one sequence."""
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    x = weights.embedding[codes].astype(np.float64)  # (N, C)
    if weights.embedding_previous is not None:  # input kernel 2: plus the code before's row
        x[1:] += weights.embedding_previous[codes[:-1]]
    layers, D = len(config.dilations), config.dilation_channels
    zs = []
    for i, d in enumerate(config.dilations):
        past = np.concatenate([np.zeros((d, x.shape[1])), x[:-d]])[:len(x)]
        fg = np.concatenate([past, x], axis=1) @ weights.conv[i] + weights.conv_bias[i]
        if condition_id is not None:
            fg = fg + weights.condition[condition_id, i * 2 * D:(i + 1) * 2 * D]
        z = np.tanh(fg[:, :D]) * sigmoid(fg[:, D:])
        zs.append(z)
        if i < layers - 1:
            x = x + z @ weights.residual[i] + weights.residual_bias[i]
    skip = np.concatenate(zs, axis=1) @ weights.skip + weights.skip_bias
    hidden = np.maximum(np.maximum(skip, 0) @ weights.head1 + weights.head1_bias, 0)
    return hidden @ weights.head2 + weights.head2_bias


@pytest.mark.parametrize("conditioned,input_kernel", [(False, 2), (True, 2), (False, 1)])
def test_exported_weights_are_the_whole_model(conditioned, input_kernel, tf):
    """Another engine needs only ExportedWeights and its docstring: the network computed from
    them in numpy equals the Keras model."""
    config = ModelConfig.from_preset("tiny", residual_channels=6, dilation_channels=5,
                                     skip_channels=7, input_kernel=input_kernel,
                                     condition_values=["a", "b"] if conditioned else [])
    model = build(config, seed=3)
    if conditioned:  # the embedding starts random; give the gate biases values too
        model.condition_w.assign(np.random.default_rng(1).normal(size=model.condition_w.shape))
    codes = np.random.default_rng(2).integers(0, 256, (1, 90))
    genre = np.array([1]) if conditioned else None
    expected = model(codes, condition=genre, causal=True).numpy()[0]
    weights = model.export()
    assert all(a is None or a.dtype == np.float32 for a in weights)
    assert (weights.embedding_previous is None) == (input_kernel == 1)
    got = _numpy_wavenet(weights, config, codes[0], 1 if conditioned else None)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_a_run_dirs_config_from_before_named_conditions_still_loads():
    """config.json written before conditions had a name held "genres": read as the genre
    condition, so those run dirs resume and generate."""
    legacy = {**ModelConfig.from_preset("tiny").to_dict(), "genres": ["rock", "pop"]}
    del legacy["condition"], legacy["condition_values"]
    config = ModelConfig.from_dict(legacy)
    assert (config.condition, config.condition_values) == ("genre", ["rock", "pop"])
    assert config.conditioned


def test_a_run_dirs_config_from_before_the_input_kernel_reads_as_kernel_1(tf):
    """config.json written before the input layer's second tap had no input_kernel: those
    checkpoints hold one embedding, so the config reads as kernel 1; new configs say 2."""
    saved = ModelConfig.from_preset("tiny").to_dict()
    assert saved["input_kernel"] == 2
    del saved["input_kernel"]
    assert ModelConfig.from_dict(saved).input_kernel == 1
    names = {v.name.split(":")[0] for v in build(ModelConfig.from_dict(saved)).variables}
    assert "embedding" in names and "embedding_previous" not in names
