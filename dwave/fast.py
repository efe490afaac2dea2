"""Fast ("cached") WaveNet sampling: O(layers) work per new sample, many songs per step.

A layer of dilation d needs, at step t, its own input from step t - d. Each layer keeps the
last d of its inputs in a ring buffer (slot t mod d), so a step reads one slot, computes the
gated unit for one position and writes one slot: every layer once per sample, instead of the
whole network over the receptive field (Paine et al. 2016, "Fast Wavenet Generation").

The step is a Numba-compiled loop over plain float32 arrays exported from the model: a whole
chunk of samples runs without returning to Python, the matrix products go to BLAS, and all
songs of a batch advance together (each product is then a (songs x channels) matrix times the
weights). A TensorFlow graph pays microseconds of dispatch per op, and a step is ~200 ops, which
is why this is not a tf.function (measured: benchmarks/bench_generate.py).

Random draws come in as uniforms, one stream per song (seeded by the song's number), so a
song's samples do not depend on which batch or rank generated it. Priming fills every cache
from one pass of the full network (TensorFlow, causal mode) over the prime.
"""

from __future__ import annotations

import numba
import numpy as np

def export_weights(model) -> tuple:
    """The model's weights as contiguous float32 arrays, stacked per kind."""
    f32 = lambda v: np.ascontiguousarray(np.asarray(v, np.float32))  # noqa: E731
    m = model
    res_w = [v.numpy() for v in m.res_w] or [np.zeros((m.config.dilation_channels,
                                                      m.config.residual_channels))]
    res_b = [v.numpy() for v in m.res_b] or [np.zeros(m.config.residual_channels)]
    return (f32(m.embedding.numpy()), f32([v.numpy() for v in m.conv_w]),
            f32([v.numpy() for v in m.conv_b]), f32(res_w), f32(res_b), f32(m.skip_w.numpy()),
            f32(m.skip_b.numpy()), f32(m.head1_w.numpy()), f32(m.head1_b.numpy()),
            f32(m.head2_w.numpy()), f32(m.head2_b.numpy()))


class FastGenerator:
    """Cached generation for a batch of songs with one model.

    State: the caches (songs, sum of dilations, C) with layer l's ring at offsets[l], the step
    counter t (position of the next input) and each song's next input code.
    """

    def __init__(self, model, batch: int, genre_ids=None):
        self.model = model
        self.config = c = model.config
        self.batch = batch
        self.weights = export_weights(model)
        self.dilations = np.array(c.dilations, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.dilations)[:-1]]).astype(np.int64)
        self.genre_ids = None if genre_ids is None else np.asarray(genre_ids, np.int32)
        bias = model.genre_bias(self.genre_ids)  # raises for a conditioned model without ids
        layers, D2 = len(c.dilations), 2 * c.dilation_channels
        self.genre_bias = (np.zeros((batch, layers, D2), np.float32) if bias is None else
                           np.ascontiguousarray(bias.numpy().reshape(batch, layers, D2)))
        self.reset()

    def reset(self) -> None:
        """Silence before the start: zero caches, exactly what causal zero-padding computes."""
        c = self.config
        self.caches = np.zeros((self.batch, int(self.dilations.sum()), c.residual_channels),
                               np.float32)
        self.t = 0
        self.next_code = np.full(self.batch, c.quantization_channels // 2, np.int64)

    def prime(self, codes: np.ndarray) -> None:
        """Start every song from `codes` (batch, N), N >= 1: one full-network pass over all but
        the last code fills the caches; the last code is the next input."""
        codes = np.asarray(codes)
        n = codes.shape[1]
        self.reset()
        if n > 1:
            inputs: list = []
            self.model(codes[:, :-1], genre=self.genre_ids, causal=True, layer_inputs=inputs)
            for h, d, offset in zip(inputs, self.dilations, self.offsets):
                h = h.numpy()
                for k in range(max(0, n - 1 - d), n - 1):  # the last d inputs, by slot
                    self.caches[:, offset + k % d] = h[:, k]
        self.t = n - 1
        self.next_code = codes[:, -1].astype(np.int64)

    def generate(self, uniforms: np.ndarray, temperature: float,
                 forced: np.ndarray | None = None, keep_logits: bool = False):
        """Advance every song by len(uniforms) samples. Returns the codes (steps, batch), and
        with `keep_logits` also every step's logits (steps, batch, Q).

        `forced` (steps, batch) >= 0 replaces the sampled code (teacher forcing, for tests)."""
        uniforms = np.ascontiguousarray(uniforms, np.float32)
        steps = uniforms.shape[0]
        if forced is None:
            forced = np.full(uniforms.shape, -1, np.int64)
        codes = np.empty((steps, self.batch), np.int64)
        q = self.config.quantization_channels
        logits = np.empty((steps if keep_logits else 1, self.batch, q), np.float32)
        inv_t = 0.0 if temperature == 0 else 1.0 / temperature
        _run(self.weights, self.dilations, self.offsets, self.genre_bias, self.caches,
             self.t, self.next_code, uniforms, np.float32(inv_t),
             np.asarray(forced, np.int64), codes, logits, keep_logits)
        self.t += steps
        self.next_code = codes[-1].copy()
        return (codes, logits) if keep_logits else codes


@numba.njit(cache=True, nogil=True)
def _run(weights, dilations, offsets, genre_bias, caches, t0, first_code, uniforms, inv_t,
         forced, codes_out, logits_out, keep_logits):
    emb, conv_w, conv_b, res_w, res_b, skip_w, skip_b, h1_w, h1_b, h2_w, h2_b = weights
    B = caches.shape[0]
    C = caches.shape[2]
    D = conv_w.shape[2] // 2
    L = conv_w.shape[0]
    Q = h2_w.shape[1]
    x = np.empty((B, 2 * C), np.float32)  # [past, now]: one product for both conv taps
    h = np.empty((B, C), np.float32)
    zs = np.empty((B, L * D), np.float32)
    z = np.empty((B, D), np.float32)
    code = first_code.copy()
    zero, half = np.float32(0.0), np.float32(0.5)
    for k in range(uniforms.shape[0]):
        t = t0 + k
        for b in range(B):
            h[b] = emb[code[b]]
        for layer in range(L):
            slot = offsets[layer] + t % dilations[layer]
            for b in range(B):
                x[b, :C] = caches[b, slot]
                x[b, C:] = h[b]
                caches[b, slot] = h[b]
            fg = np.dot(x, conv_w[layer])
            for b in range(B):
                for j in range(D):
                    f = fg[b, j] + conv_b[layer, j] + genre_bias[b, layer, j]
                    g = fg[b, D + j] + conv_b[layer, D + j] + genre_bias[b, layer, D + j]
                    value = _tanh(f) * (half + half * _tanh(half * g))  # tanh(f) sigmoid(g)
                    z[b, j] = value
                    zs[b, layer * D + j] = value
            if layer < L - 1:
                r = np.dot(z, res_w[layer])
                for b in range(B):
                    for j in range(C):
                        h[b, j] += r[b, j] + res_b[layer, j]
        skip = np.maximum(np.dot(zs, skip_w) + skip_b, zero)
        hidden = np.maximum(np.dot(skip, h1_w) + h1_b, zero)
        logits = np.dot(hidden, h2_w) + h2_b
        if keep_logits:
            logits_out[k] = logits
        for b in range(B):
            if forced[k, b] >= 0:
                code[b] = forced[k, b]
            elif inv_t == 0.0:
                code[b] = np.argmax(logits[b])
            else:
                code[b] = _sample_row(logits[b], inv_t, uniforms[k, b], Q)
            codes_out[k, b] = code[b]


@numba.njit(cache=True, inline="always", fastmath=True)
def _tanh(x):
    """float32 tanh as a rational function (Eigen's ptanh coefficients): |error| < 4e-7, and
    plain arithmetic, 3-4x faster here than libm's tanh/exp per element."""
    limit = np.float32(7.90531110763549805)
    x = min(max(x, -limit), limit)
    x2 = x * x
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return x * p / q


@numba.njit(cache=True, nogil=True)
def _sample_row(logits, inv_t, uniform, q):
    """Inverse-CDF draw from softmax(logits * inv_t), in float64 for a clean CDF."""
    top = np.max(logits) * inv_t
    total = 0.0
    probs = np.empty(q, np.float64)
    for i in range(q):
        probs[i] = np.exp(logits[i] * inv_t - top)
        total += probs[i]
    target = uniform * total
    running = 0.0
    for i in range(q):
        running += probs[i]
        if running > target:
            return i
    return q - 1
