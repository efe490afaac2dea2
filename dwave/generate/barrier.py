"""A spinning barrier for threads that share one song's step inside Numba-compiled code.

Numba has no atomics on the CPU, so two LLVM intrinsics provide them: a release store and an
acquire load of an int64. Each thread owns one cache line of a shared `flags` array (its
arrival count) and a barrier is: publish "I arrived at barrier n", then wait until every other
thread has published n too. No read-modify-write, no locks: cheap beside the ~33 barriers of a
generation step (benchmarks/bench_generate.py measures the step).

Spinning assumes one core per thread, which is how FastGenerator sizes its threads; but a
machine can be busier than planned (other ranks, other jobs). So a waiting thread spins with
the CPU's pause hint (x86 `pause`: less power, no memory-order flush when the flag changes) for
at most SPINS rounds, then sleeps in short naps (usleep) until its partners arrive: a
descheduled partner then costs its time slice once, not a core burnt for it.
"""

from __future__ import annotations

import platform

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

LINE = 8  # int64s per 64-byte cache line: one line per thread, so arrivals do not collide
SPINS = 20000  # pause rounds before a waiting thread starts to nap (~1-3 ms of spinning)
NAP_US = 50  # microseconds per nap after that
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


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


@intrinsic
def _pause(typingctx):
    """The spin-wait hint: x86 `pause`; nothing elsewhere."""

    def codegen(context, builder, signature, args):
        if _X86:
            module = builder.module
            fn = module.globals.get("llvm.x86.sse2.pause") or ir.Function(
                module, ir.FunctionType(ir.VoidType(), []), name="llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _nap(typingctx, microseconds):
    """libc usleep, declared in the LLVM module and resolved when the code is loaded (a ctypes
    pointer would be a "dynamic global" and stop Numba from caching the generator's loop)."""

    def codegen(context, builder, signature, args):
        module = builder.module
        i32 = ir.IntType(32)
        fn = module.globals.get("usleep") or ir.Function(
            module, ir.FunctionType(i32, [i32]), name="usleep")
        builder.call(fn, [builder.trunc(args[0], i32)])
        return context.get_dummy_value()

    return types.void(types.int64), codegen


@numba.njit(inline="always")
def barrier(arrivals, me, threads, n):
    """Barrier number `n` (1, 2, ... in the same order on every thread) for thread `me` of
    `threads`; returns at once for a single thread."""
    if threads == 1:
        return
    base = arrivals.ctypes.data
    _store_release(base + 8 * LINE * me, n)
    spins = 0
    for other in range(threads):
        while _load_acquire(base + 8 * LINE * other) < n:
            if spins < SPINS:
                _pause()
                spins += 1
            else:
                _nap(NAP_US)
