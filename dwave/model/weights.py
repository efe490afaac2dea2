"""The contract between a trained WaveNet and any engine that runs it, in plain numpy: no
TensorFlow needed to read it (a GPU node's generator imports this, not the model)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ExportedWeights(NamedTuple):
    """A WaveNet's weights as plain float32 arrays, the contract between the model and any
    other engine that runs it (the CPU generator packs these; a GPU one would too). A layer
    computes [filter | gate] = [x[t - d] | x[t]] @ conv[l] + conv_bias[l] (+ the condition's
    row of `condition`), z = tanh(filter) * sigmoid(gate), x starting as embedding[code t] +
    embedding_previous[code t - 1] (nothing before the first code), x <- x + z @ residual[l] +
    residual_bias[l]; the output is head2(relu(head1(relu([z_0 .. z_L-1] @ skip + skip_bias)))).
    """

    embedding: np.ndarray  # (Q, C): input code -> x
    embedding_previous: np.ndarray | None  # (Q, C): the code before, added to x; None: kernel 1
    conv: np.ndarray  # (layers, 2C, 2D)
    conv_bias: np.ndarray  # (layers, 2D)
    residual: np.ndarray  # (layers - 1, D, C): the last layer has none
    residual_bias: np.ndarray  # (layers - 1, C)
    skip: np.ndarray  # (layers * D, S)
    skip_bias: np.ndarray  # (S,)
    head1: np.ndarray  # (S, S)
    head1_bias: np.ndarray  # (S,)
    head2: np.ndarray  # (S, Q)
    head2_bias: np.ndarray  # (Q,)
    condition: np.ndarray | None  # (conditions, layers * 2D) gate biases; None: unconditioned


def random_weights(config, seed: int = 0, scale: float = 0.3, conv_scale: float | None = None,
                   bias_scale: float = 0.1, head_scale: float = 1.0) -> ExportedWeights:
    """Weights of `config`'s shapes (a ModelConfig) drawn from normal distributions, without
    TensorFlow: what the engines' tests and benchmarks run on where no trained model is needed
    (a GPU node's benchmark has no TensorFlow). `scale` is the weights' spread (`conv_scale`
    the convolutions', default the same), `bias_scale` the biases' and the condition table's,
    `head_scale` the last layer's."""
    rng = np.random.default_rng(seed)
    Q, C, D, S = (config.quantization_channels, config.residual_channels,
                  config.dilation_channels, config.skip_channels)
    layers = len(config.dilations)

    def normal(*shape, spread=scale):
        return rng.normal(0, spread, shape).astype(np.float32)

    return ExportedWeights(
        embedding=normal(Q, C),
        embedding_previous=normal(Q, C) if config.input_kernel == 2 else None,
        conv=normal(layers, 2 * C, 2 * D, spread=conv_scale or scale),
        conv_bias=normal(layers, 2 * D, spread=bias_scale),
        residual=normal(layers - 1, D, C), residual_bias=normal(layers - 1, C, spread=bias_scale),
        skip=normal(layers * D, S), skip_bias=normal(S, spread=bias_scale),
        head1=normal(S, S), head1_bias=normal(S, spread=bias_scale),
        head2=normal(S, Q, spread=head_scale), head2_bias=normal(Q, spread=bias_scale),
        condition=(normal(len(config.condition_values), layers * 2 * D, spread=bias_scale)
                   if config.conditioned else None))
