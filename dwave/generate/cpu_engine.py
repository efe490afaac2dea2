"""Fast ("cached") WaveNet sampling: O(layers) work per new sample, many songs per step.

A layer of dilation d needs, at step t, its own input from step t - d. Each layer keeps the
last d of its inputs in a ring buffer (slot t mod d), so a step reads one slot, computes the
gated unit for one position and writes one slot: every layer once per sample, instead of the
whole network over the receptive field (Paine et al. 2016, "Fast Wavenet Generation").

The step is a Numba-compiled loop over float32 weights exported from the model, padded to
whole 16-column panels and packed once for the tiled product kernel in
`dwave.generate.packed_product`: a whole chunk of samples runs without returning to Python, and all
songs of a lane advance together
(each product is a (songs x channels) matrix times the weights). A TensorFlow graph pays
microseconds of dispatch per op, and a step is ~200 ops, which is why this is not a
tf.function; BLAS is half as fast on these shapes (measured: benchmarks/bench_generate.py).

Random draws come in as uniforms, one stream per song (seeded by the song's number), so a
song's samples do not depend on which batch, lane or rank generated it. Priming fills every
cache from one pass of the full network (TensorFlow, causal mode) over the prime.

An engine (this one, dwave.generate.cuda_engine's) is made from a model's ExportedWeights and its
dilations and takes and gives its songs' whole state as a `SongsState`: priming makes one
(`prime_state`), a checkpoint saves one, a resumed job restores it, whichever engine runs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numba
import numpy as np

from ..cores import usable_cores
from ..errors import DwaveError
from ..model.output import draw_code
from .barrier import barrier, flags
from .packed_product import KERNEL, ROWS, WIDTH, matmul, pack, pad_blocks, padded


class SongsState(NamedTuple):
    """Where a batch of songs is, in any engine's terms: `caches` (batch, slots, C) holds layer
    l's inputs in slots offsets[l] .. offsets[l] + d_l - 1 (offsets: cumulative dilations), the
    input of step t' in slot offsets[l] + t' mod d_l; `t` the position of the next input;
    each song's next input code and the code before it (-1: none, before the start)."""

    caches: np.ndarray
    t: int
    next_code: np.ndarray
    previous_code: np.ndarray

    def song(self, i: int) -> "SongsState":
        """Song i's state, as a batch of one."""
        return SongsState(self.caches[i:i + 1], self.t, self.next_code[i:i + 1],
                          self.previous_code[i:i + 1])

    @staticmethod
    def stack(states: list) -> "SongsState":
        """One batch of songs that are all at the same step."""
        assert len({s.t for s in states}) == 1, "songs of one batch are at one step"
        return SongsState(np.concatenate([s.caches for s in states]), states[0].t,
                          np.concatenate([s.next_code for s in states]),
                          np.concatenate([s.previous_code for s in states]))


def ring_offsets(dilations) -> np.ndarray:
    """Each layer's first slot in the caches: the dilations before it, summed."""
    dilations = np.asarray(dilations, np.int64)
    return np.concatenate([[0], np.cumsum(dilations)[:-1]]).astype(np.int64)


def silence(batch: int, dilations, channels: int, quantization_channels: int) -> SongsState:
    """Silence before the start: zero caches, exactly what causal zero-padding computes."""
    return SongsState(np.zeros((batch, int(np.sum(dilations)), channels), np.float32), 0,
                      np.full(batch, quantization_channels // 2, np.int64),
                      np.full(batch, -1, np.int64))


def prime_state(model, codes: np.ndarray, condition_ids=None) -> SongsState:
    """Every song started from `codes` (batch, N), N >= 1: one full-network pass (TensorFlow,
    causal) over the codes before the last fills the caches; the last code is the next input.

    Only the last receptive field of codes is run: a cached input of layer l (one of its last
    d_l) depends on the d_1 + ... + d_l codes before it, at most receptive field - 1, so the
    codes before `first` change nothing (tested against the full network); memory and time do
    not grow with a long prime."""
    codes = np.asarray(codes, np.int64)
    config = model.config
    batch, n = codes.shape
    state = silence(batch, config.dilations, config.residual_channels,
                    config.quantization_channels)
    if n > 1:
        first = max(0, n - config.receptive_field)
        inputs: list = []
        model(codes[:, first:-1], condition=None if condition_ids is None
              else np.asarray(condition_ids, np.int32), causal=True, layer_inputs=inputs)
        for h, d, offset in zip(inputs, config.dilations, ring_offsets(config.dilations)):
            h = h.numpy()
            for k in range(max(first, n - 1 - d), n - 1):  # the last d inputs, by slot
                state.caches[:, offset + k % d] = h[:, k - first]
    previous = codes[:, -2] if n > 1 else np.full(batch, -1, np.int64)
    return SongsState(state.caches, n - 1, codes[:, -1].copy(), previous.copy())


class PackedWeights(NamedTuple):
    """The model's weights for the compiled loop. Channel counts are padded to whole panels
    (C -> Cp and so on) with zeros, so padded channels stay exactly 0 and change nothing."""

    embedding: np.ndarray  # (Q, Cp)
    embedding_previous: np.ndarray  # (Q, Cp): the code before's; zeros for input kernel 1
    conv: np.ndarray  # (layers, 2Dp / 16, 2Cp, 16): [filter | gate] from [past | now]
    residual: np.ndarray  # (layers - 1 or 1, Cp / 16, Dp, 16)
    residual_bias: np.ndarray  # (layers - 1 or 1, Cp)
    skip: np.ndarray  # (Sp / 16, layers * Dp, 16)
    skip_bias: np.ndarray  # (Sp,)
    head1: np.ndarray  # (Sp / 16, Sp, 16)
    head1_bias: np.ndarray  # (Sp,)
    head2: np.ndarray  # (Qp / 16, Sp, 16)
    head2_bias: np.ndarray  # (Qp,)


def pack_weights(weights) -> PackedWeights:
    """A model's ExportedWeights (dwave.model.weights), padded and packed for this kernel (conv
    biases are left out: they go into each song's gate bias, see gate_biases)."""
    C, D = weights.embedding.shape[1], weights.conv.shape[2] // 2
    S, Q = weights.skip.shape[1], weights.head2.shape[1]
    # A one-layer model has no residual: one zero layer keeps the arrays' shapes uniform.
    residual = weights.residual if len(weights.residual) else np.zeros((1, D, C), np.float32)
    residual_bias = (weights.residual_bias if len(weights.residual_bias)
                     else np.zeros((1, C), np.float32))
    return PackedWeights(
        embedding=pad_blocks(weights.embedding, None, C),
        embedding_previous=pad_blocks(
            np.zeros_like(weights.embedding) if weights.embedding_previous is None
            else weights.embedding_previous, None, C),
        conv=np.stack([pack(pad_blocks(w, C, D)) for w in weights.conv]),
        residual=np.stack([pack(pad_blocks(w, D, C)) for w in residual]),
        residual_bias=pad_blocks(residual_bias, None, C),
        skip=pack(pad_blocks(weights.skip, D, S)),
        skip_bias=pad_blocks(weights.skip_bias[None], None, S)[0],
        head1=pack(pad_blocks(weights.head1, S, S)),
        head1_bias=pad_blocks(weights.head1_bias[None], None, S)[0],
        head2=pack(pad_blocks(weights.head2, S, Q)),
        head2_bias=pad_blocks(weights.head2_bias[None], None, Q)[0],
    )


def gate_biases(weights, condition_ids, batch: int) -> np.ndarray:
    """(batch, layers, 2Dp): each layer's conv bias plus the song's condition bias, padded like
    the conv outputs ([filter | gate], D -> Dp each)."""
    layers, D = weights.conv_bias.shape[0], weights.conv_bias.shape[1] // 2
    extra = 0
    if weights.condition is not None:
        if condition_ids is None:
            raise DwaveError("this model is conditioned: pass a condition for every song")
        extra = weights.condition[np.asarray(condition_ids)].reshape(batch, layers, 2 * D)
    total = np.broadcast_to(weights.conv_bias + extra, (batch, layers, 2 * D))
    return pad_blocks(total.reshape(batch * layers, 2 * D), None, D).reshape(batch, layers, -1)


def inverse_temperature(temperature: float) -> np.float32:
    """1 / temperature for the step loop, where 0 means "the most likely code". A temperature so
    small that its inverse overflows float32 (1e-40, say) is that limit too: sampling from
    logits times inf would give NaN probabilities and a constant full-scale signal."""
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if temperature == 0:
        return np.float32(0.0)
    with np.errstate(over="ignore"):
        inverse = np.float32(1.0 / temperature)
    return inverse if np.isfinite(inverse) else np.float32(0.0)


class FastGenerator:
    """Cached generation for a batch of songs with one model.

    `threads` (default: the usable cores) run side by side; the compiled loop releases the
    GIL. The songs are split into lanes of at least ROWS songs (one row tile), one thread
    each; threads left over (a batch smaller than ROWS x threads, one song at the least) share
    a lane's products by columns and meet at spin barriers (see _run). A song's numbers do not
    depend on its lane or on the number of threads: every output element is the same FMA
    chain either way.

    State (a SongsState in and out: `restore`, `state`): caches[lane][thread] (slots, songs,
    Cp), slot offsets[l] + t mod d holding layer l's input from step t - d; the step counter t
    (position of the next input); each song's next input code and the code before it.
    """

    def __init__(self, weights, dilations, batch: int, condition_ids=None,
                 threads: int | None = None, cores: int | None = None):
        self.batch = batch
        self.condition_ids = (None if condition_ids is None
                              else np.asarray(condition_ids, np.int32))
        self.two_codes = weights.embedding_previous is not None  # input kernel 2
        self.channels = weights.embedding.shape[1]
        self.quantization_channels = weights.embedding.shape[0]
        self.weights = pack_weights(weights)
        self.gate_bias = gate_biases(weights, self.condition_ids, batch)
        self.dilations = np.array(dilations, np.int64)
        self.offsets = ring_offsets(self.dilations)
        # `cores`: the cores this generator may keep busy, the rank's share of its node
        # (dwave.cores.cores_per_rank); default: all this process may run on.
        cores = usable_cores() if cores is None else max(1, cores)
        threads = cores if threads is None else threads
        lanes = max(1, min(threads, batch // ROWS))
        # Threads that share a lane spin while they wait for each other: one core each.
        self.threads_per_lane = max(1, min(threads, cores) // lanes)
        bounds = np.linspace(0, batch, lanes + 1).round().astype(int)
        self.lanes = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        self.restore(silence(batch, self.dilations, self.channels, self.quantization_channels))

    @classmethod
    def for_model(cls, model, batch: int, condition_ids=None, threads: int | None = None,
                  cores: int | None = None) -> "FastGenerator":
        return cls(model.export(), model.config.dilations, batch, condition_ids, threads, cores)

    def _work(self, songs: int) -> tuple:
        """A lane's activation buffers (see _run), widths padded like the weights."""
        w = self.weights
        C, layers = w.embedding.shape[1], len(self.dilations)
        D = self.gate_bias.shape[2] // 2
        widths = (2 * C, 2 * D, layers * D, w.skip_bias.shape[0], w.head1_bias.shape[0],
                  w.head2_bias.shape[0])
        return tuple(np.zeros((songs, width), np.float32) for width in widths)

    def restore(self, state: SongsState) -> None:
        """Continue from `state` (silence, a prime, a checkpoint)."""
        if state.caches.shape != (self.batch, int(self.dilations.sum()), self.channels):
            raise ValueError(f"a state of shape {state.caches.shape} for {self.batch} songs of "
                             f"{int(self.dilations.sum())} slots x {self.channels} channels")
        width = padded(self.channels)
        # caches[lane][part]: each of a lane's threads keeps its own copy (see _run), songs in
        # the middle axis, channels padded with zeros.
        self.caches = []
        for lane in self.lanes:
            cache = np.zeros((state.caches.shape[1], lane.stop - lane.start, width), np.float32)
            cache[:, :, :self.channels] = state.caches[lane].transpose(1, 0, 2)
            self.caches.append([cache] + [cache.copy()
                                          for _ in range(self.threads_per_lane - 1)])
        self.t = int(state.t)
        self.next_code = np.array(state.next_code, np.int64)
        self.previous_code = np.array(state.previous_code, np.int64)

    def state(self) -> SongsState:
        """Where every song is now (a copy)."""
        caches = np.concatenate([copies[0][:, :, :self.channels] for copies in self.caches],
                                axis=1)
        return SongsState(np.ascontiguousarray(caches.transpose(1, 0, 2)), self.t,
                          self.next_code.copy(), self.previous_code.copy())

    def generate(self, uniforms: np.ndarray, temperature: float,
                 forced: np.ndarray | None = None, keep_logits: bool = False):
        """Advance every song by len(uniforms) samples. Returns the codes (steps, batch), and
        with `keep_logits` also every step's logits (steps, batch, Q).

        `forced` (steps, batch) >= 0 replaces the sampled code (teacher forcing, for tests)."""
        uniforms = np.asarray(uniforms, np.float32)
        steps = uniforms.shape[0]
        forced = (np.full(uniforms.shape, -1, np.int64) if forced is None else
                  np.asarray(forced, np.int64))
        q = self.quantization_channels
        codes = np.empty((steps, self.batch), np.int64)
        logits = np.empty((steps if keep_logits else 1, self.batch, q), np.float32)
        inv_t = inverse_temperature(temperature)

        parts = self.threads_per_lane
        jobs, outputs = [], []
        for i, lane in enumerate(self.lanes):
            songs = lane.stop - lane.start
            lane_codes = np.empty((steps, songs), np.int64)
            lane_logits = np.empty((logits.shape[0], songs, q), np.float32)
            outputs.append((lane, lane_codes, lane_logits))
            shared = self._work(songs)
            arrivals = flags(parts)
            for me in range(parts):
                own_x = np.zeros_like(shared[0])
                jobs.append((self.weights, self.dilations, self.offsets, self.gate_bias[lane],
                             self.caches[i][me], self.t, self.next_code[lane],
                             self.previous_code[lane], self.two_codes,
                             np.ascontiguousarray(uniforms[:, lane]), inv_t,
                             np.ascontiguousarray(forced[:, lane]), lane_codes, lane_logits,
                             keep_logits, (own_x,) + shared[1:], me, parts, arrivals,
                             KERNEL == "tiled"))
        if len(jobs) == 1:
            _run(*jobs[0])
        else:
            # One thread per job, all started together: a lane's threads wait on each other.
            with ThreadPoolExecutor(len(jobs), "dwave-generate") as pool:
                for running in [pool.submit(_run, *job) for job in jobs]:
                    running.result()
        for lane, lane_codes, lane_logits in outputs:
            codes[:, lane] = lane_codes
            logits[:, lane] = lane_logits
        self.t += steps
        self.previous_code = codes[-2].copy() if steps > 1 else self.next_code
        self.next_code = codes[-1].copy()
        return (codes, logits) if keep_logits else codes


@numba.njit(inline="always")
def _share(panels, me, parts):
    """Thread `me` of `parts`'s share [lo, hi) of `panels` column panels."""
    return panels * me // parts, panels * (me + 1) // parts


@numba.njit(inline="always", fastmath=True, error_model="numpy")
def _dense(a, packed, bias, out, lo, hi, relu, tiled):
    """Column panels lo..hi-1 of out = a @ w + bias, then max(., 0) with `relu`."""
    matmul(a, packed[lo:hi], out[:, lo * WIDTH:hi * WIDTH], False, tiled)
    zero = np.float32(0.0)
    for b in range(out.shape[0]):
        for j in range(lo * WIDTH, hi * WIDTH):
            value = out[b, j] + bias[j]
            out[b, j] = max(value, zero) if relu else value


# error_model="numpy": no zero-division checks, whose branches stop the element loops from
# vectorising (the gate loop is several times faster without them).
@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _run(weights, dilations, offsets, gate_bias, caches, t0, first_code, first_previous,
         two_codes, uniforms, inv_t, forced, codes_out, logits_out, keep_logits, work, me,
         parts, arrivals, tiled):
    """Advance one lane, as thread `me` of the `parts` threads that share it.

    `first_previous`: each song's code before `first_code`, -1 for none; read, and kept up to
    date, only with `two_codes` (an input kernel of 2).
    `caches` (slots, songs, Cp): this thread's copy of the lane's rings, layer l's ring being
    slots offsets[l] .. offsets[l] + d - 1. `gate_bias` (songs, layers, 2Dp). `work`: the
    activations x (songs, 2Cp) = [past | now] (this thread's own) and fg, zs (songs, layers *
    Dp), skip, hidden, logits (shared by the lane's threads).

    The threads split the columns of the big products (conv, skip, head) and of the gate,
    and each computes the small residual product and the ring updates in full on its own
    copy: so a layer needs one barrier (dwave.generate.barrier), after the gate, and the head three.
    Every thread draws the same samples (same logits, same uniforms): no barrier for codes.
    `tiled`: which product kernel (dwave.generate.packed_product.KERNEL).
    """
    w = weights
    x, fg, zs, skip, hidden, logits = work  # x: this thread's; the rest shared
    B, C = caches.shape[1], caches.shape[2]  # songs, padded residual channels
    L, D = gate_bias.shape[1], gate_bias.shape[2] // 2  # layers, padded dilation channels
    Q = logits_out.shape[2]
    now = x[:, C:]  # the layer's input, updated in place by each residual
    d_lo, d_hi = _share(D // WIDTH, me, parts)
    s_lo, s_hi = _share(skip.shape[1] // WIDTH, me, parts)
    h_lo, h_hi = _share(hidden.shape[1] // WIDTH, me, parts)
    q_lo, q_hi = _share(logits.shape[1] // WIDTH, me, parts)
    code = first_code.copy()
    previous = first_previous.copy()
    half = np.float32(0.5)
    n = 0  # barriers passed
    for k in range(uniforms.shape[0]):
        t = t0 + k
        for layer in range(L):
            ring = caches[offsets[layer] + t % dilations[layer]]
            for b in range(B):
                before = previous[b] if two_codes else -1
                for j in range(C):
                    if layer == 0:
                        now[b, j] = w.embedding[code[b], j]
                        if before >= 0:
                            now[b, j] += w.embedding_previous[before, j]
                    x[b, j] = ring[b, j]
                    ring[b, j] = now[b, j]
            f_panels = w.conv[layer, d_lo:d_hi]
            g_panels = w.conv[layer, D // WIDTH + d_lo:D // WIDTH + d_hi]
            matmul(x, f_panels, fg[:, d_lo * WIDTH:d_hi * WIDTH], False, tiled)
            matmul(x, g_panels, fg[:, D + d_lo * WIDTH:D + d_hi * WIDTH], False, tiled)
            for b in range(B):
                for j in range(d_lo * WIDTH, d_hi * WIDTH):
                    f = fg[b, j] + gate_bias[b, layer, j]
                    g = fg[b, D + j] + gate_bias[b, layer, D + j]
                    zs[b, layer * D + j] = _tanh(f) * (half + half * _tanh(half * g))
            n += 1
            barrier(arrivals, me, parts, n)  # z complete
            if layer < L - 1:
                matmul(zs[:, layer * D:(layer + 1) * D], w.residual[layer], now, True,
                       tiled)
                for b in range(B):
                    for j in range(C):
                        now[b, j] += w.residual_bias[layer, j]
        _dense(zs, w.skip, w.skip_bias, skip, s_lo, s_hi, True, tiled)
        n += 1
        barrier(arrivals, me, parts, n)  # skip complete
        _dense(skip, w.head1, w.head1_bias, hidden, h_lo, h_hi, True, tiled)
        n += 1
        barrier(arrivals, me, parts, n)  # hidden complete
        _dense(hidden, w.head2, w.head2_bias, logits, q_lo, q_hi, False, tiled)
        n += 1
        barrier(arrivals, me, parts, n)  # logits complete
        if keep_logits and me == 0:
            logits_out[k] = logits[:, :Q]
        for b in range(B):
            if two_codes:
                previous[b] = code[b]
            if forced[k, b] >= 0:
                code[b] = forced[k, b]
            else:  # the output distribution's draw (dwave.model.output)
                code[b] = draw_code(logits[b], inv_t, uniforms[k, b], Q)
            if me == 0:
                codes_out[k, b] = code[b]


@numba.njit(cache=True, inline="always", fastmath=True, error_model="numpy")
def _tanh(x):
    """float32 tanh as a rational function (Eigen's ptanh coefficients): |error| < 4e-7, and
    plain arithmetic that vectorises, unlike a libm call per element."""
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
