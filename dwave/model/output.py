"""The output distribution: what the network's last layer parameterises, p(x_t | x_<t).

Everything that depends on its form lives here: how wide the head's last layer is, the
training loss, how a code is drawn from it (the generation engines' inner step), how many
codes there are to count (the baselines). Today's one is the WaveNet paper's: a softmax over
the quantization_channels mu-law codes. A second (a mixture of logistics over a 16-bit
sample, say) would implement the same four members, and `for_model` would choose it from a
ModelConfig field.

TensorFlow is imported only by `loss`; the draw is a Numba function that the CPU engine's
compiled step calls for every song and step (dwave.generate.cuda_engine draws the same way on
a GPU, in a device function of its kernel).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def draw_code(logits, inv_t, uniform, quantization_channels):
    """A code drawn from softmax(logits * inv_t) by inverting its CDF at `uniform` in [0, 1);
    inv_t 0: the most likely code. Each term's exp in float32, their sums in float64 for a clean
    CDF. `logits` may be padded past quantization_channels: only the first that many count (a
    contiguous row: a slice of it would make this loop, run for every song and step, slower)."""
    if inv_t == 0.0:
        return np.argmax(logits[:quantization_channels])
    top = logits[0]
    for i in range(1, quantization_channels):
        top = max(top, logits[i])
    top = top * inv_t
    total = 0.0
    probs = np.empty(quantization_channels, np.float64)
    for i in range(quantization_channels):
        probs[i] = np.exp(logits[i] * inv_t - top)
        total += probs[i]
    target = uniform * total
    running = 0.0
    for i in range(quantization_channels):
        running += probs[i]
        if running > target:
            return i
    return quantization_channels - 1


class Categorical:
    """p(x_t | x_<t) = softmax(logits): one logit per mu-law code."""

    def __init__(self, quantization_channels: int):
        self.quantization_channels = quantization_channels

    @property
    def width(self) -> int:
        """Outputs of the head's last layer: one logit per code."""
        return self.quantization_channels

    @property
    def codes(self) -> int:
        """How many values a sample takes: the baselines count this many."""
        return self.quantization_channels

    def loss(self, logits, targets):
        """Mean negative log-likelihood, in nats, of int `targets` under `logits` (TensorFlow
        tensors, logits with a last axis of `width`)."""
        import tensorflow as tf

        # -log softmax(logits)[target] = logsumexp(logits) - logits[target]: with its gradient,
        # faster on a CPU than TF's fused sparse_softmax_cross_entropy_with_logits kernel.
        picked = tf.gather(logits, targets, batch_dims=2)
        return tf.reduce_mean(tf.reduce_logsumexp(logits, axis=-1) - picked)

    # (logits row, inverse temperature, uniform, quantization_channels) -> code, compiled:
    # the engines' step calls it for every song and step.
    draw = staticmethod(draw_code)


def for_model(config) -> Categorical:
    """The output distribution of a ModelConfig's network."""
    return Categorical(config.quantization_channels)
