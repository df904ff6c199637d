"""The one matmul kernel: x [n_rows, in] @ weight [in, out] for every weight format and any row count.

A weight is laid out once, at load, in column panels: [n_panels, in, P], P = C * LANES outputs each
(zero-padded at the end), so that one panel is one contiguous stream and a thread reads its own run
of panels front to back (`panels`). For each panel and each tile of up to R rows, `_tile` keeps R x C
vector accumulators of LANES float32 outputs in registers across the whole reduction: it loads each
weight vector once, widens it once (float16: `fpext <L x half>`; bfloat16: a shift; int8: `sitofp`,
times the block's scale vector) and feeds it to all R rows with one FMA each. llamafile's tinyBLAS
(`gemm_bloc<RM, RN>`) is the same idea. The loop is written in LLVM IR rather than left to LLVM's loop
vectorizer, which vectorized each row on its own and sent the sums back to memory after every weight
row (issue 14); the same IR lowers to any vector width. On AVX-512 (`inspect_asm`) the 4-row loop is
16 `vfmadd231ps` on zmm registers, 4 `vbroadcastss` of x, and 4 weight loads, widened by
`vcvtph2ps` (float16), `vpmovzxwd` + `vpslld` (bfloat16) or `vpmovsxbd` + `vcvtdq2ps` + `vmulps` (int8).

It beat the alternatives measured for float32 (sgemm on each thread's band of the weight, OpenBLAS
held to one thread each: 1.4 to 2.4x slower at 1 to 16 rows, as BLAS packs its operands for large
products; a dot product per wte row for the lm_head: 2 to 3x slower at 8 and 16 rows) and so replaced
them. Figures, and how far it is from the machine's limits: `benchmarks/bench_kernels.py` and README,
"The kernels against the machine's limits".
"""

from typing import NamedTuple

import numpy as np
from llvmlite import binding, ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from .. import formats
from ..formats import BLOCK
from .ops import f32, gelu_one, jit

# Sized for the vector registers: R x C accumulators + C widened weights + 1 broadcast x fit, so nothing
# spills inside the loop. 4 x 4 of 16 lanes measured fastest of the shapes tried (README, bench_kernels);
# on AVX2's 16 ymm registers 4 x 4 would spill: there C = 2 (P = 16 outputs).
AVX512 = "+avx512f" in binding.get_host_cpu_features().flatten().split(",")
LANES = 16 if AVX512 else 8  # float32 lanes per vector register
C = 4 if AVX512 else 2  # vectors per panel row
R = 4  # rows per tile
P = C * LANES  # outputs per panel: 64 with AVX-512, which divides every GPT-2 width


class Linear(NamedTuple):
    """A linear layer laid out for the microkernel: weight panels, bias [out], and a GELU after it."""

    weight: object  # float32 [n_panels, in, P], or F16/BF16/Q8 with data [n_panels, in, P] (+ Q8 scales [n_panels, n_blocks, P])
    bias: np.ndarray  # float32 [out]: its length is the layer's width
    gelu: bool


def panels(w):
    """A [in, out] weight of any format (formats.py) in column panels of P outputs: [n_panels, in, P]."""
    n_in, n_out = formats.shape(w)
    n_panels = -(-n_out // P)

    def split(a):  # [rows, out] -> [n_panels, rows, P], zero-padded: one copy
        out = np.zeros((n_panels, a.shape[0], P), a.dtype)
        for p in range(n_panels):  # panel by panel: wte.T's columns are rows of wte, read in runs
            width = min(P, n_out - p * P)
            out[p, :, :width] = a[:, p * P : p * P + width]
        return out

    if isinstance(w, np.ndarray):
        return split(np.asarray(w, f32))
    return type(w)(*(split(a) for a in w))


def linear_of(weight, bias=None, gelu=False):
    n_in, n_out = formats.shape(weight)
    if n_in == 0:
        raise ValueError("a weight with no input rows")
    return Linear(panels(weight), np.zeros(n_out, f32) if bias is None else np.ascontiguousarray(bias, f32), gelu)


# ---- the tile, in LLVM IR ---------------------------------------------------------------------------


def _floats(v):
    """The float32 type of v's shape: a vector of as many lanes, or a scalar."""
    f = ir.FloatType()
    return ir.VectorType(f, v.type.count) if isinstance(v.type, ir.VectorType) else f


def _like(v, element):
    return ir.VectorType(element, v.type.count) if isinstance(v.type, ir.VectorType) else element


def _widen_f16(builder, v, scale):  # float16 bits -> float32: LLVM's fpext half -> float. Exact.
    return builder.fpext(builder.bitcast(v, _like(v, ir.HalfType())), _floats(v))


def _widen_bf16(builder, v, scale):  # bfloat16 bits -> the top half of a float32's. Exact.
    i32 = _like(v, ir.IntType(32))
    sixteen = ir.Constant(i32, [16] * v.type.count) if isinstance(i32, ir.VectorType) else ir.Constant(i32, 16)
    return builder.bitcast(builder.shl(builder.zext(v, i32), sixteen), _floats(v))


def _widen_q8(builder, v, scale):  # int8 -> float32, times its block's scale
    return builder.fmul(builder.sitofp(v, _floats(v)), scale)


# How each weight format (formats.FORMATS, by name) becomes float32 in registers: the format's row of
# the microkernel, as its pack and dequantize are its rows in formats.py. v: its data, as stored (float32,
# or integer bits), one value or a vector; scale: the matching int8 scales (None for the others).
WIDEN = {
    "float32": lambda builder, v, scale: v,
    "float16": _widen_f16,
    "bfloat16": _widen_bf16,
    "int8": _widen_q8,
}


def _kind(w):
    """The weight format of a Numba type: float32 arrays and formats.py's named tuples."""
    return "float32" if isinstance(w, types.Array) else formats.DTYPE_OF[w.instance_class]


@intrinsic
def _tile(typingctx, x, r0, n, w, p, tile):
    """tile[:n, :P] = x[r0 : r0 + n] @ panel p of w, for 1 <= n <= R: one loop over `in` (>= 1) per n.
    The addresses are computed for C-contiguous arrays, so other layouts are refused when compiling."""
    kind = _kind(w)
    arrays = [x, tile, w] if kind == "float32" else [x, tile, *w.types]
    if any(a.layout != "C" for a in arrays) or x.dtype != types.float32 or tile.dtype != types.float32:
        raise TypingError("microkernel._tile needs C-contiguous arrays and float32 x and tile")

    def codegen(context, builder, sig, args):
        x_, r0_, n_, w_, p_, tile_ = args
        tx, _, _, tw, _, ttile = sig.args
        i64, i32, f = ir.IntType(64), ir.IntType(32), ir.FloatType()
        vec = ir.VectorType(f, LANES)
        xa = context.make_array(tx)(context, builder, x_)
        n_in = cgutils.unpack_tuple(builder, xa.shape)[1]
        if kind == "float32":
            data, scales = context.make_array(tw)(context, builder, w_), None
        else:
            data = context.make_array(tw.types[0])(context, builder, builder.extract_value(w_, 0))
            scales = (
                context.make_array(tw.types[1])(context, builder, builder.extract_value(w_, 1))
                if formats.FORMATS[kind].scales
                else None
            )
        size = np.dtype(formats.FORMATS[kind].array).itemsize  # bytes per weight
        elem = f if kind == "float32" else ir.IntType(8 * size)  # 16-bit and int8 data as integer bits
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{LANES}f32")
        const = lambda v: ir.Constant(i64, v)  # noqa: E731
        zeros = ir.Constant(vec, [0.0] * LANES)
        splat_mask = ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)
        undef = ir.Constant(vec, ir.Undefined)

        x_base = builder.gep(xa.data, [builder.mul(r0_, n_in)])  # row r0
        w_base = builder.gep(data.data, [builder.mul(builder.mul(p_, n_in), const(P))])  # panel p: [in, P]
        if scales is not None:
            n_blocks = cgutils.unpack_tuple(builder, scales.shape)[1]
            s_base = builder.gep(scales.data, [builder.mul(builder.mul(p_, n_blocks), const(P))])
        t_base = context.make_array(ttile)(context, builder, tile_).data

        def widen(k, c):  # weight vector c of panel row k, as LANES float32
            ptr = builder.gep(w_base, [builder.add(builder.mul(k, const(P)), const(c * LANES))])
            v = builder.load(builder.bitcast(ptr, ir.VectorType(elem, LANES).as_pointer()), align=size)
            scale = None
            if scales is not None:
                block = builder.lshr(k, const(BLOCK.bit_length() - 1))  # k // BLOCK (a power of 2)
                sptr = builder.gep(s_base, [builder.add(builder.mul(block, const(P)), const(c * LANES))])
                scale = builder.load(builder.bitcast(sptr, vec.as_pointer()), align=4)
            return WIDEN[kind](builder, v, scale)

        done = builder.append_basic_block("tile.done")
        switch = builder.switch(n_, done)
        for rows in range(1, R + 1):  # one loop per row count: the accumulators must be named registers
            entry = builder.append_basic_block(f"tile.{rows}")
            switch.add_case(ir.Constant(n_.type, rows), entry)
            loop, store = (
                builder.append_basic_block(f"tile.{rows}.loop"),
                builder.append_basic_block(f"tile.{rows}.store"),
            )
            builder.position_at_end(entry)
            builder.branch(loop)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            acc = [[builder.phi(vec) for _ in range(C)] for _ in range(rows)]
            ws = [widen(k, c) for c in range(C)]
            new = []
            for r in range(rows):
                xk = builder.load(builder.gep(x_base, [builder.add(builder.mul(const(r), n_in), k)]), align=4)
                xb = builder.shuffle_vector(builder.insert_element(undef, xk, ir.Constant(i32, 0)), undef, splat_mask)
                new.append([builder.call(fma, [xb, ws[c], acc[r][c]]) for c in range(C)])
            k_next = builder.add(k, const(1))
            k.add_incoming(const(0), entry)
            k.add_incoming(k_next, loop)
            for r in range(rows):
                for c in range(C):
                    acc[r][c].add_incoming(zeros, entry)
                    acc[r][c].add_incoming(new[r][c], loop)
            builder.cbranch(builder.icmp_signed("<", k_next, n_in), loop, store)
            builder.position_at_end(store)
            for r in range(rows):
                for c in range(C):
                    ptr = builder.gep(t_base, [const(r * P + c * LANES)])
                    builder.store(new[r][c], builder.bitcast(ptr, vec.as_pointer()), align=4)
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return types.void(x, r0, n, w, p, tile), codegen


def _data(w):
    """The panel array of a weight of any format."""


@overload(_data, inline="always")
def _data_overload(w):
    return (lambda w: w) if isinstance(w, types.Array) else (lambda w: w.data)


# ---- the entry point --------------------------------------------------------------------------------


# Replaces model.linear (+ GELU, + the residual add) for 1 to ROWS_MAX rows (kernels.py), every weight
# format, and the tied lm_head (wte.T in panels: level with a kernel over wte's rows at 1 row, 2 to 3x
# faster at 8 and 16, so that kernel is gone). Threads take contiguous runs of panels, so each streams
# its own part of the weight front to back once, whatever the row count; each panel is read once per
# R rows (from cache after the first). The epilogue (bias, GELU, residual) runs on the tile in L1.
@njit(parallel=True, **jit)
def linear(x, weight, bias, gelu, residual, n_threads):  # [n_rows, in] -> [n_rows, out]
    n_rows, n_out = x.shape[0], bias.size
    n_panels = _data(weight).shape[0]
    n_threads = max(1, min(n_threads, n_panels))
    out = np.empty((n_rows, n_out), f32)
    for t in prange(n_threads):
        tile = np.empty((R, P), f32)
        for p in range(t * n_panels // n_threads, (t + 1) * n_panels // n_threads):
            j0 = p * P
            width = min(P, n_out - j0)
            for r0 in range(0, n_rows, R):
                n = min(R, n_rows - r0)
                _tile(x, r0, n, weight, p, tile)
                for r in range(n):
                    for j in range(width):
                        v = tile[r, j] + bias[j0 + j]
                        if gelu:
                            v = gelu_one(v)
                        if residual.size:
                            v += residual[r0 + r, j0 + j]
                        out[r0 + r, j0 + j] = v
    return out


# ---- back to [in, out] for BLAS ---------------------------------------------------------------------


@intrinsic
def _widen_one(typingctx, w, value, scale):
    """One stored value of weight w's format (bits, or int8) -> float32, as WIDEN says. Exact but int8's product."""
    kind = _kind(w)

    def codegen(context, builder, signature, args):
        return WIDEN[kind](builder, args[1], args[2] if formats.FORMATS[kind].scales else None)

    return types.float32(w, value, scale), codegen


def _row(w, p, i, out):
    """out[:P] = row i of panel p as float32 (formats.dequantize, one panel row)."""


@overload(_row, inline="always")
def _row_overload(w, p, i, out):
    if _kind(w) == "float32":

        def row(w, p, i, out):
            for j in range(P):
                out[j] = w[p, i, j]

    elif formats.FORMATS[_kind(w)].scales:

        def row(w, p, i, out):
            for j in range(P):
                out[j] = _widen_one(w, w.data[p, i, j], w.scales[p, i // BLOCK, j])

    else:

        def row(w, p, i, out):
            for j in range(P):
                out[j] = _widen_one(w, w.data[p, i, j], f32(1))

    return row


# Replaces formats.dequantize for long prompts, which go to BLAS: the panels widened back into an
# [in, out] float32 buffer (reused from call to call: a fresh one would page-fault its way through
# memory each time). Serial: BLAS runs its own threads around it.
@njit(**jit)
def widen_(out, w):  # panels -> out [in, out]
    n_in, n_out = out.shape
    row = np.empty(P, f32)
    for p in range(_data(w).shape[0]):
        j0 = p * P
        for i in range(n_in):
            _row(w, p, i, row)
            for j in range(min(P, n_out - j0)):
                out[i, j0 + j] = row[j]
    return out
