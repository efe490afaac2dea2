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
