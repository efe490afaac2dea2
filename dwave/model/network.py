"""WaveNet (van den Oord et al. 2016) in TensorFlow/Keras: the model and nothing else.

Causal dilated convolutions of kernel 2, gated tanh x sigmoid units, residual and skip 1x1
connections, and a ReLU -> 1x1 -> ReLU -> 1x1 head giving the output distribution's parameters
(dwave.model.output: logits over the mu-law codes); the input layer embeds the current code and
(ModelConfig.input_kernel 2) the one before; optional global conditioning (ModelConfig.condition:
genre today; an embedding added inside every gate, one row per value).

Two ways to run the same weights:

* valid (training, the default): no padding at all. Each layer of dilation d shortens the
  sequence by d, so N input codes give N - (receptive_field - 1) outputs, the i-th predicting
  the code after input i + receptive_field - 1. Nothing is computed that no output needs, and
  the skip connections are evaluated only at the output positions (where the loss is), as one
  fused matrix product over all layers.
* causal (generation, priming): every layer is zero-padded on the left by its dilation, so N
  inputs give N outputs; exactly what a fast generator with zero-initialised caches computes.

Both are causal by construction: an output never depends on a later input.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..errors import DwaveError
from . import output
from .config import ModelConfig
from .weights import ExportedWeights  # noqa: F401  (the model exports them)

keras = tf.keras


# --precision: the dtype of the matrix products. Weights, the residual stream, the gates,
# the biases and the loss stay float32: on CPUs the element-wise ops run slower in bfloat16
# than in float32, while the products, nearly all of the arithmetic, run up to 2x faster with
# AVX512-BF16 or AMX (benchmarks/bench_train.py measures both precisions).
PRODUCT_DTYPES = {"fp32": tf.float32, "bf16": tf.bfloat16, "mixed": tf.float16}


def _over_rows(x, w, product_of_rows):
    """product_of_rows applied to x as a 2-D (rows, channels) matrix, the result shaped as x
    with w's output channels last."""
    shape = tf.shape(x)
    out = product_of_rows(tf.reshape(x, [-1, shape[-1]]))
    return tf.reshape(out, tf.concat([shape[:-1], tf.shape(w)[-1:]], 0))


def dense(x, w, b, dtype=tf.float32):
    """x @ w + b over the last axis, the product in `dtype`, the result float32. A 2-D MatMul
    then BiasAdd, the pattern TensorFlow's CPU graph optimiser fuses into one oneDNN op."""
    return _over_rows(tf.cast(x, dtype), w, lambda rows: tf.nn.bias_add(
        tf.cast(tf.matmul(rows, tf.cast(w, dtype)), tf.float32), b))


def product(x, w, dtype):
    """x @ w over the last axis, in `dtype` (x already is), the result in `dtype`: for a fused
    kernel that adds the bias and converts as it reads."""
    return _over_rows(x, w, lambda rows: tf.matmul(rows, tf.cast(w, dtype)))


class WaveNet(keras.Model):
    """Weights as plain variables, exported as ExportedWeights for the generation engines.

    The layer arithmetic is written three times, each for where it runs: here (TensorFlow,
    the definition), in dwave/model/fused_ops.cc (training's fused CPU kernels) and in the
    engines' compiled steps (dwave.generate.cpu_engine, cuda_engine). Tests pin each copy to
    this one: tests/test_fused_ops.py, test_generate.py's fast-equals-full checks and
    tests/test_cuda_generator.py."""

    def __init__(self, config: ModelConfig, precision: str = "fp32", fused_ops=None):
        """`fused_ops`: dwave's fused CPU kernels (the module dwave.model.fused_ops loads; a
        training step asks for them with fused_ops.for_training) to run the gate and the conv's
        input through; None: TensorFlow's own ops, for the same arithmetic. Building the model
        loads, compiles and prints nothing."""
        super().__init__(name="wavenet")
        self.config = config
        self.product_dtype = PRODUCT_DTYPES[precision]
        self.fused_ops = fused_ops
        c = config
        C, D, S, Q = (c.residual_channels, c.dilation_channels, c.skip_channels,
                      c.quantization_channels)
        layers = len(c.dilations)
        # Initialisers by name: Keras makes a fresh one per weight (a shared initialiser object
        # would give every layer the same values), its seed drawn from Python's `random`: seed
        # with tf.keras.utils.set_random_seed for the same weights in every process.
        glorot, zeros = "glorot_uniform", "zeros"
        if c.input_kernel == 1:
            self.embedding = self.add_weight(
                name="embedding", shape=(Q, C), initializer="random_normal")
            self.embedding_previous = None
        else:
            # The reference's width-2 conv of one-hot codes, one (Q, C) table per tap, at its
            # Glorot scale over the conv's fans (2Q in, 2C out): sqrt(6 / (2Q + 2C)).
            # A fresh initialiser per table: one unseeded instance gives every call the same values.
            taps = lambda: keras.initializers.VarianceScaling(  # noqa: E731
                scale=0.5, mode="fan_avg", distribution="uniform")
            self.embedding = self.add_weight(name="embedding", shape=(Q, C), initializer=taps())
            self.embedding_previous = self.add_weight(
                name="embedding_previous", shape=(Q, C), initializer=taps())
        # Per layer: the kernel-2 dilated conv for filter and gate fused into one matrix acting
        # on [x[t-d], x[t]] (2C -> 2D), and the residual 1x1 (D -> C; the last layer has none:
        # nothing reads its residual output).
        self.conv_w = [self.add_weight(name=f"layer{i}/conv", shape=(2 * C, 2 * D),
                                       initializer=glorot) for i in range(layers)]
        self.conv_b = [self.add_weight(name=f"layer{i}/conv_bias", shape=(2 * D,),
                                       initializer=zeros) for i in range(layers)]
        self.res_w = [self.add_weight(name=f"layer{i}/residual", shape=(D, C),
                                      initializer=glorot) for i in range(layers - 1)]
        self.res_b = [self.add_weight(name=f"layer{i}/residual_bias", shape=(C,),
                                      initializer=zeros) for i in range(layers - 1)]
        # All layers' skip 1x1s as one (layers*D -> S) matrix: the sum over layers of z_l @ W_l
        # is one product of the concatenated z's, a single large matmul instead of 30 small ones.
        # Each layer's block starts as a (D -> S) 1x1 of its own would (Glorot over D + S, not
        # over layers*D + S): the reference WaveNet's scale, whose early learning is faster.
        per_layer_glorot = keras.initializers.VarianceScaling(
            scale=(layers * D + S) / (D + S), mode="fan_avg", distribution="uniform")
        self.skip_w = self.add_weight(name="skip", shape=(layers * D, S),
                                      initializer=per_layer_glorot)
        self.skip_b = self.add_weight(name="skip_bias", shape=(S,), initializer=zeros)
        self.head1_w = self.add_weight(name="head1", shape=(S, S), initializer=glorot)
        self.head1_b = self.add_weight(name="head1_bias", shape=(S,), initializer=zeros)
        width = output.for_model(config).width  # the output distribution's parameters
        self.head2_w = self.add_weight(name="head2", shape=(S, width), initializer=glorot)
        self.head2_b = self.add_weight(name="head2_bias", shape=(width,), initializer=zeros)
        if c.conditioned:
            # Global conditioning: the paper's V_f h and V_g h, for every layer at once.
            # Named after the condition ("genre"): the name that checkpoints hold.
            self.condition_w = self.add_weight(
                name=c.condition, shape=(len(c.condition_values), layers * 2 * D),
                initializer="random_normal")
        self.built = True

    def export(self) -> ExportedWeights:
        """The weights as ExportedWeights (copies, float32)."""
        c = self.config
        C, D = c.residual_channels, c.dilation_channels
        stacked = lambda vs, shape: (np.stack([v.numpy() for v in vs]) if vs  # noqa: E731
                                     else np.zeros((0, *shape), np.float32))
        return ExportedWeights(
            embedding=self.embedding.numpy(),
            embedding_previous=(None if self.embedding_previous is None
                                else self.embedding_previous.numpy()),
            conv=stacked(self.conv_w, (2 * C, 2 * D)),
            conv_bias=stacked(self.conv_b, (2 * D,)), residual=stacked(self.res_w, (D, C)),
            residual_bias=stacked(self.res_b, (C,)), skip=self.skip_w.numpy(),
            skip_bias=self.skip_b.numpy(), head1=self.head1_w.numpy(),
            head1_bias=self.head1_b.numpy(), head2=self.head2_w.numpy(),
            head2_bias=self.head2_b.numpy(),
            condition=self.condition_w.numpy() if c.conditioned else None)

    @property
    def parameter_count(self) -> int:
        return int(sum(tf.size(w) for w in self.weights))

    # -- pieces shared with the fast generator --------------------------------------------------

    def head(self, skip):
        h = tf.nn.relu(skip)
        h = tf.nn.relu(dense(h, self.head1_w, self.head1_b, self.product_dtype))
        return dense(h, self.head2_w, self.head2_b, self.product_dtype)

    def embed(self, codes, causal):
        """The input layer: (B, N, C) float32 from codes (B, N). Kernel 2 in valid mode gives
        N - 1 positions (each needs the code before it); in causal mode N, the first with
        nothing before it."""
        codes = tf.cast(codes, tf.int32)
        if self.embedding_previous is None:
            return tf.gather(self.embedding, codes)
        all_but_last = tf.slice(codes, [0, 0], [-1, tf.shape(codes)[1] - 1])
        previous = tf.gather(self.embedding_previous, all_but_last)
        if causal:  # nothing before the first code: a zero row, as zero-padded one-hot input
            return tf.gather(self.embedding, codes) + tf.pad(previous, [[0, 0], [1, 0], [0, 0]])
        return tf.gather(self.embedding, tf.slice(codes, [0, 1], [-1, -1])) + previous

    def condition_bias(self, condition):
        """(batch, layers*2D) gate biases of the condition values (indices into
        config.condition_values), or None for an unconditioned model."""
        if not self.config.conditioned:
            return None
        if condition is None:
            raise DwaveError(f"this model is conditioned on {self.config.condition}: pass one")
        return tf.gather(self.condition_w, tf.cast(condition, tf.int32))

    def conv_input(self, h, d, length, causal):
        """The dilated conv's input [x[t - d] | x[t]] for `length` positions (in the products'
        dtype), and x[t] (float32, for the residual sum). Valid: positions d.. of h; causal:
        every position, zeros before the start."""
        low = self.product_dtype
        if causal:
            h_low = tf.cast(h, low)
            past = tf.slice(tf.pad(h_low, [[0, 0], [d, 0], [0, 0]]), [0, 0, 0], [-1, length, -1])
            return tf.concat([past, h_low], axis=-1), h
        now = tf.slice(h, [0, d, 0], [-1, length, -1])
        if self.fused_ops is not None:
            return self.fused_ops.dwave_pairs(h, Tout=low, dilation=d), now
        h_low = tf.cast(h, low)  # cast once: both halves of the conv read it
        past = tf.slice(h_low, [0, 0, 0], [-1, length, -1])
        now_low = tf.slice(h_low, [0, d, 0], [-1, length, -1]) if low != h.dtype else now
        return tf.concat([past, now_low], axis=-1), now

    def gated_unit(self, pairs, layer, condition_bias=None):
        """z = tanh(filter) * sigmoid(gate), [filter | gate] = pairs @ conv + bias (+ the
        condition's gate bias), in the products' dtype."""
        low = self.product_dtype
        w, b = self.conv_w[layer], self.conv_b[layer]
        if self.fused_ops is not None:
            fg = product(pairs, w, low)
            if condition_bias is not None:
                fg = tf.cast(fg, tf.float32) + condition_bias
            return self.fused_ops.dwave_gate(fg, b, Tout=low)
        fg = dense(pairs, w, b, low)
        if condition_bias is not None:
            fg += condition_bias
        filter_, gate = tf.split(fg, 2, axis=-1)
        return tf.cast(tf.tanh(filter_) * tf.sigmoid(gate), low)

    def residual(self, now, z, layer):
        """The next layer's input: now + z @ residual + bias, float32. In bfloat16 the fused
        kernel reads the product as it is (no Cast, BiasAdd and AddV2 around it); in float32
        TensorFlow's MatMul already fuses the bias and the sum is one AddV2."""
        w, b = self.res_w[layer], self.res_b[layer]
        if self.fused_ops is not None and self.product_dtype != tf.float32:
            return self.fused_ops.dwave_residual(now, product(z, w, self.product_dtype), b)
        return now + dense(z, w, b, self.product_dtype)

    def call(self, codes, condition=None, causal=False, training=False, layer_inputs=None):
        """Logits (batch, T, Q) as float32. `codes`: integers (batch, N).
        Valid mode: T = N - receptive_field + 1. `causal=True`: T = N.
        `layer_inputs`: a list that receives every layer's input (batch, N, C) in causal mode:
        what the fast generator's caches hold, so priming is one pass of this network."""
        # Slices of the time axis are tf.slice, never Python indexing: the gradient of a
        # StridedSlice is TF's generic StridedSliceGrad, slow on a CPU (it was half of the `base`
        # step); the gradient of a Slice is a Pad.
        c = self.config
        low = self.product_dtype
        h = self.embed(codes, causal)  # (B, N or N - 1, C), float32
        bias = self.condition_bias(condition)
        if bias is not None:
            layer_biases = tf.split(bias[:, None, :], len(c.dilations), axis=-1)
        length = tf.shape(h)[1]
        out_len = length if causal else length - sum(c.dilations)
        zs = []
        for i, d in enumerate(c.dilations):
            if layer_inputs is not None:
                layer_inputs.append(h)
            length = length if causal else length - d
            pairs, now = self.conv_input(h, d, length, causal)
            z = self.gated_unit(pairs, i, None if bias is None else layer_biases[i])
            zs.append(tf.slice(z, [0, length - out_len, 0], [-1, out_len, -1]))
            if i < len(c.dilations) - 1:
                h = self.residual(now, z, i)
        skip = dense(tf.concat(zs, axis=-1), self.skip_w, self.skip_b, low)
        return self.head(skip)
