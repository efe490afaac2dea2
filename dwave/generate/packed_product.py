"""Small dense products for the fast generator: a register-tiled FMA kernel over pre-packed
weights, callable inside Numba-compiled loops.

A generation step is ~90 products of a (songs x K) activation matrix with a fixed (K x N)
weight matrix, K and N of 64 to 2,000. BLAS handles these poorly: it repacks the weights on
every call and its small-matrix paths fall far short of the core's peak. Here the weights are
packed once, in panels of 16 columns stored k-major (`pack`), and a kernel keeps a tile of up
to 4 rows x 16 columns in eight 8-float registers while it runs down K: two vector loads and
four broadcasts feed eight fused multiply-adds per k (fewer rows: more panels at once, still
eight independent chains). benchmarks/bench_generate.py measures the products of one step of
the base model for 32 songs on one core against BLAS's (benchmarks/results has the figures).

Every output element is one float32 FMA chain over k in order, whatever the number of rows or
where a row sits in the batch: a song's numbers do not depend on its batch.

The kernel is LLVM IR written through Numba's `intrinsic`: `<8 x float>` loads and
`llvm.fma.v8f32`, which LLVM lowers to AVX2/FMA on x86-64 with FMA and to NEON on ARM; Numba
compiles for the CPU it runs on. On an x86-64 without FMA (QEMU's default CPU model, old Xeons,
NUMBA_CPU_NAME=generic) the same intrinsic becomes a libm call per element, so there the
products run as plain compiled loops over the same packed weights instead (`_matmul_loops`,
which LLVM vectorises with separate multiplies and adds). `KERNEL` says which to use;
DWAVE_PRODUCT_KERNEL=tiled|loops overrides the choice (tests use it to run the loop path).
Both keep one chain per output element in k order, so a song never depends on its batch.
"""

from __future__ import annotations

import os
import platform

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

WIDTH = 16  # columns per panel: two 8-float vectors
ROWS = 4  # rows per tile: 8 accumulators + 2 weight vectors + 1 broadcast fit in 16 registers


def fused_multiply_add_available() -> bool:
    """Whether the code Numba generates here has hardware FMA: on x86-64, per the CPU features
    Numba targets (NUMBA_CPU_FEATURES / NUMBA_CPU_NAME, else the host's, from llvmlite);
    AArch64 always has it."""
    from numba.core import config

    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if config.CPU_FEATURES:
        return "+fma" in config.CPU_FEATURES.split(",")
    if config.CPU_NAME and config.CPU_NAME != "host":
        return False  # a named generic target: no FMA promised
    import llvmlite.binding as llvm

    return bool(llvm.get_host_cpu_features().get("fma", False))


def _choose_kernel() -> str:
    wanted = os.environ.get("DWAVE_PRODUCT_KERNEL", "").strip().lower()
    if wanted in ("tiled", "loops"):
        return wanted
    return "tiled" if fused_multiply_add_available() else "loops"


# Passed to matmul as an argument, not read as a global: Numba's on-disk cache does not key on
# globals, and a cached loop built for one choice must not serve the other.
KERNEL = _choose_kernel()


def padded(n: int) -> int:
    """n rounded up to whole panels."""
    return -(-n // WIDTH) * WIDTH


def pad_blocks(w, rows: int | None, cols: int | None) -> np.ndarray:
    """`w` seen as a grid of (rows x cols) blocks, each block zero-padded to
    padded(rows) x padded(cols); None leaves that axis as it is. Zero weights in the padding
    keep every product exact in the real rows and columns."""
    w = np.asarray(w, np.float32)
    rows_to = padded(rows) if rows else w.shape[0]
    cols_to = padded(cols) if cols else w.shape[1]
    rows, cols = rows or w.shape[0], cols or w.shape[1]
    grid_r, grid_c = w.shape[0] // rows, w.shape[1] // cols
    out = np.zeros((grid_r, rows_to, grid_c, cols_to), np.float32)
    out[:, :rows, :, :cols] = w.reshape(grid_r, rows, grid_c, cols)
    return out.reshape(grid_r * rows_to, grid_c * cols_to)


def pack(w: np.ndarray) -> np.ndarray:
    """(K, N) -> (N / WIDTH, K, WIDTH): panel p holds columns p*WIDTH.., row by row, so the
    kernel reads one panel front to back. N must be a multiple of WIDTH (see pad_blocks)."""
    k, n = w.shape
    assert n % WIDTH == 0, n
    return np.ascontiguousarray(np.asarray(w, np.float32).reshape(k, n // WIDTH, WIDTH)
                                .transpose(1, 0, 2))


def _tile_kernel(rows: int, panels: int):
    """An intrinsic computing c[r, 0:16 * panels] (+)= sum_k a[r, k] * w[k, 0:16 * panels] for
    r < rows, with 2 * rows * panels vector accumulators. Arguments: a (address), lda, w
    (address of the first packed panel), panel_stride, K >= 1, c (address), ldc, accumulate.
    Addresses are integers (array.ctypes.data + byte offset); strides count floats."""

    @intrinsic
    def tile(typingctx, a_addr, lda, w_addr, panel_stride, k_count, c_addr, ldc, accumulate):
        sig = types.void(types.uintp, types.intp, types.uintp, types.intp, types.intp,
                         types.uintp, types.intp, types.boolean)

        def codegen(context, builder, signature, args):
            a_i, lda_v, w_i, panel_stride_v, k_v, c_i, ldc_v, accumulate_v = args
            f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
            vec = ir.VectorType(f32, 8)
            vec_ptr = vec.as_pointer()
            module = builder.module
            fma = module.globals.get("llvm.fma.v8f32") or ir.Function(
                module, ir.FunctionType(vec, [vec, vec, vec]), name="llvm.fma.v8f32")
            a = builder.inttoptr(a_i, f32.as_pointer())
            w = builder.inttoptr(w_i, f32.as_pointer())
            c = builder.inttoptr(c_i, f32.as_pointer())
            const = lambda v: ir.Constant(i64, v)  # noqa: E731
            zero = ir.Constant(vec, [0.0] * 8)
            broadcast_mask = ir.Constant(ir.VectorType(i32, 8), [0] * 8)

            entry = builder.block
            loop = builder.append_basic_block("tile.k")
            done = builder.append_basic_block("tile.done")
            builder.branch(loop)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            vectors = 2 * panels  # per row
            acc = [builder.phi(vec) for _ in range(rows * vectors)]
            k.add_incoming(const(0), entry)
            for phi in acc:
                phi.add_incoming(zero, entry)
            w_row = []  # row k of each panel, 8 floats at a time
            for panel in range(panels):
                start = builder.add(builder.mul(const(panel), panel_stride_v),
                                    builder.mul(k, const(WIDTH)))
                for half in range(2):
                    where = builder.gep(w, [builder.add(start, const(8 * half))])
                    w_row.append(builder.load(builder.bitcast(where, vec_ptr), align=4))
            summed = []
            for r in range(rows):
                a_rk = builder.load(builder.gep(a, [builder.add(builder.mul(const(r), lda_v), k)]))
                one = builder.insert_element(ir.Constant(vec, ir.Undefined), a_rk,
                                             ir.Constant(i32, 0))
                splat = builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined),
                                               broadcast_mask)
                for v in range(vectors):
                    summed.append(builder.call(fma, [splat, w_row[v], acc[r * vectors + v]]))
            k_next = builder.add(k, const(1))
            k.add_incoming(k_next, builder.block)
            for phi, value in zip(acc, summed):
                phi.add_incoming(value, builder.block)
            builder.cbranch(builder.icmp_signed("<", k_next, k_v), loop, done)

            builder.position_at_end(done)
            for r in range(rows):
                for v in range(vectors):
                    where = builder.gep(c, [builder.add(builder.mul(const(r), ldc_v),
                                                        const(8 * v))])
                    where = builder.bitcast(where, vec_ptr)
                    value = summed[r * vectors + v]
                    with builder.if_else(accumulate_v) as (then, otherwise):
                        with then:
                            builder.store(builder.fadd(builder.load(where, align=4), value),
                                          where, align=4)
                        with otherwise:
                            builder.store(value, where, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


# (rows, panels) shapes: 8 accumulators each where the rows allow, so that even one row keeps
# eight independent FMA chains in flight (one chain would wait on each FMA's latency).
_tile4x1 = _tile_kernel(4, 1)
_tile3x1 = _tile_kernel(3, 1)
_tile2x2, _tile2x1 = _tile_kernel(2, 2), _tile_kernel(2, 1)
_tile1x4, _tile1x1 = _tile_kernel(1, 4), _tile_kernel(1, 1)


@numba.njit(inline="always")
def matmul(a, packed, out, accumulate, tiled=True):
    """out (+)= a @ w, with packed = pack(w) of shape (N / WIDTH, K, WIDTH); `a` (M, >= K) and
    `out` (M, >= N) are float32 views with unit column stride (any row stride). The shapes and
    strides are checked before any raw address is touched. `tiled`: the FMA kernel, else the
    plain loops (pass `KERNEL == "tiled"`)."""
    rows, panels, k_count = a.shape[0], packed.shape[0], packed.shape[1]
    if (out.shape[0] != rows or a.shape[1] < k_count or out.shape[1] < panels * WIDTH
            or k_count < 1 or packed.shape[2] != WIDTH):
        raise ValueError("matmul: shapes do not fit (a (M, >= K), packed (P, K, 16), "
                         "out (M, >= 16 P))")
    if a.strides[1] != 4 or out.strides[1] != 4 or packed.strides[2] != 4 \
            or packed.strides[1] != 4 * WIDTH:
        raise ValueError("matmul: a, out and the packed weights need unit column stride")
    if not tiled:
        _matmul_loops(a, packed, out, accumulate)
        return
    lda, ldc, stride = a.strides[0] // 4, out.strides[0] // 4, packed.strides[0] // 4
    a0, c0, w0 = a.ctypes.data, out.ctypes.data, packed.ctypes.data
    tail = rows % ROWS
    for p in range(panels):
        w, c = w0 + 4 * p * stride, c0 + 4 * p * WIDTH
        for r in range(0, rows - tail, ROWS):
            _tile4x1(a0 + 4 * r * lda, lda, w, stride, k_count, c + 4 * r * ldc, ldc, accumulate)
    r = rows - tail
    a_tail, c_tail = a0 + 4 * r * lda, c0 + 4 * r * ldc
    if tail == 3:
        for p in range(panels):
            _tile3x1(a_tail, lda, w0 + 4 * p * stride, stride, k_count, c_tail + 4 * p * WIDTH,
                     ldc, accumulate)
    elif tail == 2:
        for p in range(0, panels - 1, 2):
            _tile2x2(a_tail, lda, w0 + 4 * p * stride, stride, k_count, c_tail + 4 * p * WIDTH,
                     ldc, accumulate)
        if panels % 2:
            p = panels - 1
            _tile2x1(a_tail, lda, w0 + 4 * p * stride, stride, k_count, c_tail + 4 * p * WIDTH,
                     ldc, accumulate)
    elif tail == 1:
        for p in range(0, panels - 3, 4):
            _tile1x4(a_tail, lda, w0 + 4 * p * stride, stride, k_count, c_tail + 4 * p * WIDTH,
                     ldc, accumulate)
        for p in range(panels - panels % 4, panels):
            _tile1x1(a_tail, lda, w0 + 4 * p * stride, stride, k_count, c_tail + 4 * p * WIDTH,
                     ldc, accumulate)


@numba.njit(inline="always")
def _matmul_loops(a, packed, out, accumulate):
    """The same product as plain loops (see the module docstring): for CPUs without FMA."""
    rows, panels, k_count = a.shape[0], packed.shape[0], packed.shape[1]
    acc = np.empty(WIDTH, np.float32)
    for r in range(rows):
        for p in range(panels):
            acc[:] = 0.0
            for k in range(k_count):
                x = a[r, k]
                for j in range(WIDTH):
                    acc[j] += x * packed[p, k, j]
            for j in range(WIDTH):
                if accumulate:
                    out[r, p * WIDTH + j] += acc[j]
                else:
                    out[r, p * WIDTH + j] = acc[j]
