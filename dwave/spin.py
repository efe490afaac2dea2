"""A spinning barrier for threads that share one song's step inside Numba-compiled code.

Numba has no atomics on the CPU, so two LLVM intrinsics provide them: a release store and an
acquire load of an int64. Each thread owns one cache line of a shared `flags` array (its
arrival count) and a barrier is: publish "I arrived at barrier n", then wait until every other
thread has published n too. No read-modify-write, no locks: 40-90 ns between the two cores
here, cheap beside the ~33 barriers of a generation step. Spinning assumes one core per
thread, which is how FastGenerator sizes its threads.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

LINE = 8  # int64s per 64-byte cache line: one line per thread, so arrivals do not collide


def flags(threads: int) -> np.ndarray:
    """The shared arrival counts for `threads` threads, all at barrier 0."""
    return np.zeros(threads * LINE, np.int64)


@intrinsic
def _store_release(typingctx, address, value):
    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        builder.store_atomic(args[1], pointer, ordering="release", align=8)
        return context.get_dummy_value()

    return types.void(types.uintp, types.int64), codegen


@intrinsic
def _load_acquire(typingctx, address):
    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load_atomic(pointer, ordering="acquire", align=8)

    return types.int64(types.uintp), codegen


@numba.njit(inline="always")
def barrier(arrivals, me, threads, n):
    """Barrier number `n` (1, 2, ... in the same order on every thread) for thread `me` of
    `threads`; returns at once for a single thread."""
    if threads == 1:
        return
    base = arrivals.ctypes.data
    _store_release(base + 8 * LINE * me, n)
    for other in range(threads):
        while _load_acquire(base + 8 * LINE * other) < n:
            pass
