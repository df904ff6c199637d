"""The one matmul kernel: x [n_rows, in] @ weight [in, out] for every weight format and any row count.

A weight is laid out once, at load, in column panels: [n_panels, in, P], P = C * LANES outputs each
(zero-padded at the end), so that one panel is one contiguous stream and a thread reads its own run
of panels front to back (`panels`). For each panel and each tile of up to R rows, `_tile` keeps R x C
vector accumulators of LANES float32 outputs in registers across the whole reduction: it loads each
weight vector once, widens it once (float16: `fpext <L x half>`; bfloat16: a shift) and feeds it to
all R rows with one FMA each (up to WIDE_ROWS rows, two panels at once, for twice the FMA chains).
llamafile's tinyBLAS (`gemm_bloc<RM, RN>`) is the same idea. The loop is written in LLVM IR rather
than left to LLVM's loop vectorizer, which vectorized each row on its own and sent the sums back to
memory after every weight row (issue 14); the same IR lowers to any vector width. On AVX-512 (`inspect_asm`) the 4-row loop is 16 `vfmadd231ps` on zmm registers, 4
`vbroadcastss` of x, and 4 weight loads, widened by `vcvtph2ps` (float16) or `vpmovzxwd` + `vpslld`
(bfloat16).

int8 is not widened: `_tile_q8` multiplies in integers, as llama.cpp's q8_0 does (formats.matmul_q8
is its reference). The rows are quantized per block of 32 (`quantize_rows`), the panels hold each
output's weights 4 input rows at a time (the 4 bytes one 32-bit lane sums), and each block's int32
sums are scaled once into float32. Against widening int8 to float32 for FMAs (the kernel before, 1.0
to 1.4x slower at 4 to 256 rows on an AVX2 Zen 1, level at 1 row, where both wait on memory), it is
kept at every row count, BLAS's included: BLAS has no such arithmetic, and one arithmetic per format
keeps every row count equal to the one reference. On that CPU the gain stops there: its 256-bit
vpmaddubsw and vpmaddwd each take two passes through the one multiplier pipe, so the integer loop does
no more multiply-adds per cycle than float FMAs (bench_kernels.py). VNNI's vpdpbusd does the four
products and their sum in one instruction.

Which tile a weight takes and how its values widen, the kernel reads from the weight's row of
formats.FORMATS (`_format`), never from its name: `integer` picks the quantized activations and
`_tile_q8`, `widen` one of WIDEN's codegen functions. A new format is a row there, and a function
here only if it needs arithmetic that is not here yet.

The float kernel beat the alternatives measured for float32 (sgemm on each thread's band of the weight,
OpenBLAS held to one thread each: 1.4 to 2.4x slower at 1 to 16 rows, as BLAS packs its operands for
large products; a dot product per wte row for the lm_head: 2 to 3x slower at 8 and 16 rows) and so
replaced them. Figures, and how far it is from the machine's limits: `benchmarks/bench_kernels.py` and
docs/speed.md.
"""

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

from .. import formats
from ..formats import BLOCK
from . import target
from .ops import f32, gelu_one, jit

# Sized for the vector registers: R x C accumulators + C widened weights + 1 broadcast x fit, so nothing
# spills inside the loop. 4 x 4 of 16 lanes measured fastest of the shapes tried (README, bench_kernels);
# on AVX2's 16 ymm registers 4 x 4 would spill: there C = 2 (P = 16 outputs). target.py picks the width.
LANES = target.LANES  # float32 lanes per vector register
C = 4 if LANES == 16 else 2  # vectors per panel row
R = 4  # rows per tile
P = C * LANES  # outputs per panel: 64 with AVX-512, which divides every GPT-2 width
# Up to this many rows, a float tile takes two panels at once (2 x C accumulators a row, two weight
# streams): one row alone has only C chains of dependent FMAs to hide their latency behind. On an AVX2
# Zen 1, bench_kernels at 1 and 2 rows, alternating runs: float32 and bfloat16 2 to 12% more GB/s,
# float16 up to 5% (it waits on vcvtph2ps instead: about 11 GB/s a core either way). Each output still
# sums the same products in the same order, so a row's outputs are the same bits in any tile.
WIDE_ROWS = 2
GROUP = 4  # int8 weights of one output that one 32-bit lane of an integer dot product sums


class Linear(NamedTuple):
    """A linear layer laid out for the microkernel: weight panels, bias [out], and a GELU after it."""

    weight: object  # float32 [n_panels, in, P], F16/BF16 with data [n_panels, in, P], or Q8 as `panels` says
    bias: np.ndarray  # float32 [out]: its length is the layer's width
    gelu: bool


def panels(w):
    """A [in, out] weight of any format (formats.py) in column panels of P outputs: [n_panels, in, P].
    int8 data is [n_panels, n_blocks * 8, P, GROUP] instead: each output's weights GROUP input rows at a
    time side by side, the bytes one 32-bit lane of an integer dot product takes, its input rows
    zero-padded to whole blocks (scales [n_panels, n_blocks, P])."""
    n_in, n_out = formats.shape(w)
    n_panels = -(-n_out // P)

    def split(a):  # [rows, out, ...] -> [n_panels, rows, P, ...], zero-padded: one copy
        out = np.zeros((n_panels, a.shape[0], P, *a.shape[2:]), a.dtype)
        for p in range(n_panels):  # panel by panel: wte.T's columns are rows of wte, read in runs
            width = min(P, n_out - p * P)
            out[p, :, :width] = a[:, p * P : p * P + width]
        return out

    if isinstance(w, np.ndarray):
        return split(np.asarray(w, f32))
    if formats.integer(w):  # laid out for _tile_q8
        data = np.zeros((formats.n_blocks(n_in) * BLOCK, n_out), np.int8)
        data[:n_in] = w.data
        return formats.Q8(split(data.reshape(-1, GROUP, n_out).transpose(0, 2, 1)), split(w.scales))
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


def _widen_f16(builder, v):  # float16 bits -> float32: LLVM's fpext half -> float. Exact.
    return builder.fpext(builder.bitcast(v, _like(v, ir.HalfType())), _floats(v))


def _widen_bf16(builder, v):  # bfloat16 bits -> the top half of a float32's. Exact.
    i32 = _like(v, ir.IntType(32))
    sixteen = ir.Constant(i32, [16] * v.type.count) if isinstance(i32, ir.VectorType) else ir.Constant(i32, 16)
    return builder.bitcast(builder.shl(builder.zext(v, i32), sixteen), _floats(v))


# The code for each way of widening a float format's stored values to float32 in registers that a
# row of formats.FORMATS can name (its `widen`): v is its data as stored (float32, or integer bits),
# one value or a vector. An integer format is not widened: it multiplies in integers (_tile_q8).
WIDEN = {
    "as is": lambda builder, v: v,
    "ieee half": _widen_f16,
    "shl 16": _widen_bf16,
}


def _format(w):
    """The row of formats.FORMATS for a weight's Numba type: a float32 array or one of formats.py's
    named tuples. What the kernels do with a weight, they read from it."""
    return formats.FORMATS[formats.DTYPE_OF[np.ndarray if isinstance(w, types.Array) else w.instance_class]]


@intrinsic
def _tile(typingctx, x, r0, n, w, p, q, tile):
    """tile[j * R : j * R + n, :P] = x[r0 : r0 + n] @ panel p + j of w, for j < q: q = 1 and
    1 <= n <= R, or q = 2 and n <= WIDE_ROWS. One loop over `in` (>= 1) per shape. The addresses are
    computed for C-contiguous arrays, so other layouts are refused when compiling."""
    fmt, bare = _format(w), isinstance(w, types.Array)  # bare: a float32 array, not a named tuple
    arrays = [x, tile, w] if bare else [x, tile, *w.types]
    if any(a.layout != "C" for a in arrays) or x.dtype != types.float32 or tile.dtype != types.float32:
        raise TypingError("microkernel._tile needs C-contiguous arrays and float32 x and tile")
    if fmt.widen not in WIDEN:
        raise TypingError(f"microkernel._tile widens float formats; {fmt.name} has its own tile")
    widen_to_f32, stored = WIDEN[fmt.widen], np.dtype(fmt.array)

    def codegen(context, builder, sig, args):
        x_, r0_, n_, w_, p_, q_, tile_ = args
        tx, _, _, tw, _, _, ttile = sig.args
        i64, i32, f = ir.IntType(64), ir.IntType(32), ir.FloatType()
        vec = ir.VectorType(f, LANES)
        xa = context.make_array(tx)(context, builder, x_)
        n_in = cgutils.unpack_tuple(builder, xa.shape)[1]
        if bare:
            data = context.make_array(tw)(context, builder, w_)
        else:
            data = context.make_array(tw.types[0])(context, builder, builder.extract_value(w_, 0))
        size = stored.itemsize  # bytes per weight
        elem = f if stored == np.float32 else ir.IntType(8 * size)  # 16-bit data as integer bits
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{LANES}f32")
        const = lambda v: ir.Constant(i64, v)  # noqa: E731
        zeros = ir.Constant(vec, [0.0] * LANES)
        splat_mask = ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)
        undef = ir.Constant(vec, ir.Undefined)

        x_base = builder.gep(xa.data, [builder.mul(r0_, n_in)])  # row r0
        w_base = builder.gep(data.data, [builder.mul(builder.mul(p_, n_in), const(P))])  # panel p: [in, P]
        t_base = context.make_array(ttile)(context, builder, tile_).data

        def widen(k, c):  # weight vector c of panel row k (c >= C: of the next panel), as LANES float32
            j, c = divmod(c, C)
            at = builder.add(builder.mul(builder.add(k, builder.mul(const(j), n_in)), const(P)), const(c * LANES))
            v = builder.load(
                builder.bitcast(builder.gep(w_base, [at]), ir.VectorType(elem, LANES).as_pointer()), align=size
            )
            return widen_to_f32(builder, v)

        done = builder.append_basic_block("tile.done")
        switch = builder.switch(builder.add(n_, builder.mul(builder.sub(q_, const(1)), const(R))), done)
        shapes = [(rows, 1) for rows in range(1, R + 1)] + [(rows, 2) for rows in range(1, WIDE_ROWS + 1)]
        for rows, q in shapes:  # one loop per shape: the accumulators must be named registers
            entry = builder.append_basic_block(f"tile.{rows}x{q}")
            switch.add_case(ir.Constant(n_.type, rows + (q - 1) * R), entry)
            loop, store = (
                builder.append_basic_block(f"tile.{rows}x{q}.loop"),
                builder.append_basic_block(f"tile.{rows}x{q}.store"),
            )
            builder.position_at_end(entry)
            builder.branch(loop)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            acc = [[builder.phi(vec) for _ in range(q * C)] for _ in range(rows)]
            ws = [widen(k, c) for c in range(q * C)]
            new = []
            for r in range(rows):
                xk = builder.load(builder.gep(x_base, [builder.add(builder.mul(const(r), n_in), k)]), align=4)
                xb = builder.shuffle_vector(builder.insert_element(undef, xk, ir.Constant(i32, 0)), undef, splat_mask)
                new.append([builder.call(fma, [xb, ws[c], acc[r][c]]) for c in range(q * C)])
            k_next = builder.add(k, const(1))
            k.add_incoming(const(0), entry)
            k.add_incoming(k_next, loop)
            for r in range(rows):
                for c in range(q * C):
                    acc[r][c].add_incoming(zeros, entry)
                    acc[r][c].add_incoming(new[r][c], loop)
            builder.cbranch(builder.icmp_signed("<", k_next, n_in), loop, store)
            builder.position_at_end(store)
            for r in range(rows):
                for c in range(q * C):
                    j, c_ = divmod(c, C)  # panel p + j's rows start at tile row j * R
                    ptr = builder.gep(t_base, [const((j * R + r) * P + c_ * LANES)])
                    builder.store(new[r][c], builder.bitcast(ptr, vec.as_pointer()), align=4)
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return types.void(x, r0, n, w, p, q, tile), codegen


# ---- the int8 tile: integer dot products ---------------------------------------------------------
# One 32-bit lane sums GROUP int8 products of one output: 4 x LANES products per instruction against a
# float FMA's LANES. The activations arrive quantized per block of 32 (quantize_rows); per block, R x C
# int32 accumulators take its 8 groups, then are scaled once by both scales into float32 accumulators.
# How one group is multiplied, per instruction set (target.DOT): acc <L x i32> += the sums of GROUP
# products of x (the row's GROUP int8, repeated in every lane) and w (<4L x i8>: L outputs' GROUP weights).
# vpmaddubsw multiplies unsigned by signed bytes, so ggml's sign trick makes x unsigned: |x| times w
# with x's sign (vpsignb), whose pair sums, at most 2 x 127 x 127, never saturate its int16. Both x86
# forms work on 256-bit pieces (an AVX-512 shape on an AVX2 host runs as two).


def _i8x(n):
    return ir.VectorType(ir.IntType(8), n)


def _pieces(builder, v, width):
    """v split into vectors of `width` elements (v itself if it is that wide)."""
    if v.type.count == width:
        return [v]
    return [
        builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), width), list(range(i, i + width))))
        for i in range(0, v.type.count, width)
    ]


def _joined(builder, parts):
    while len(parts) > 1:
        n = parts[0].type.count
        mask = ir.Constant(ir.VectorType(ir.IntType(32), 2 * n), list(range(2 * n)))
        parts = [builder.shuffle_vector(a, b, mask) for a, b in zip(parts[::2], parts[1::2])]
    return parts[0]


def _x86(builder, name, ret, *args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, list(args))


def _on_pieces(piece):
    """A dot product of any width from one on 256-bit pieces: acc <8 x i32>, x, ax, w <32 x i8>."""

    def dot(builder, acc, x, ax, w):
        parts = (_pieces(builder, acc, 8), *(_pieces(builder, v, 32) for v in (x, ax, w)))
        return _joined(builder, [piece(builder, *args) for args in zip(*parts)])

    return dot


@_on_pieces
def _dot_avx2(builder, acc, x, ax, w):  # vpsignb, vpmaddubsw (int16 pair sums), vpmaddwd by 1 (int32)
    sw = _x86(builder, "llvm.x86.avx2.psign.b", _i8x(32), w, x)
    pairs = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", ir.VectorType(ir.IntType(16), 16), ax, sw)
    ones = ir.Constant(ir.VectorType(ir.IntType(16), 16), [1] * 16)
    return builder.add(acc, _x86(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(ir.IntType(32), 8), pairs, ones))


@_on_pieces
def _dot_vnni(builder, acc, x, ax, w):  # vpsignb, then vpdpbusd: the four products and the add in one
    sw = _x86(builder, "llvm.x86.avx2.psign.b", _i8x(32), w, x)
    return _x86(builder, "llvm.x86.avx512.vpdpbusd.256", acc.type, acc, ax, sw)


def _dot_portable(builder, acc, x, ax, w):
    """Plain IR: products of adjacent pairs summed in int32 (the shape of pmaddwd, which LLVM finds on
    x86: 16 to 19 GFLOP/s on one AVX2 core at 16 to 64 rows, against 2.9 summing all four in one go),
    then each lane's two pairs."""
    n = w.type.count
    wide = ir.VectorType(ir.IntType(32), n)
    products = builder.mul(builder.sext(w, wide), builder.sext(x, wide))
    lanes = lambda start, count, step: ir.Constant(ir.VectorType(ir.IntType(32), count), list(range(start, n, step)))  # noqa: E731
    pairs = builder.add(
        builder.shuffle_vector(products, products, lanes(0, n // 2, 2)),
        builder.shuffle_vector(products, products, lanes(1, n // 2, 2)),
    )  # [2L] int32
    half = lambda start: ir.Constant(ir.VectorType(ir.IntType(32), n // 4), list(range(start, n // 2, 2)))  # noqa: E731
    return builder.add(
        acc, builder.add(builder.shuffle_vector(pairs, pairs, half(0)), builder.shuffle_vector(pairs, pairs, half(1)))
    )


DOT = {"vnni": _dot_vnni, "avx2": _dot_avx2, "portable": _dot_portable}


@intrinsic
def _tile_q8(typingctx, xq, xs, r0, n, w, p, tile):
    """tile[:n, :P] = rows r0 .. r0 + n of the quantized activations (xq int8 [n_rows, n_blocks * 32],
    xs float32 [n_rows, n_blocks]) @ panel p of int8 weight w, in integers, for 1 <= n <= R."""
    if any(a.layout != "C" for a in (xq, xs, tile, *w.types)) or xq.dtype != types.int8:
        raise TypingError("microkernel._tile_q8 needs C-contiguous arrays and int8 activations")
    dot = DOT[target.DOT]

    def codegen(context, builder, sig, args):
        xq_, xs_, r0_, n_, w_, p_, tile_ = args
        txq, txs, _, _, tw, _, ttile = sig.args
        i64, i32, f = ir.IntType(64), ir.IntType(32), ir.FloatType()
        vec, ivec, bvec = ir.VectorType(f, LANES), ir.VectorType(i32, LANES), _i8x(GROUP * LANES)
        const = lambda v: ir.Constant(i64, v)  # noqa: E731
        xqa, xsa = context.make_array(txq)(context, builder, xq_), context.make_array(txs)(context, builder, xs_)
        n_k, n_blocks = cgutils.unpack_tuple(builder, xqa.shape)[1], cgutils.unpack_tuple(builder, xsa.shape)[1]
        data = context.make_array(tw.types[0])(context, builder, builder.extract_value(w_, 0))
        scales = context.make_array(tw.types[1])(context, builder, builder.extract_value(w_, 1))
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{LANES}f32")
        absb = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(bvec, [bvec, ir.IntType(1)]), f"llvm.abs.v{GROUP * LANES}i8"
        )
        izeros, zeros = ir.Constant(ivec, [0] * LANES), ir.Constant(vec, [0.0] * LANES)
        splat_mask = ir.Constant(ir.VectorType(i32, LANES), [0] * LANES)

        def splat(value, vtype):
            undef = ir.Constant(vtype, ir.Undefined)
            return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(i32, 0)), undef, splat_mask)

        x_base = builder.gep(xqa.data, [builder.mul(r0_, n_k)])  # row r0
        s_x = builder.gep(xsa.data, [builder.mul(r0_, n_blocks)])
        w_base = builder.gep(data.data, [builder.mul(builder.mul(p_, n_k), const(P))])  # panel p: [n_k / 4, P, 4]
        s_w = builder.gep(scales.data, [builder.mul(builder.mul(p_, n_blocks), const(P))])
        t_base = context.make_array(ttile)(context, builder, tile_).data

        done = builder.append_basic_block("tile.done")
        switch = builder.switch(n_, done)
        for rows in range(1, R + 1):
            entry = builder.append_basic_block(f"tile.{rows}")
            switch.add_case(ir.Constant(n_.type, rows), entry)
            loop, scale, more = (
                builder.append_basic_block(f"tile.{rows}.{part}") for part in ("loop", "scale", "more")
            )
            builder.position_at_end(entry)
            tile_at = lambda r, c: builder.bitcast(builder.gep(t_base, [const(r * P + c * LANES)]), vec.as_pointer())  # noqa: E731
            for r in range(rows):  # the float32 sums live in the tile, touched once per block
                for c in range(C):
                    builder.store(zeros, tile_at(r, c), align=4)
            builder.branch(loop)
            # One group per iteration, over all of them, a block's end branching off to scale: a loop of
            # 8 groups per block was unrolled by LLVM into one basic block whose 8 groups of loads it
            # hoisted together, spilling half the accumulators.
            builder.position_at_end(loop)
            g = builder.phi(i64)  # the group: input rows 4g .. 4g + 3
            iacc = [[builder.phi(ivec) for _ in range(C)] for _ in range(rows)]
            k = builder.mul(g, const(GROUP))
            ws = []
            for c in range(C):
                ptr = builder.gep(w_base, [builder.add(builder.mul(k, const(P)), const(c * LANES * GROUP))])
                ws.append(builder.load(builder.bitcast(ptr, bvec.as_pointer()), align=4))
            summed = []
            for r in range(rows):
                ptr = builder.gep(x_base, [builder.add(builder.mul(const(r), n_k), k)])
                xb = builder.bitcast(splat(builder.load(builder.bitcast(ptr, i32.as_pointer()), align=4), ivec), bvec)
                ax = builder.call(absb, [xb, ir.Constant(ir.IntType(1), 0)])
                summed.append([dot(builder, iacc[r][c], xb, ax, ws[c]) for c in range(C)])
            per_block = const(BLOCK // GROUP - 1)
            builder.cbranch(builder.icmp_unsigned("==", builder.and_(g, per_block), per_block), scale, more)
            builder.position_at_end(scale)  # the block's last group: its sums into the tile, scaled
            b = builder.lshr(g, const((BLOCK // GROUP).bit_length() - 1))
            for r in range(rows):
                x_scale = splat(builder.load(builder.gep(s_x, [builder.add(builder.mul(const(r), n_blocks), b)])), vec)
                for c in range(C):
                    ptr = builder.gep(s_w, [builder.add(builder.mul(b, const(P)), const(c * LANES))])
                    w_scale = builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4)
                    both = builder.fmul(x_scale, w_scale)  # d_x * d_w, as formats.matmul_q8
                    t = builder.load(tile_at(r, c), align=4)
                    builder.store(
                        builder.call(fma, [builder.sitofp(summed[r][c], vec), both, t]), tile_at(r, c), align=4
                    )
            builder.branch(more)
            builder.position_at_end(more)
            for r in range(rows):
                for c in range(C):
                    kept = builder.phi(ivec)  # the sums go on, or start again after a block's end
                    kept.add_incoming(summed[r][c], loop)
                    kept.add_incoming(izeros, scale)
                    iacc[r][c].add_incoming(izeros, entry)
                    iacc[r][c].add_incoming(kept, more)
            g_next = builder.add(g, const(1))
            g.add_incoming(const(0), entry)
            g.add_incoming(g_next, more)
            n_groups = builder.udiv(n_k, const(GROUP))
            builder.cbranch(builder.icmp_signed("<", g_next, n_groups), loop, done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return types.void(xq, xs, r0, n, w, p, tile), codegen


# formats.quantize_rows, the same float32 operations in the same order: no fastmath here, which could
# reassociate x * (1 / (max / 127)), and a rounding apart is a q apart. Compiled eagerly, for its one
# signature: compiled lazily, from within linear's compilation, it took linear's fastmath flags.
@njit("Tuple((int8[:, ::1], float32[:, ::1]))(float32[:, ::1])", cache=True, nogil=True, error_model="numpy")
def quantize_rows(x):  # [n, in] -> q int8 [n, n_blocks * 32], d float32 [n, n_blocks]
    n, n_in = x.shape
    n_blocks = (n_in + BLOCK - 1) // BLOCK
    q, d = np.zeros((n, n_blocks * BLOCK), np.int8), np.empty((n, n_blocks), f32)
    for r in range(n):
        for b in range(n_blocks):
            top = f32(0.0)
            for k in range(b * BLOCK, min((b + 1) * BLOCK, n_in)):
                top = max(top, abs(x[r, k]))
            scale = top / f32(127)
            inv = f32(1.0) / scale if scale != 0 else f32(0.0)
            d[r, b] = scale
            for k in range(b * BLOCK, min((b + 1) * BLOCK, n_in)):
                q[r, k] = np.int8(np.rint(x[r, k] * inv))
    return q, d


def _activations(x, w):
    """x quantized for an int8 weight (quantize_rows), else nothing."""


@overload(_activations, inline="always")
def _activations_overload(x, w):
    if _format(w).integer:
        return lambda x, w: quantize_rows(x)
    return lambda x, w: (np.empty((0, 0), np.int8), np.empty((0, 0), f32))


def _multiply(x, xq, xs, r0, n, w, p, q, tile):
    """tile = rows r0 .. r0 + n of x @ panels p .. p + q of w, in w's arithmetic (q as _panels says)."""


@overload(_multiply, inline="always")
def _multiply_overload(x, xq, xs, r0, n, w, p, q, tile):
    if _format(w).integer:
        return lambda x, xq, xs, r0, n, w, p, q, tile: _tile_q8(xq, xs, r0, n, w, p, tile)
    return lambda x, xq, xs, r0, n, w, p, q, tile: _tile(x, r0, n, w, p, q, tile)


def _panels(w, n_rows, left):
    """How many panels one tile of n_rows rows takes, with `left` panels left in the thread's run."""


@overload(_panels, inline="always")
def _panels_overload(w, n_rows, left):
    if _format(w).integer:  # _tile_q8 takes one: memory-bound at one row already, 1.1x a plain read (bench_kernels)
        return lambda w, n_rows, left: 1
    return lambda w, n_rows, left: 2 if n_rows <= WIDE_ROWS and left >= 2 else 1


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
    xq, xs = _activations(x, weight)  # int8 weights: x quantized per block, once
    for t in prange(n_threads):
        tile = np.empty((2 * R, P), f32)
        p, end = t * n_panels // n_threads, (t + 1) * n_panels // n_threads
        while p < end:
            q = _panels(weight, n_rows, end - p)
            for r0 in range(0, n_rows, R):
                n = min(R, n_rows - r0)
                _multiply(x, xq, xs, r0, n, weight, p, q, tile)
                for i in range(q):
                    j0 = (p + i) * P
                    for r in range(n):
                        for j in range(min(P, n_out - j0)):
                            v = tile[i * R + r, j] + bias[j0 + j]
                            if gelu:
                                v = gelu_one(v)
                            if residual.size:
                                v += residual[r0 + r, j0 + j]
                            out[r0 + r, j0 + j] = v
            p += q
    return out


# ---- back to [in, out] for BLAS ---------------------------------------------------------------------


@intrinsic
def _widen_one(typingctx, w, value):
    """One stored value of weight w's format (float32, or 16-bit bits) -> float32, as its row's `widen`
    says. Exact."""
    widen_to_f32 = WIDEN[_format(w).widen]

    def codegen(context, builder, signature, args):
        return widen_to_f32(builder, args[1])

    return types.float32(w, value), codegen


def _row(w, p, i, out):
    """out[:P] = row i of panel p as float32 (formats.dequantize, one panel row)."""


@overload(_row, inline="always")
def _row_overload(w, p, i, out):
    def row(w, p, i, out):
        data = _data(w)
        for j in range(P):
            out[j] = _widen_one(w, data[p, i, j])

    return row


# Replaces formats.dequantize for long prompts, which go to BLAS (float formats only: int8 multiplies
# in integers, in the microkernel, at every row count): the panels widened back into an [in, out] float32 buffer (reused from call to call: a fresh one would page-fault its way through
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
