"""The CUDA engine: cached WaveNet sampling on a GPU through Numba, thousands of songs at once.

The same arithmetic as dwave.generate.cpu_engine's loop (ExportedWeights' contract: ring-buffer
caches, [filter | gate] from [past | now], the gate as tanh(f) * sigmoid(g) with the same
rational tanh, inverse-CDF sampling in float64 from each song's own uniforms), laid out for a
GPU: each thread block owns SONGS_PER_BLOCK songs and runs a whole chunk of steps for them
without returning to the host (songs never interact, so blocks never wait for each other);
its threads split each product's output columns, every weight read once per step for all of
the block's songs, the activations in shared memory, the caches in global memory as (slots,
songs, channels) so that a block's reads of a slot are contiguous.

A song's codes equal the CPU engine's as long as their logits round alike: products are
summed in another order, so a logit can differ in its last bits, and a draw whose uniform
falls within that of a boundary of the CDF picks the neighbouring code (after which the song
goes its own way). tests/test_cuda_generator.py measures the agreement in Numba's CUDA
simulator (NUMBA_ENABLE_CUDASIM=1), which runs these kernels on the CPU, thread by thread.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import cuda, float32, float64, int64

from .cpu_engine import SongsState, inverse_temperature, ring_offsets

SONGS_PER_BLOCK = 8  # each weight read serves this many songs
THREADS_PER_BLOCK = 128


class CudaGenerator:
    """The CPU engine's interface (restore, state, generate) on the current CUDA device."""

    def __init__(self, weights, dilations, batch: int, condition_ids=None,
                 songs_per_block: int = SONGS_PER_BLOCK,
                 threads_per_block: int = THREADS_PER_BLOCK):
        self.batch = batch
        self.dilations = np.asarray(dilations, np.int64)
        self.slots = int(self.dilations.sum())
        self.channels = weights.embedding.shape[1]
        self.quantization_channels = weights.embedding.shape[0]
        self.two_codes = weights.embedding_previous is not None
        self.songs_per_block, self.threads_per_block = songs_per_block, threads_per_block
        C, L = self.channels, len(self.dilations)
        D, S = weights.conv.shape[2] // 2, weights.skip.shape[1]
        self.kernel = _kernel(songs_per_block, C, D, S, self.quantization_channels, L,
                              self.two_codes)
        # A one-layer model has no residual: one zero layer keeps the arguments uniform.
        residual = weights.residual if len(weights.residual) else np.zeros((1, D, C))
        residual_bias = (weights.residual_bias if len(weights.residual_bias)
                         else np.zeros((1, C)))
        previous = (weights.embedding_previous if self.two_codes
                    else np.zeros_like(weights.embedding))
        gate_bias = np.broadcast_to(weights.conv_bias, (batch, L, 2 * D))
        if weights.condition is not None:
            if condition_ids is None:
                from ..errors import DwaveError

                raise DwaveError("this model is conditioned: pass a condition for every song")
            gate_bias = gate_bias + weights.condition[np.asarray(condition_ids)].reshape(
                batch, L, 2 * D)
        host = (weights.embedding, previous, weights.conv, gate_bias, residual, residual_bias,
                weights.skip, weights.skip_bias, weights.head1, weights.head1_bias,
                weights.head2, weights.head2_bias)
        self.weights = tuple(cuda.to_device(np.ascontiguousarray(a, np.float32)) for a in host)
        self.rings = (cuda.to_device(self.dilations), cuda.to_device(ring_offsets(dilations)))
        from .cpu_engine import silence

        self.restore(silence(batch, self.dilations, C, self.quantization_channels))

    def restore(self, state: SongsState) -> None:
        if state.caches.shape != (self.batch, self.slots, self.channels):
            raise ValueError(f"a state of shape {state.caches.shape} for {self.batch} songs of "
                             f"{self.slots} slots x {self.channels} channels")
        self.caches = cuda.to_device(np.ascontiguousarray(
            np.asarray(state.caches, np.float32).transpose(1, 0, 2)))
        self.t = int(state.t)
        self.next_code = cuda.to_device(np.array(state.next_code, np.int64))
        self.previous_code = cuda.to_device(np.array(state.previous_code, np.int64))

    def state(self) -> SongsState:
        caches = self.caches.copy_to_host().transpose(1, 0, 2)
        return SongsState(np.ascontiguousarray(caches), self.t, self.next_code.copy_to_host(),
                          self.previous_code.copy_to_host())

    def generate(self, uniforms: np.ndarray, temperature: float,
                 forced: np.ndarray | None = None, keep_logits: bool = False):
        """As FastGenerator.generate: codes (steps, batch), and the logits with keep_logits."""
        uniforms = np.ascontiguousarray(uniforms, np.float32)
        steps = uniforms.shape[0]
        forced = (np.full(uniforms.shape, -1, np.int64) if forced is None
                  else np.ascontiguousarray(forced, np.int64))
        codes = cuda.device_array((steps, self.batch), np.int64)
        logits = cuda.device_array((steps if keep_logits else 1, self.batch,
                                    self.quantization_channels), np.float32)
        blocks = math.ceil(self.batch / self.songs_per_block)
        self.kernel[blocks, self.threads_per_block](
            *self.weights, *self.rings, self.caches, self.t, self.next_code,
            self.previous_code, cuda.to_device(uniforms),
            inverse_temperature(temperature), cuda.to_device(forced), codes, logits,
            keep_logits)
        self.t += steps
        codes = codes.copy_to_host()
        return (codes, logits.copy_to_host()) if keep_logits else codes


@functools.lru_cache(maxsize=None)
def _kernel(SB: int, C: int, D: int, S: int, Q: int, L: int, two_codes: bool):
    """The chunk kernel for these sizes (shared arrays need them at compile time)."""

    @cuda.jit(device=True, inline=True)
    def tanh(x):
        # dwave.generate.cpu_engine._tanh: the same rational function, so both engines agree to
        # the rounding of their sums.
        limit = float32(7.90531110763549805)
        x = min(max(x, -limit), limit)
        x2 = x * x
        p = float32(-2.76076847742355e-16)
        p = p * x2 + float32(2.00018790482477e-13)
        p = p * x2 + float32(-8.60467152213735e-11)
        p = p * x2 + float32(5.12229709037114e-08)
        p = p * x2 + float32(1.48572235717979e-05)
        p = p * x2 + float32(6.37261928875436e-04)
        p = p * x2 + float32(4.89352455891786e-03)
        q = float32(1.19825839466702e-06)
        q = q * x2 + float32(1.18534705686654e-04)
        q = q * x2 + float32(2.26843463243900e-03)
        q = q * x2 + float32(4.89352518554385e-03)
        return x * p / q

    @cuda.jit(device=True, inline=True)
    def dense(inputs, weights, bias, outputs, relu, tid, threads, acc):
        """This thread's columns of outputs = inputs @ weights + bias (then max(., 0) with
        `relu`), for the block's SB songs: each weight read once for all of them."""
        for o in range(tid, outputs.shape[1], threads):
            for s in range(SB):
                acc[s] = bias[o]
            for i in range(inputs.shape[1]):
                w = weights[i, o]
                for s in range(SB):
                    acc[s] += inputs[s, i] * w
            for s in range(SB):
                outputs[s, o] = max(acc[s], float32(0.0)) if relu else acc[s]

    @cuda.jit
    def chunk(embedding, embedding_previous, conv, gate_bias, residual, residual_bias, skip_w,
              skip_b, head1, head1_b, head2, head2_b, dilations, offsets, caches, t0,
              next_code, previous_code, uniforms, inv_t, forced, codes_out, logits_out,
              keep_logits):
        tid, threads = cuda.threadIdx.x, cuda.blockDim.x
        first = cuda.blockIdx.x * SB
        batch = caches.shape[1]
        now = cuda.shared.array((SB, C), float32)
        past = cuda.shared.array((SB, C), float32)
        z = cuda.shared.array((SB, D), float32)
        skip = cuda.shared.array((SB, S), float32)
        hidden = cuda.shared.array((SB, S), float32)
        logits = cuda.shared.array((SB, Q), float32)
        code = cuda.shared.array(SB, int64)
        previous = cuda.shared.array(SB, int64)
        acc_f = cuda.local.array(SB, float32)
        acc_g = cuda.local.array(SB, float32)
        half = float32(0.5)
        if tid < SB and first + tid < batch:
            code[tid] = next_code[first + tid]
            previous[tid] = previous_code[first + tid]
        cuda.syncthreads()
        for k in range(uniforms.shape[0]):
            t = t0 + k
            for i in range(tid, SB * C, threads):  # the input: this code (and the one before)
                s, j = i // C, i % C
                value = float32(0.0)
                if first + s < batch:
                    value = embedding[code[s], j]
                    if two_codes and previous[s] >= 0:
                        value += embedding_previous[previous[s], j]
                now[s, j] = value
            for i in range(tid, SB * S, threads):
                skip[i // S, i % S] = float32(0.0)
            cuda.syncthreads()
            for layer in range(L):
                slot = offsets[layer] + t % dilations[layer]
                for i in range(tid, SB * C, threads):  # the ring: read t - d, write t
                    s, j = i // C, i % C
                    if first + s < batch:
                        past[s, j] = caches[slot, first + s, j]
                        caches[slot, first + s, j] = now[s, j]
                    else:
                        past[s, j] = float32(0.0)
                cuda.syncthreads()
                for o in range(tid, D, threads):  # [filter | gate] column o, then z
                    for s in range(SB):
                        acc_f[s] = float32(0.0)
                        acc_g[s] = float32(0.0)
                    for i in range(C):
                        f_past, g_past = conv[layer, i, o], conv[layer, i, D + o]
                        f_now, g_now = conv[layer, C + i, o], conv[layer, C + i, D + o]
                        for s in range(SB):
                            acc_f[s] += past[s, i] * f_past + now[s, i] * f_now
                            acc_g[s] += past[s, i] * g_past + now[s, i] * g_now
                    for s in range(SB):
                        song = min(first + s, batch - 1)
                        f = acc_f[s] + gate_bias[song, layer, o]
                        g = acc_g[s] + gate_bias[song, layer, D + o]
                        z[s, o] = tanh(f) * (half + half * tanh(half * g))
                cuda.syncthreads()
                for o in range(tid, S, threads):  # this layer's share of the skip sum
                    for s in range(SB):
                        acc_f[s] = float32(0.0)
                    for d in range(D):
                        w = skip_w[layer * D + d, o]
                        for s in range(SB):
                            acc_f[s] += z[s, d] * w
                    for s in range(SB):
                        skip[s, o] += acc_f[s]
                if layer < L - 1:
                    for c in range(tid, C, threads):  # the residual: the next layer's input
                        for s in range(SB):
                            acc_f[s] = residual_bias[layer, c]
                        for d in range(D):
                            w = residual[layer, d, c]
                            for s in range(SB):
                                acc_f[s] += z[s, d] * w
                        for s in range(SB):
                            now[s, c] += acc_f[s]
                cuda.syncthreads()
            for i in range(tid, SB * S, threads):
                s, o = i // S, i % S
                skip[s, o] = max(skip[s, o] + skip_b[o], float32(0.0))
            cuda.syncthreads()
            dense(skip, head1, head1_b, hidden, True, tid, threads, acc_f)
            cuda.syncthreads()
            dense(hidden, head2, head2_b, logits, False, tid, threads, acc_f)
            cuda.syncthreads()
            if tid < SB and first + tid < batch:  # one thread per song draws its code
                s, song = tid, first + tid
                if keep_logits:
                    for o in range(Q):
                        logits_out[k, song, o] = logits[s, o]
                previous[s] = code[s]
                if forced[k, song] >= 0:
                    code[s] = forced[k, song]
                elif inv_t == 0.0:
                    best = 0
                    for o in range(1, Q):
                        if logits[s, o] > logits[s, best]:
                            best = o
                    code[s] = best
                else:  # as dwave.model.output.draw_code
                    top = logits[s, 0]
                    for o in range(1, Q):
                        top = max(top, logits[s, o])
                    top = top * inv_t
                    total = float64(0.0)
                    for o in range(Q):
                        total += math.exp(logits[s, o] * inv_t - top)
                    target = uniforms[k, song] * total
                    running = float64(0.0)
                    chosen = Q - 1
                    for o in range(Q):
                        running += math.exp(logits[s, o] * inv_t - top)
                        if running > target:
                            chosen = o
                            break
                    code[s] = chosen
                codes_out[k, song] = code[s]
            cuda.syncthreads()
        if tid < SB and first + tid < batch:
            next_code[first + tid] = code[tid]
            previous_code[first + tid] = previous[tid]

    return chunk
